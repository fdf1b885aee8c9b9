"""Communication per step and rank, per engine, and the step-time floor it sets as the world grows.

``fsdp``: the collectives FSDP2 issues in one step are recorded from the fake step of
:mod:`poa_hpc.perf.memory` (real ``fully_shard`` units, mixed-precision policy, resharding,
activation checkpointing, the per-rank skipped-block alignment): every all-gather of a unit's
parameters (teacher forward; each student forward call, the backbone is called for global and
local crops; backward re-gathers), every reduce-scatter of gradients, and Sinkhorn-Knopp's
all-reduces.  ``ddp``: one flat fp32 all-reduce of the student's gradients (plus the same
Sinkhorn-Knopp all-reduces).  ``deepspeed``: ZeRO's volumes from the parameter count
(Rajbhandari et al. 2020), stage 2 reduce-scattering after each of the step's two backward passes.

Bytes per rank follow ring algorithms: an all-gather or reduce-scatter of a tensor of S bytes moves
S (N - 1) / N per rank, an all-reduce twice that.  With a link bandwidth per GPU (``--link-gbps``,
e.g. 200 Gb/s InfiniBand) and a per-hop latency, the communication time per step is a floor on the
step time; the compute time is the step's critical-path FLOPs (per_rank sampling: the largest
elastic sub-network over N ranks, which grows with N) at an assumed MFU.  The table gives both and
the step time with perfect overlap (max) and none (sum), and the scaling efficiency against 8 GPUs.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from poa_hpc.config import POAConfig
from poa_hpc.errors import ConfigError
from poa_hpc.perf.fake import PhasedDispatchMode

__all__ = ["CommCounter", "Collective", "step_collectives", "per_rank_bytes", "scaling_table", "estimate_comm_cli"]

# c10d ops -> (kind, index of the tensor argument whose size is the collective's S)
_OPS = {
    "c10d._allgather_base_": ("all_gather", 0),  # (output, input, ...): S = output
    "c10d.allgather_into_tensor_coalesced_": ("all_gather", 0),
    "c10d._reduce_scatter_base_": ("reduce_scatter", 1),  # (output, input, ...): S = input
    "c10d.reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "c10d.allreduce_": ("all_reduce", 0),
    "c10d.allreduce_coalesced_": ("all_reduce", 0),
    "c10d.broadcast_": ("broadcast", 0),
}


@dataclass
class Collective:
    phase: str
    kind: str
    nbytes: int  # S: the gathered / reduced tensor's bytes


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


class CommCounter(PhasedDispatchMode):
    """Records the c10d collectives dispatched while active, with the step part current at the time."""

    def __init__(self):
        super().__init__()
        self.calls: List[Collective] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        spec = _OPS.get(str(func.overloadpacket))
        if spec is not None:
            kind, i = spec
            self.calls.append(Collective(self.phase_name, kind, _nbytes(args[i])))
        return func(*args, **(kwargs or {}))


def ring_factor(kind: str, n: int) -> float:
    """Bytes each rank sends (= receives) per byte of the collective's tensor, ring algorithms."""
    if n <= 1:
        return 0.0
    return {"all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n, "all_reduce": 2 * (n - 1) / n,
            "broadcast": 1.0}[kind]


def step_collectives(cfg: POAConfig, world_size: int, engine: str = "fsdp", *, sub=None,
                     n_masked: Optional[int] = None, ibot: bool = True) -> List[Collective]:
    """The collectives of one step on one rank (sizes S) for ``engine`` at ``world_size``."""
    from poa_hpc.perf.fake import masked_tokens
    from poa_hpc.perf.memory import _fake_step, fake_process_group

    M = masked_tokens(cfg) if n_masked is None else int(n_masked)
    if engine == "fsdp":
        counter = CommCounter()
        with fake_process_group(max(world_size, 2)):
            _fake_step(cfg, max(world_size, 2), "fsdp", sub, M, "cuda", ibot, modes=(counter,))
        return [c for c in counter.calls if c.phase != "setup"]
    # Sinkhorn-Knopp's all-reduces are the same for every engine: take them from a one-process fake step.
    counter = CommCounter()
    with fake_process_group(2):
        _fake_step(cfg, 2, "fsdp", sub, M, "cuda", ibot, modes=(counter,))
    sk = [c for c in counter.calls if c.kind == "all_reduce" and c.phase == "teacher"]
    from poa_hpc.perf.fake import meta_model

    n = sum(p.numel() for p in meta_model(cfg).student.parameters())
    if engine == "ddp":
        return sk + [Collective("optimizer (clip + AdamW)", "all_reduce", 4 * n + 4 * len(list(
            meta_model(cfg).student.parameters())))]
    if engine == "deepspeed":
        stage = int(cfg.dist.zero_stage)
        out = list(sk)
        if stage == 1:  # gradients reduced once (at the accumulation boundary), updated parameters gathered
            out += [Collective("elastic", "reduce_scatter", 4 * n), Collective("optimizer (clip + AdamW)",
                                                                                "all_gather", 4 * n)]
        elif stage == 2:  # gradients reduce-scattered after each backward pass
            out += [Collective("intact", "reduce_scatter", 4 * n), Collective("elastic", "reduce_scatter", 4 * n),
                    Collective("optimizer (clip + AdamW)", "all_gather", 4 * n)]
        else:  # parameters gathered for every forward and backward, as FSDP2 without mixed precision
            out += [c for c in step_collectives(cfg, world_size, "fsdp", sub=sub, n_masked=M, ibot=ibot)
                    if c.kind != "all_reduce"]
        return out
    raise ConfigError(f"--engine: {engine!r}, expected fsdp, ddp or deepspeed")


def per_rank_bytes(calls: Sequence[Collective], n: int) -> Dict[str, float]:
    """Bytes sent per rank by phase and kind (``"<phase>/<kind>"``) at world size ``n``."""
    out: Dict[str, float] = defaultdict(float)
    for c in calls:
        out[f"{c.phase}/{c.kind}"] += c.nbytes * ring_factor(c.kind, n)
    return dict(out)


def scaling_table(calls: Sequence[Collective], compute_s: Dict[int, float], link_gbps: float,
                  hop_latency_us: float, batch: int) -> List[dict]:
    """Per world size: communication volume and time, compute time, step time with perfect / no overlap,
    img/s and the efficiency against the smallest world size of the table."""
    rows = []
    base = None
    bw = link_gbps * 1e9 / 8
    for n, comp in sorted(compute_s.items()):
        volume = sum(per_rank_bytes(calls, n).values())
        latency = sum((n - 1) * hop_latency_us * 1e-6 * (2 if c.kind == "all_reduce" else 1) for c in calls)
        comm = volume / bw + latency
        overlap, serial = max(comp, comm), comp + comm
        ips = n * batch / overlap
        if base is None:
            base = (n, ips)
        rows.append({"world_size": n, "comm_bytes_per_rank": volume, "comm_s": comm, "latency_s": latency,
                     "compute_s": comp, "step_s_overlap": overlap, "step_s_serial": serial, "img_per_s": ips,
                     "efficiency": ips / (base[1] * n / base[0]), "collectives": len(calls)})
    return rows


# ---------------------------------------------------------------------------- CLI
def estimate_comm_cli(argv: List[str]) -> int:
    import time

    from poa_hpc.bench.common import write_result
    from poa_hpc.models.registry import get_backbone
    from poa_hpc.perf.cli import _common, _config, _peak, _sub
    from poa_hpc.perf.flops import expected_max, expected_step

    p = argparse.ArgumentParser(prog="poa estimate comm", description="Communication per step and rank (from the "
                                "collectives of a fake step) and the step-time floor per world size.")
    _common(p)
    p.add_argument("--engine", choices=("fsdp", "ddp", "deepspeed"), default="fsdp")
    p.add_argument("--world-size", type=int, default=32, help="world size of the per-phase table (default 32)")
    p.add_argument("--world-sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512])
    p.add_argument("--link-gbps", type=float, default=200.0, help="link bandwidth per GPU, Gb/s (200: HDR InfiniBand)")
    p.add_argument("--hop-latency-us", type=float, default=5.0, help="latency per ring hop and collective, us")
    p.add_argument("--peak", default="H100", help="device name or TFLOP/s for the compute time")
    p.add_argument("--mfu", type=float, default=0.4, help="MFU of the compute time")
    p.add_argument("--masked", type=int, help="masked patches per rank (default: the mean of DINOv2's plan)")
    args = p.parse_args(argv)
    if args.link_gbps <= 0 or not 0 < args.mfu <= 1 or args.world_size < 2 or min(args.world_sizes) < 2:
        raise ConfigError("--link-gbps must be > 0, --mfu in (0, 1], world sizes >= 2")
    cfg = _config(args)
    peak_name, peak = _peak(args.peak)
    t0 = time.perf_counter()
    say = (lambda s: None)
    calls = step_collectives(cfg, args.world_size, args.engine, n_masked=args.masked)
    N = args.world_size
    by = per_rank_bytes(calls, N)
    counts: Dict[str, int] = defaultdict(int)
    for c in calls:
        counts[f"{c.phase}/{c.kind}"] += 1
    print(f"Communication per step and rank (predicted from the collectives of a fake step): {cfg.model.arch}, "
          f"{args.engine}, {N} ranks, ring algorithms")
    print(f"{'part / collective':<44}{'calls':>7}{'MB sent':>11}")
    for k in sorted(by):
        print(f"{k:<44}{counts[k]:>7}{by[k] / 1e6:>11.1f}")
    total = sum(by.values())
    print(f"{'step':<44}{len(calls):>7}{total / 1e6:>11.1f}")
    space = get_backbone(cfg.model.arch).space(cfg.model.section)
    exp = expected_step(cfg, 1, n_masked=args.masked, progress=say)
    probs = space.probabilities()
    ranks = (lambda n: n if cfg.model.rank_sampling == "per_rank" else 1)
    compute = {n: (exp["fixed"] + expected_max(exp["elastic"], probs, ranks(n))) / (args.mfu * peak * 1e12)
               for n in args.world_sizes}
    rows = scaling_table(calls, compute, args.link_gbps, args.hop_latency_us, cfg.optim.batch_size)
    print(f"\nStep-time floor per world size: {args.link_gbps:g} Gb/s per GPU, {args.hop_latency_us:g} us per ring hop; "
          f"compute = critical-path FLOPs at MFU {args.mfu:g} of {peak_name} ({peak:g} TFLOP/s)")
    print(f"{'GPUs':>6}{'GB/rank':>9}{'comm s':>9}{'compute s':>11}{'step s (overlap)':>18}{'(serial)':>10}"
          f"{'img/s':>10}{'efficiency':>12}")
    for r in rows:
        print(f"{r['world_size']:>6}{r['comm_bytes_per_rank'] / 1e9:>9.2f}{r['comm_s']:>9.3f}{r['compute_s']:>11.3f}"
              f"{r['step_s_overlap']:>18.3f}{r['step_s_serial']:>10.3f}{r['img_per_s']:>10.0f}"
              f"{100 * r['efficiency']:>11.0f}%")
    print(f"({time.perf_counter() - t0:.0f} s)")
    write_result("comm", rows, args.out, {
        "config": args.config, "overrides": args.overrides, "engine": args.engine, "world_size": N,
        "per_rank_bytes": by, "calls": dict(counts), "link_gbps": args.link_gbps,
        "hop_latency_us": args.hop_latency_us, "mfu": args.mfu, "peak_tflops": peak},
        device="none (fake tensors)")
    return 0
