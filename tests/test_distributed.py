"""Real 2-process runs (torchrun, gloo, CPU) of the whole POA step, against one process.

With the same global batch, a W-rank step must equal the single-process step: the loader
splits one global batch (crops and masks included), Sinkhorn-Knopp normalises over all
ranks, every loss is a per-rank mean and gradients are averaged.  KoLeo is off here (it
is a per-rank nearest-neighbour statistic, as in DINOv2) and so is drop-path (per-sample
masks are drawn per rank).  A wrong reduction, an EMA on unsynchronised weights or a
batch split that is not the global batch makes these runs diverge.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from poa_hpc.train.checkpoint import load_checkpoint

BASE = [
    "model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=4", "model.num_heads=4",
    "model.elastic.min_width=16", "model.elastic.width_step=8", "model.elastic.min_depth=2",
    "head.prototypes=[32,48]", "head.hidden_dim=32", "head.bottleneck_dim=16",
    "data.digits_size=16", "data.global_size=16", "data.local_size=8", "data.n_local=2", "data.num_workers=0",
    "optim.iters_per_epoch=4", "optim.epochs=2", "optim.warmup_epochs=1",
    "loss.ibot_start_epoch=1", "loss.warmup_teacher_temp_epochs=1", "loss.koleo_weight=0.0",
    "model.drop_path_rate=0.0", "train.log_every=1", "train.progress=false",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE", "DS_ACCELERATOR": "cpu"}
# ZeRO's flat fp32 partitions step every parameter every step, so a parameter without a gradient yet
# (the mask token before iBOT starts) still advances AdamW's step count there; with iBOT on from
# step 0 every parameter has a gradient from the first step and the runs are comparable.
IBOT_FROM_START = ["loss.ibot_start_epoch=0"]
ZERO3_SMALL = "dist.deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0}}"  # shard tiny params too
GLOBAL_BATCH = 16


def train(out, nproc, engine, *extra, resume=False):
    cmd = [sys.executable, "-m", "poa_hpc", "train", "--config", "configs/demo_cpu.yaml", "--nproc", str(nproc)]
    cmd += ["--resume"] if resume else []
    cmd += BASE + [f"dist.engine={engine}", f"optim.batch_size={GLOBAL_BATCH // nproc}", f"train.output_dir={out}",
                   *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b, rel=2e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert any("intact/ibot" in r for r in a)  # iBOT active in the second epoch
    for x, y in zip(a, b):
        assert (x["width"], x["depth"]) == (y["width"], y["depth"])
        for k in ("loss", "intact/dino", "elastic/dino", "elastic/same_view", "intact/ibot", "grad_norm"):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=rel, abs=1e-6), (x["step"], k, x[k], y[k])


def assert_same_weights(dir_a, dir_b, tol=1e-5):
    a = load_checkpoint(Path(dir_a) / "checkpoints")["model"]
    b = load_checkpoint(Path(dir_b) / "checkpoints")["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=tol, atol=tol, msg=k)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return out, train(out, 1, "none", "model.elastic.rank_sampling=shared")


@pytest.mark.parametrize("engine,extra", [("fsdp", ()), ("ddp", ()), ("fsdp", ("dist.activation_checkpointing=true",))])
def test_two_processes_match_one(single, tmp_path, engine, extra):
    ref_dir, ref = single
    got = train(tmp_path / engine, 2, engine, "model.elastic.rank_sampling=shared", *extra)
    assert_same_run(ref, got)
    assert_same_weights(ref_dir, tmp_path / engine)  # student and EMA teacher


def test_fsdp_per_rank_subnetworks_match_replicated(tmp_path):
    """Each rank trains its own sub-network (the paper's default): sharded == replicated.

    Ranks run different depths, so FSDP2's per-block collectives stay aligned only because
    skipped blocks run on an empty batch; the replicated engine has no such collectives.
    """
    a = train(tmp_path / "ddp", 2, "ddp")
    b = train(tmp_path / "fsdp", 2, "fsdp")
    assert_same_run(a, b)
    assert_same_weights(tmp_path / "ddp", tmp_path / "fsdp")


def test_fsdp_sharded_checkpoint_resumes_on_another_world_size(single, tmp_path):
    """2 ranks to step 4 (sharded DCP checkpoints of steps 2 and 4), then 1 rank with the same global
    batch to the end; the newest sharded checkpoint has a torn shard file, so the resume falls back to step 2."""
    ref_dir, ref = single
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    train(out, 2, "fsdp", "model.elastic.rank_sampling=shared", "train.max_steps=4", "train.checkpoint_every=2")
    assert json.loads((ckpts / "step_00000004_dcp" / "meta.json").read_text())["step"] == 4
    assert json.loads((ckpts / "step_00000002_dcp" / "meta.json").read_text())["step"] == 2
    shard = max((ckpts / "step_00000004_dcp").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    got = train(out, 1, "fsdp", "model.elastic.rank_sampling=shared", resume=True)
    assert (ckpts / "step_00000004.pt.unreadable").is_file()  # set aside; steps 2-3 were trained again
    assert_same_run(ref, got)
    assert_same_weights(ref_dir, out)


def test_extract_from_fsdp_run(single, tmp_path):
    from poa_hpc.cli import main
    from poa_hpc.models.extract import load_subnet

    out = tmp_path / "run"
    train(out, 2, "fsdp", "train.max_steps=2")
    assert main(["extract", str(out), "--width", "16", "--depth", "2", "-o", str(tmp_path / "s.safetensors")]) == 0
    model, meta = load_subnet(tmp_path / "s.safetensors")
    assert meta["step"] == 2 and model.arch.embed_dim == 16


@pytest.fixture(scope="module")
def single_ibot(tmp_path_factory):
    out = tmp_path_factory.mktemp("single_ibot")
    return out, train(out, 1, "none", "model.elastic.rank_sampling=shared", *IBOT_FROM_START)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_matches_one_process(single_ibot, tmp_path, stage):
    ref_dir, ref = single_ibot
    out = tmp_path / f"zero{stage}"
    got = train(out, 2, "deepspeed", f"dist.zero_stage={stage}", ZERO3_SMALL, "model.elastic.rank_sampling=shared",
                *IBOT_FROM_START)
    assert_same_run(ref, got)
    assert_same_weights(ref_dir, out)  # last.pt holds the gathered student and teacher


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_resume_is_exact(single_ibot, tmp_path, stage):
    ref_dir, ref = single_ibot
    out = tmp_path / "run"
    common = [f"dist.zero_stage={stage}", ZERO3_SMALL, "model.elastic.rank_sampling=shared", *IBOT_FROM_START]
    train(out, 2, "deepspeed", *common, "train.max_steps=4", "train.checkpoint_every=3")
    assert (out / "checkpoints" / "deepspeed" / "latest").read_text().strip() == "step00000004"
    assert sorted(p.name for p in (out / "checkpoints" / "deepspeed").glob("step*")) == ["step00000003", "step00000004"]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*.pt")) == ["step_00000003.pt", "step_00000004.pt"]
    got = train(out, 2, "deepspeed", *common, resume=True)
    assert_same_run(ref, got)
    assert_same_weights(ref_dir, out)


def test_zero3_per_rank_subnetworks_match_replicated(tmp_path):
    """Per-rank sub-networks of different depth under ZeRO-3 (per-module gathers) == replicated."""
    a = train(tmp_path / "ddp", 2, "ddp", *IBOT_FROM_START)
    b = train(tmp_path / "z3", 2, "deepspeed", "dist.zero_stage=3", ZERO3_SMALL, *IBOT_FROM_START)
    assert_same_run(a, b)
    assert_same_weights(tmp_path / "ddp", tmp_path / "z3")
