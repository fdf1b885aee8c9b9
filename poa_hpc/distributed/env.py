"""Process-group set-up from the launcher's environment: torchrun, or Slurm's srun.

torchrun exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``.  A task started by ``srun`` (directly, from an sbatch script or
through submitit) has Slurm's variables instead; :func:`slurm_launch_env` maps
them: rank ``SLURM_PROCID``, world ``SLURM_STEP_NUM_TASKS``, local rank
``SLURM_LOCALID``, master the first host of ``SLURM_STEP_NODELIST`` and a port
derived from the job id (or ``MASTER_PORT`` if set), so nobody sets
``MASTER_ADDR`` by hand.  torchrun's variables win when both are present
(``srun torchrun ...``).
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def expand_nodelist(nodelist: str) -> List[str]:
    """Slurm's compressed host list as names: ``"gpu[01-03,07],login1"`` -> gpu01 gpu02 gpu03 gpu07 login1.

    Handles several bracket groups per name (``rack[1-2]-n[1-2]``) and keeps
    zero padding; the same expansion as ``scontrol show hostnames``.
    """
    hosts: List[str] = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip()):
        parts: List[str] = [""]
        for text, group in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            expanded: List[str] = []
            if group:
                for rng in group.split(","):
                    lo, _, hi = rng.partition("-")
                    if hi:
                        width = len(lo)
                        expanded += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
                    else:
                        expanded.append(lo)
            else:
                expanded = [""]
            parts = [p + text + e for p in parts for e in expanded]
        hosts += [p for p in parts if p]
    return hosts


def slurm_launch_env(environ: Mapping[str, str] = os.environ) -> Optional[Dict[str, str]]:
    """torchrun-style variables for a task of an ``srun`` step, or ``None`` outside one.

    Only job *steps* count (``SLURM_STEP_NUM_TASKS`` is set by srun, not in the
    batch script itself, where one process must not wait for others).
    """
    if "SLURM_PROCID" not in environ or "SLURM_STEP_NUM_TASKS" not in environ:
        return None
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise RuntimeError("Slurm task without SLURM_STEP_NODELIST/SLURM_JOB_NODELIST: cannot find the master host")
    hosts = expand_nodelist(nodelist)
    job = int(environ.get("SLURM_JOB_ID", "0") or 0)
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or hosts[0],
        # a port per job, so two jobs sharing a node do not collide; same port after a requeue
        "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + job % 20000),
    }


def init_distributed(device_kind: str = "auto", timeout_s: int = 1800) -> DistContext:
    """Join the process group of this launch (torchrun's or srun's variables), if any.

    NCCL on CUDA, gloo on CPU.  A single process without those variables gets a
    trivial context and no process group.  Under srun the Slurm variables are
    exported as torchrun's (see :func:`slurm_launch_env`) so libraries that read
    them (DeepSpeed) see the same world.
    """
    use_cuda = torch.cuda.is_available() and device_kind in ("auto", "cuda")
    if device_kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    if "RANK" not in os.environ:
        slurm = slurm_launch_env()
        if slurm is not None:
            os.environ.update(slurm)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        # one task per GPU: all of the node's GPUs visible (index by local rank), or one bound to the task
        local_device = local % torch.cuda.device_count()
        torch.cuda.set_device(local_device)
        device = torch.device("cuda", local_device)
    else:
        device = torch.device("cpu")
    launched = "MASTER_ADDR" in os.environ and "RANK" in os.environ  # torchrun, even with one process
    if (world > 1 or launched) and not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun or `poa train --nproc N`")
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank, world, local, device)


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: dict, device: torch.device) -> dict:
    """Mean of a dict of floats over ranks (one collective)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
