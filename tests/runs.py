"""Helpers for tests that run `poa train` in real processes (1 process, or 2 under torchrun with gloo)
and compare runs step by step."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from poa_hpc.checkpoint.layout import load_checkpoint

# One thread per process: bitwise-reproducible CPU arithmetic, and two ranks fit on two cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE", "DS_ACCELERATOR": "cpu"}
RUN = [
    "data.n_local=2", "data.num_workers=0", "optim.iters_per_epoch=4", "optim.epochs=2", "optim.warmup_epochs=1",
    "loss.ibot_start_epoch=1", "loss.warmup_teacher_temp_epochs=1", "train.log_every=1", "train.progress=false",
    "train.eval_every=0",
]
# KoLeo's nearest neighbours and drop-path masks are per-rank statistics (as DINOv2): off where a
# W-rank run is compared with one process.
SAME_AS_ONE_PROCESS = ["loss.koleo_weight=0.0"]
# ZeRO's flat fp32 partitions step every parameter every step, so a parameter without a gradient yet
# (the mask token before iBOT starts) still advances AdamW's step count there; with iBOT on from
# step 0 every parameter has a gradient from the first step and the runs are comparable.
IBOT_FROM_START = ["loss.ibot_start_epoch=0"]
ZERO3_SMALL = "dist.deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0}}"  # shard tiny params too
GLOBAL_BATCH = 16


def train_cmd(out, nproc, engine, overrides, resume=False):
    cmd = [sys.executable, "-m", "poa_hpc", "train", "--config", "configs/demo_cpu.yaml", "--nproc", str(nproc)]
    cmd += ["--resume"] if resume else []
    return cmd + [*overrides, f"dist.engine={engine}", f"optim.batch_size={GLOBAL_BATCH // nproc}",
                  f"train.output_dir={out}"]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def train(out, nproc, engine, *overrides, resume=False):
    r = subprocess.run(train_cmd(out, nproc, engine, overrides, resume), capture_output=True, text=True, env=ENV,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return metrics(out)


def train_killed(out, nproc, engine, *overrides, after_step):
    """Start a run and SIGKILL its whole process group (launcher, ranks, workers) once ``after_step`` is logged."""
    p = subprocess.Popen(train_cmd(out, nproc, engine, overrides), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=ENV, start_new_session=True)
    f = Path(out) / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:
        if f.exists() and any(json.loads(ln)["step"] >= after_step for ln in f.read_text().splitlines() if ln.strip()):
            break
        if p.poll() is not None:
            pytest.fail("run ended before it could be killed:\n" + p.stdout.read()[-3000:])
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)


def assert_same_run(a, b, rel=2e-5, ibot=True):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    if ibot:
        assert any("intact/ibot" in r for r in a)
    assert all("collapse/logit_spread_h1" in r for r in a + b)  # the watchdog's statistics, averaged over ranks
    for x, y in zip(a, b):
        assert (x["width"], x["depth"]) == (y["width"], y["depth"])
        for k in ("loss", "intact/dino", "elastic/dino", "elastic/same_view", "intact/ibot", "grad_norm",
                  "collapse/teacher_entropy_h0", "collapse/student_entropy_h1", "collapse/logit_spread_h0"):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=rel, abs=1e-6), (x["step"], k, x[k], y[k])


def assert_same_weights(dir_a, dir_b, tol=1e-5):
    a = load_checkpoint(Path(dir_a) / "checkpoints")["model"]
    b = load_checkpoint(Path(dir_b) / "checkpoints")["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=tol, atol=tol, msg=k)
