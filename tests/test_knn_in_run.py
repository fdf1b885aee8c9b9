"""train.eval_every: the in-run k-NN equals `poa eval knn` on the checkpoint of that step (1 and 2 ranks)."""

import re
import subprocess
import sys

import pytest

from tests.runs import ENV, RUN, train


def eval_knn(run, step, subs, tmp):
    folder = tmp / f"subnets_{step}"
    cmd = [sys.executable, "-m", "poa_hpc"]
    r = subprocess.run([*cmd, "extract", str(run), "--step", str(step), *[a for s in subs for a in ("--subnet", s)],
                        "-o", str(folder)], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([*cmd, "eval", "knn", *sorted(str(p) for p in folder.glob("*.safetensors"))],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"_(\d+x\d+)\s.*?([\d.]+)%\s*$", r.stdout, re.M)}


@pytest.mark.slow
@pytest.mark.parametrize("nproc,engine", [(1, "none"), (2, "ddp")])
def test_in_run_knn_equals_poa_eval_knn_on_that_steps_checkpoint(tmp_path, nproc, engine):
    out = tmp_path / "run"
    rows = train(out, nproc, engine, *RUN, "data.n_local=0", "train.eval_every=4", "train.checkpoint_every=4",
                 "train.log_every=3")
    knn = [r for r in rows if any(k.startswith("knn/") for k in r)]
    assert [r["step"] for r in knn] == [3, 7]  # after steps 4 and 8 (the last)
    subs = sorted(k[4:] for k in knn[0] if k.startswith("knn/"))
    assert subs == ["48x3", "80x5", "96x6"]  # smallest, a middle one, intact
    for r in knn:
        got = eval_knn(out, r["step"] + 1, subs, tmp_path)
        assert got == {s: round(r[f"knn/{s}"], 2) for s in subs}, (r["step"], got)  # the table prints 2 decimals
    assert knn[0]["knn/96x6"] != knn[1]["knn/96x6"] or knn[0]["knn/48x3"] != knn[1]["knn/48x3"]
