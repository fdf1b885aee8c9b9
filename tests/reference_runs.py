"""An uninterrupted 2-rank run that interrupted-and-restarted runs must equal (a pytest plugin module).

``RESTART_RUN`` is a tiny 2-rank ddp run (CPU, gloo, 8 images per rank); the session fixture
``ddp2_reference`` trains it once, uninterrupted, with ``poa train --nproc 2`` (torchrun).  The
tests that kill a rank mid-run (torchrun ``--max-restarts``, ``poa submit``, the sbatch script)
train the same run through their launcher and compare with :func:`assert_same_run`: every step
logged exactly once, the same losses, the same final weights.  Training is a pure function of
(seed, rank, step), so the launcher and the restarts must not matter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backbones import tiny

REPO = Path(__file__).resolve().parent.parent
TINY2 = tiny("vit") + [
    "data.n_local=2",
    "optim.batch_size=8", "optim.iters_per_epoch=10", "optim.warmup_epochs=1",
    "loss.ibot_start_epoch=1", "loss.warmup_teacher_temp_epochs=1", "data.num_workers=0",
    "train.log_every=1", "dist.engine=ddp",
]
RESTART_STEPS = 30
# checkpoint every 4 steps: a rank killed once step 9 is logged loses at most steps 8-9
RESTART_RUN = [*TINY2, "optim.epochs=3", "train.checkpoint_every=4", "train.device=cpu", "train.progress=false"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE"}
LOSS_KEYS = ("loss", "intact/dino", "intact/ibot", "elastic/dino", "elastic/same_view", "lr", "width", "depth",
             "grad_norm", "teacher_temp")


def metrics(out: Path) -> list:
    f = Path(out) / "metrics.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()] if f.exists() else []


def assert_same_run(ref_dir: Path, got_dir: Path, steps: int) -> None:
    from poa_hpc.checkpoint.layout import load_checkpoint

    ref, got = metrics(ref_dir), metrics(got_dir)
    assert [r["step"] for r in got] == list(range(steps)), [r["step"] for r in got]  # each step exactly once
    for a, b in zip(ref, got):
        for k in LOSS_KEYS:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-7), (a["step"], k)
    ra, rb = load_checkpoint(ref_dir), load_checkpoint(got_dir)
    assert ra["step"] == rb["step"] == steps
    for k, v in ra["model"].items():
        torch.testing.assert_close(rb["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="session")
def ddp2_reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp2_reference")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_", "TORCHELASTIC_"))}
    r = subprocess.run([sys.executable, "-m", "poa_hpc", "train", "--nproc", "2", "--config", "configs/demo_cpu.yaml",
                        *RESTART_RUN, f"train.output_dir={out}"], capture_output=True, text=True,
                       env={**env, **ONE_THREAD}, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [m["step"] for m in metrics(out)] == list(range(RESTART_STEPS))
    return out
