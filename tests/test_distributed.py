"""Real 2-process runs (torchrun, gloo, CPU) of the whole POA step, against one process.

With the same global batch, a W-rank step must equal the single-process step: the loader
splits one global batch (crops and masks included), Sinkhorn-Knopp normalises over all
ranks, every loss is a per-rank mean and gradients are averaged.  KoLeo is off here (it
is a per-rank nearest-neighbour statistic, as in DINOv2) and so is drop-path (per-sample
masks are drawn per rank).  A wrong reduction, an EMA on unsynchronised weights or a
batch split that is not the global batch makes these runs diverge.
"""

import json

import pytest

from backbones import tiny
from runs import IBOT_FROM_START, RUN, SAME_AS_ONE_PROCESS, ZERO3_SMALL, assert_same_run, assert_same_weights
from runs import train as _train

pytestmark = pytest.mark.slow  # real 2-process runs (torchrun, gloo): minutes in all

BASE = tiny("vit") + RUN + SAME_AS_ONE_PROCESS + ["model.vit.drop_path_rate=0.0"]


def train(out, nproc, engine, *extra, resume=False):
    return _train(out, nproc, engine, *BASE, *extra, resume=resume)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return out, train(out, 1, "none", "model.rank_sampling=shared")


@pytest.mark.parametrize("engine,extra", [("fsdp", ()), ("ddp", ()), ("fsdp", ("dist.activation_checkpointing=true",))])
def test_two_processes_match_one(single, tmp_path, engine, extra):
    ref_dir, ref = single
    got = train(tmp_path / engine, 2, engine, "model.rank_sampling=shared", *extra)
    assert_same_run(ref, got)
    assert_same_weights(ref_dir, tmp_path / engine)  # student and EMA teacher


@pytest.mark.parametrize("extra", [(), ("model.vit.drop_path_rate=0.3", "model.drop_path_mode=subset")],
                         ids=["no-drop-path", "subset-drop-path"])
def test_fsdp_per_rank_subnetworks_match_replicated(tmp_path, extra):
    """Each rank trains its own sub-network (the paper's default): sharded == replicated.

    Ranks run different depths, so FSDP2's per-block collectives stay aligned only because
    skipped blocks run on an empty batch; the replicated engine has no such collectives.  With
    subset stochastic depth each rank draws the same subsets under both engines (the skipped
    blocks' empty batches draw nothing).
    """
    a = train(tmp_path / "ddp", 2, "ddp", *extra)
    b = train(tmp_path / "fsdp", 2, "fsdp", *extra)
    assert_same_run(a, b)
    assert_same_weights(tmp_path / "ddp", tmp_path / "fsdp")


def test_fsdp_sharded_checkpoint_resumes_on_another_world_size(single, tmp_path):
    """2 ranks to step 4 (sharded DCP checkpoints of steps 2 and 4), then 1 rank with the same global
    batch to the end; the newest sharded checkpoint has a torn shard file, so the resume falls back to step 2."""
    ref_dir, ref = single
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    train(out, 2, "fsdp", "model.rank_sampling=shared", "train.max_steps=4", "train.checkpoint_every=2")
    assert json.loads((ckpts / "step_00000004_dcp" / "meta.json").read_text())["step"] == 4
    assert json.loads((ckpts / "step_00000002_dcp" / "meta.json").read_text())["step"] == 2
    shard = max((ckpts / "step_00000004_dcp").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    got = train(out, 1, "fsdp", "model.rank_sampling=shared", resume=True)
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
    return out, train(out, 1, "none", "model.rank_sampling=shared", *IBOT_FROM_START)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_matches_one_process(single_ibot, tmp_path, stage):
    ref_dir, ref = single_ibot
    out = tmp_path / f"zero{stage}"
    got = train(out, 2, "deepspeed", f"dist.zero_stage={stage}", ZERO3_SMALL, "model.rank_sampling=shared",
                *IBOT_FROM_START)
    assert_same_run(ref, got)
    assert_same_weights(ref_dir, out)  # last.pt holds the gathered student and teacher


@pytest.mark.parametrize("stage", [3])  # ZeRO-2 resume: test_backbones_distributed (every family, after a SIGKILL)
def test_deepspeed_resume_is_exact(single_ibot, tmp_path, stage):
    ref_dir, ref = single_ibot
    out = tmp_path / "run"
    common = [f"dist.zero_stage={stage}", ZERO3_SMALL, "model.rank_sampling=shared", *IBOT_FROM_START]
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
