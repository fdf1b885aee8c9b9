"""Every user error in config, checkpoint, command-line and Slurm-argument input is exit code 2 with one line
naming the input and no traceback (`poa` in a real process: what a user sees).  Data-folder errors are covered
by the data tests.  Under Slurm, exit code 2 ends the job without a requeue (test_slurm_launch's bad-config job
and test_resilience's restart decisions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from test_train import DETERMINISTIC_ENV, TINY

TRAIN = ["train", "--config", "configs/demo_cpu.yaml", *TINY, "data.num_workers=0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny run (2 checkpoints) to resume from with bad input."""
    out = tmp_path_factory.mktemp("run")
    r = subprocess.run([sys.executable, "-m", "poa_hpc", *TRAIN, "train.max_steps=2", "train.checkpoint_every=1",
                        f"train.output_dir={out}"], capture_output=True, text=True, env=DETERMINISTIC_ENV, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out


def _files(tmp: Path) -> dict:
    (tmp / "list.yaml").write_text("- just\n- a list\n")
    (tmp / "broken.yaml").write_text("model: {arch: vit\n")
    (tmp / "bad.pt").write_text("not a checkpoint\n")
    return {"list": tmp / "list.yaml", "broken": tmp / "broken.yaml"}


CASES = {  # name: (args, a word the one-line message must contain)
    "unknown key": (TRAIN + ["model.nope=1"], "model.nope"),
    "value of the wrong type": (TRAIN + ["optim.lr=fast"], "optim.lr"),
    "value out of range": (TRAIN + ["train.checkpoint_every=0"], "train.checkpoint_every"),
    "unknown engine": (TRAIN + ["dist.engine=mpi"], "dist.engine"),
    "non-positive timeout": (TRAIN + ["dist.timeout_s=0"], "dist.timeout_s"),
    "missing config file": (["train", "--config", "configs/nope.yaml"], "configs/nope.yaml"),
    "config file that is not a mapping": (["train", "--config", "{list}"], "list.yaml"),
    "config file with a YAML error": (["train", "--config", "{broken}"], "broken.yaml"),
    "override without '='": (TRAIN + ["model.arch"], "model.arch"),
    "checkpoint of another config": (TRAIN + ["--resume", "train.seed=7", "train.output_dir={run}"],
                                     "train.seed"),
    "extract: no such run folder": (["extract", "{tmp}/none", "--subnet", "16x2", "-o", "{tmp}/x.safetensors"],
                                    "none"),
    "extract: a file that is not a checkpoint": (["extract", "{tmp}/bad.pt", "--subnet", "16x2", "-o",
                                                  "{tmp}/x.safetensors"], "bad.pt"),
    "extract: step not kept": (["extract", "{run}", "--step", "7", "--subnet", "16x2", "-o", "{tmp}/x.safetensors"],
                               "step 7"),
    "submit: bad time": (["submit", "--config", "configs/demo_cpu.yaml", "--time", "soon"], "--time"),
    "submit: negative max restarts": (["submit", "--config", "configs/demo_cpu.yaml", "--max-restarts", "-1"],
                                      "--max-restarts"),
    "submit: signal delay past the limit": (["submit", "--config", "configs/demo_cpu.yaml", "--time", "2",
                                             "--signal-delay", "90"], "--signal-delay"),
    "submit: tasks != gpus": (["submit", "--config", "configs/demo_cpu.yaml", "--gpus-per-node", "2",
                               "--tasks-per-node", "3"], "--tasks-per-node"),
    "submit: 2 tasks without an engine": (["submit", "--config", "configs/demo_cpu.yaml", "--gpus-per-node", "0",
                                           "--tasks-per-node", "2"], "dist.engine"),
}


@pytest.mark.slow  # 18 `poa` processes (each imports torch)
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_exit_code_2_with_one_line_naming_it(name, run, tmp_path):
    args, word = CASES[name]
    fmt = {**_files(tmp_path), "run": run, "tmp": tmp_path}
    args = [a.format(**fmt) for a in args]
    r = subprocess.run([sys.executable, "-m", "poa_hpc", *args], capture_output=True, text=True,
                       env=DETERMINISTIC_ENV, timeout=300)
    err = r.stderr
    assert "Traceback" not in err + r.stdout, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("poa") and "error" in ln]
    assert r.returncode == 2, (r.returncode, err[-3000:])
    assert len(errors) == 1 and word in errors[0], err[-3000:]
