"""`poa config show`, the key docs read from the schema, packaged config names, `poa --version`."""

import subprocess
import sys

import pytest
import yaml

from poa_hpc.cli import main
from poa_hpc.config import POAConfig, flatten, load_config, to_dict
from poa_hpc.config_docs import key_docs
from poa_hpc.errors import ConfigError


def test_every_config_key_has_a_one_line_doc():
    docs = key_docs()
    assert set(flatten(to_dict(POAConfig()))) <= set(docs)  # every leaf key ...
    missing = [k for k, v in docs.items() if not v.strip()]
    assert missing == []  # ... and every section has one
    assert all("\n" not in v for v in docs.values())
    assert docs["optim.clip_grad"] == "0 disables" and docs["train.loggers"].startswith("Metric loggers")


@pytest.mark.parametrize("name,overrides", [(None, []), ("demo_cpu", ["optim.base_lr=0.001", "train.loggers=[jsonl,wandb]"]),
                                            ("vit_l_poa", []), ("swin_demo_cpu", [])])
@pytest.mark.parametrize("diff", [False, True])
def test_config_show_round_trips(name, overrides, diff, capsys, tmp_path):
    argv = ["config", "show", *(["--config", name] if name else []), *overrides, *(["--diff"] if diff else [])]
    assert main(argv) == 0
    text = capsys.readouterr().out
    data = yaml.safe_load(text) or {}
    want = load_config(name, overrides)
    path = tmp_path / "shown.yaml"
    path.write_text(text)
    assert load_config(path) == want  # the printed YAML loads back to the same config
    if diff:
        assert set(flatten(data)) == {k for k, v in flatten(to_dict(want)).items()
                                      if flatten(to_dict(POAConfig()))[k] != v}
    else:
        assert set(flatten(data)) == set(flatten(to_dict(want)))
    # each printed key carries its doc as a trailing comment
    assert "  # weight of the intact terms; elastic terms get 1 - lam" in text or (diff and "lam:" not in text)


def test_a_packaged_config_name_works_where_a_path_does(capsys):
    assert load_config("vit_l_poa") == load_config("configs/vit_l_poa.yaml")
    assert load_config("demo_cpu.yaml") == load_config("configs/demo_cpu.yaml")
    with pytest.raises(ConfigError, match="'nope' does not exist .*packaged config: .*vit_l_poa"):
        load_config("nope")
    assert main(["subnets", "--config", "demo_cpu"]) == 0
    assert "48x3" in capsys.readouterr().out


def test_version_prints_the_package_version_and_commit():
    r = subprocess.run([sys.executable, "-m", "poa_hpc", "--version"], capture_output=True, text=True, timeout=60)
    git = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert r.returncode == 0 and r.stdout.strip() == f"poa_hpc 0.1.0 (commit {git})"
