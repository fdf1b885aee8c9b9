"""`poa bench demo`: recipes on top of the recipe file's base config, one row per recipe, the JSON table."""

import json
from pathlib import Path

import pytest

from backbones import tiny
from poa_hpc.cli import main
from poa_hpc.config import load_config, to_yaml

BASE = tiny("vit") + ["data.n_local=2", "data.num_workers=0", "optim.batch_size=16", "optim.iters_per_epoch=3",
                      "optim.epochs=2", "optim.warmup_epochs=1", "train.log_every=1", "loss.teacher_temp=0.07",
                      "loss.warmup_teacher_temp=0.04"]


@pytest.fixture()
def recipe_file(tmp_path: Path) -> Path:
    (tmp_path / "base.yaml").write_text(to_yaml(load_config("configs/demo_cpu.yaml", BASE)))
    f = tmp_path / "recipes.yaml"
    f.write_text("_base: base.yaml\n"
                 "plain:\n  overrides: []\n  note: the base as it is\n"
                 "sharp:\n  overrides: [loss.teacher_temp=0.01, loss.warmup_teacher_temp=0.01, optim.epochs=3]\n")
    return f


def test_list_shows_the_recipes_not_the_base(recipe_file, capsys):
    assert main(["bench", "demo", "--recipe-file", str(recipe_file), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == ["plain", "sharp"]
    assert "(the config as it is)  # the base as it is" in lines[0]


def test_unknown_recipe_and_missing_base_are_one_line_errors(recipe_file, tmp_path, capsys):
    assert main(["bench", "demo", "--recipe-file", str(recipe_file), "--recipes", "nosuch"]) == 2
    assert "unknown recipe(s) ['nosuch']" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("_base: gone.yaml\nplain:\n  overrides: []\n")
    with pytest.raises(SystemExit, match="'_base' of .*gone.yaml' does not exist"):
        main(["bench", "demo", "--recipe-file", str(bad), "--list"])


def test_rows_train_each_recipe_on_the_base_and_agree_with_the_probe(recipe_file, tmp_path, capsys):
    work, res = tmp_path / "work", tmp_path / "res"
    assert main(["bench", "demo", "--recipe-file", str(recipe_file), "--workdir", str(work), "--probe-every", "2",
                 "--out", str(res), "--tag", "demo_test"]) == 0
    table = json.loads(next(res.glob("demo_test_cpu_*.json")).read_text())
    assert table["commit"] and table["versions"] and table["device"]
    plain, sharp = table["rows"]
    # the recipe's overrides land on the base: 2 x 3 and 3 x 3 steps, the sharp teacher only in the second
    assert (plain["steps"], sharp["steps"]) == (6, 9)
    assert "loss.teacher_temp" not in plain["config"] and sharp["config"]["loss.teacher_temp"] == 0.01
    assert plain["config"]["model.vit.embed_dim"] == 32  # the base's tiny ViT, not the packaged demo's
    for row in (plain, sharp):
        assert [p["step"] for p in row["probes"]] == list(range(0, row["steps"], 2)) + (
            [row["steps"] - 1] if (row["steps"] - 1) % 2 else [])
        assert list(row["knn"]) == ["16x2", "24x3", "32x4"]
        # the probe's k-NN of the whole teacher after the last step is the sweep's k-NN of the intact network
        assert row["probes"][-1]["knn_intact"] == pytest.approx(row["knn_intact"], abs=100 / 359 + 1e-9)
        assert all(0.0 <= p["target_entropy_rel_h0"] <= 1.0 + 1e-6 for p in row["probes"])
        assert json.loads((work / row["name"] / "bench_row.json").read_text()) == row
    # --reuse takes the saved rows instead of training again
    capsys.readouterr()
    assert main(["bench", "demo", "--recipe-file", str(recipe_file), "--workdir", str(work), "--reuse",
                 "--out", ""]) == 0
    out = capsys.readouterr().out
    assert out.count("reused") == 2 and "training" not in out
