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

from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from poa_hpc.config import POAConfig
from poa_hpc.distributed.registry import engine_names, get_engine
from poa_hpc.errors import ConfigError
from poa_hpc.perf.fake import PhasedDispatchMode

__all__ = ["CommCounter", "Collective", "step_collectives", "per_rank_bytes", "scaling_table"]

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
    from poa_hpc.perf.fake import fake_process_group, masked_tokens
    from poa_hpc.perf.memory import fake_step

    M = masked_tokens(cfg) if n_masked is None else int(n_masked)
    if engine not in comm_engines():
        raise ConfigError(f"--engine: {engine!r}, expected one of {list(comm_engines())}")
    spec = get_engine(engine)
    if spec.comm == "traced":
        counter = CommCounter()
        with fake_process_group(max(world_size, 2)):
            fake_step(cfg, max(world_size, 2), engine, sub, M, "cuda", ibot, modes=(counter,))
        return [c for c in counter.calls if c.phase != "setup"]
    # Sinkhorn-Knopp's all-reduces are the same for every engine: take them from a traced 2-rank fake step.
    traced = next(n for n in comm_engines() if get_engine(n).comm == "traced")
    counter = CommCounter()
    with fake_process_group(2):
        fake_step(cfg, 2, traced, sub, M, "cuda", ibot, modes=(counter,))
    sk = [c for c in counter.calls if c.kind == "all_reduce" and c.phase == "teacher"]
    from poa_hpc.perf.fake import meta_model

    n = sum(p.numel() for p in meta_model(cfg).student.parameters())
    shard = spec.sharding(cfg.dist)
    if not shard.optimizer:  # replicated: one flat all-reduce of the gradients (and a norm per parameter)
        return sk + [Collective("optimizer (clip + AdamW)", "all_reduce", 4 * n + 4 * len(list(
            meta_model(cfg).student.parameters())))]
    out = list(sk)
    if shard.params:  # parameters gathered for every forward and backward, as FSDP2 without mixed precision
        out += [c for c in step_collectives(cfg, world_size, traced, sub=sub, n_masked=M, ibot=ibot)
                if c.kind != "all_reduce"]
    elif shard.grads:  # gradients reduce-scattered after each backward pass, updated parameters gathered
        out += [Collective("intact", "reduce_scatter", 4 * n), Collective("elastic", "reduce_scatter", 4 * n),
                Collective("optimizer (clip + AdamW)", "all_gather", 4 * n)]
    else:  # optimizer states sharded: gradients reduced once (at the accumulation boundary), parameters gathered
        out += [Collective("elastic", "reduce_scatter", 4 * n), Collective("optimizer (clip + AdamW)",
                                                                            "all_gather", 4 * n)]
    return out


def comm_engines() -> tuple:
    """The registered engines ``poa estimate comm`` can estimate (the distributed ones)."""
    return tuple(n for n in engine_names() if get_engine(n).distributed and get_engine(n).comm)


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
