"""Communication per step: FSDP2's collectives from a fake step against the parameter shapes by hand; ring volumes;
the scaling table; the CLI."""

import json
import math

import pytest

from backbones import tiny
from poa_hpc.cli import main
from poa_hpc.config import load_config
from poa_hpc.perf.comm import Collective, per_rank_bytes, ring_factor, scaling_table, step_collectives
from poa_hpc.perf.fake import meta_model


def _padded(numel_dim0, rest, n):
    return math.ceil(numel_dim0 / n) * n * rest


def test_fsdp_collectives_match_the_parameter_shapes():
    """Teacher forward: one bf16 all-gather per unit; each student branch: fp32 reduce-scatters of every unit's
    gradients.  FSDP2 pads each parameter's first dimension to a multiple of the world size."""
    n = 4
    cfg = load_config("configs/demo_cpu.yaml", tiny() + ["optim.batch_size=4", "data.n_local=1"])
    calls = step_collectives(cfg, n, "fsdp", n_masked=3)
    params = list(meta_model(cfg).student.parameters())
    padded = sum(_padded(p.shape[0], p.numel() // p.shape[0], n) if p.dim() else n for p in params)
    teacher = [c for c in calls if c.phase == "teacher" and c.kind == "all_gather"]
    units = len(cfg.head.prototypes) + cfg.model.vit.depth + 1  # heads, blocks, the backbone root
    assert len(teacher) == units
    assert sum(c.nbytes for c in teacher) == 2 * padded  # bf16 parameters
    for branch in ("intact", "elastic"):
        rs = [c for c in calls if c.phase == branch and c.kind == "reduce_scatter"]
        assert len(rs) == units and sum(c.nbytes for c in rs) == 4 * padded  # fp32 gradient reduction
        ag = [c for c in calls if c.phase == branch and c.kind == "all_gather"]
        assert len(ag) > units  # blocks re-gathered for the local crops' call and for backward
    sk = [c for c in calls if c.kind == "all_reduce"]
    assert len(sk) == len(cfg.head.prototypes) * 2 * (1 + cfg.loss.sinkhorn_iters)  # [CLS] and patches per head


def test_ring_volumes_and_scaling_table():
    calls = [Collective("intact", "all_gather", 1000), Collective("intact", "all_reduce", 10)]
    assert ring_factor("all_gather", 4) == 0.75 and ring_factor("all_reduce", 4) == 1.5
    assert per_rank_bytes(calls, 4) == {"intact/all_gather": 750.0, "intact/all_reduce": 15.0}
    rows = scaling_table(calls, {8: 1.0, 16: 1.0}, link_gbps=8e-6, hop_latency_us=0.0, batch=10)  # 1000 B/s
    assert rows[0]["comm_s"] == pytest.approx((1000 * 7 / 8 + 10 * 2 * 7 / 8) / 1000)
    assert rows[1]["step_s_overlap"] == pytest.approx(max(1.0, (1000 * 15 / 16 + 10 * 2 * 15 / 16) / 1000))
    assert rows[0]["efficiency"] == 1.0 and rows[1]["img_per_s"] == pytest.approx(160 / rows[1]["step_s_overlap"])


def test_estimate_comm_cli(tmp_path, capsys):
    assert main(["estimate", "comm", "--config", "configs/demo_cpu.yaml", "--world-size", "4", "--world-sizes", "8",
                 "64", "--out", str(tmp_path), *tiny()]) == 0
    out = capsys.readouterr().out
    assert "teacher/all_gather" in out and "efficiency" in out
    (path,) = tmp_path.glob("comm_*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["world_size"] for r in rows] == [8, 64] and rows[1]["comm_s"] > rows[0]["comm_s"]
    assert main(["estimate", "comm", "--config", "configs/demo_cpu.yaml", "--link-gbps", "0"]) == 2


def test_reshard_after_forward_false_gathers_once_per_branch():
    """dist.reshard_after_forward=false keeps each student unit gathered from its forward calls (global and local
    crops) to its backward, instead of gathering it for each call and again in backward; the teacher, which has no
    backward, still reshards, so the EMA meets sharded teacher and student parameters."""
    cfg = load_config("configs/demo_cpu.yaml", tiny() + ["optim.batch_size=4", "data.n_local=1"])
    units = len(cfg.head.prototypes) + cfg.model.vit.depth + 1
    default = step_collectives(cfg, 4, "fsdp", n_masked=3)
    cfg.dist.reshard_after_forward = False
    kept = step_collectives(cfg, 4, "fsdp", n_masked=3)  # the step runs through the EMA
    for branch in ("intact", "elastic"):
        n_default = sum(c.phase == branch and c.kind == "all_gather" for c in default)
        n_kept = sum(c.phase == branch and c.kind == "all_gather" for c in kept)
        assert units <= n_kept <= 2 * units < n_default, (branch, n_kept, n_default)
    assert sum(c.phase == "teacher" and c.kind == "all_gather" for c in kept) == units
