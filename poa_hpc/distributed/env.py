"""Process-group set-up from the launcher's environment: torchrun, or Slurm's srun.

torchrun exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``.  A task started by ``srun`` (directly, from an sbatch script or
through submitit) has Slurm's variables instead; :func:`slurm_launch_env` maps
them: rank ``SLURM_PROCID``, world ``SLURM_STEP_NUM_TASKS``, local rank
``SLURM_LOCALID``, master the first host of ``SLURM_STEP_NODELIST``, so nobody
sets ``MASTER_ADDR`` by hand.  torchrun's variables win when both are present
(``srun torchrun ...``).

The master port of an srun launch is not derived from the job id (two jobs on
one node whose ids differ by the modulus would share it, and a rank could join
the other job's store): rank 0 listens on a port the kernel picks free, and
publishes it in the run folder (``<train.output_dir>/status/``, on the shared
file system the checkpoints already need) under a name unique to the job, step
and restart; the other ranks read it there.  The store also carries that
identity, and a rank that finds another one fails loudly.  A ``MASTER_PORT``
set in the environment is used as given.

Every collective waits at most ``dist.timeout_s`` (:func:`init_distributed`'s
``timeout_s``) for the other ranks; with NCCL, asynchronous error handling is
on, so a rank stuck in a collective past it is ended by NCCL's watchdog.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.distributed as dist

log = logging.getLogger("poa_hpc.distributed")
NCCL_ASYNC_ERROR_VARS = ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING")  # current and older name
_LAUNCH_KEY = "poa/launch"


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
    env = {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or hosts[0],
    }
    if environ.get("MASTER_PORT"):  # else init_distributed has rank 0 pick a free one (see the module doc)
        env["MASTER_PORT"] = environ["MASTER_PORT"]
    return env


def setup_logging(verbose: bool) -> None:
    """One voice per job: rank 0 logs at INFO, the other ranks only warn (torchrun's or srun's rank)."""
    rank = os.environ.get("RANK") or (slurm_launch_env() or {}).get("RANK", "0")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING if rank != "0" else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def slurm_launch_id(environ: Mapping[str, str] = os.environ) -> str:
    """This srun step's identity: job, step and restart (a requeued job runs its steps again)."""
    return (f"{environ.get('SLURM_JOB_ID', '0')}.{environ.get('SLURM_STEP_ID', '0')}"
            f".r{environ.get('SLURM_RESTART_COUNT', '0') or '0'}")


def _slurm_store(rank: int, world: int, timeout: datetime.timedelta, rendezvous_dir: Optional[Path]):
    """The TCPStore of an srun launch without ``MASTER_PORT``: rank 0 serves it on a free port that it
    publishes in ``rendezvous_dir`` (see the module doc).  Returns (store, port, published file)."""
    host = os.environ["MASTER_ADDR"]
    ident = slurm_launch_id()
    deadline = time.monotonic() + timeout.total_seconds()
    if rendezvous_dir is None:  # no shared folder given (e.g. a benchmark): the job's port, checked below
        port = 20000 + int(os.environ.get("SLURM_JOB_ID", "0") or 0) % 20000
        try:
            store = dist.TCPStore(host, port, world, rank == 0, timeout, wait_for_workers=False)
        except RuntimeError as exc:
            raise RuntimeError(f"rank {rank}: the master port {port} derived from the job id is not usable on {host} "
                               f"({str(exc).strip().splitlines()[0]}); set MASTER_PORT to a free port") from None
        if rank == 0:
            store.set(_LAUNCH_KEY, ident)
        published = None
    else:
        published = Path(rendezvous_dir) / f"rendezvous_{ident}.json"
        if rank == 0:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("", 0))  # the kernel's choice: no other listener on this node has it
            sock.listen(1024)
            port = sock.getsockname()[1]
            store = dist.TCPStore(host, port, world, True, timeout, wait_for_workers=False,
                                  master_listen_fd=sock.detach())
            store.set(_LAUNCH_KEY, ident)
            try:
                from poa_hpc.files import atomic_write_text

                atomic_write_text(published, json.dumps({"host": host, "port": port, "launch": ident}))
            except OSError as exc:
                from poa_hpc.errors import OutputWriteError

                raise OutputWriteError(f"the run folder could not be written (rank 0 publishes its port in "
                                       f"'{published.parent}'): {exc}") from None
        else:
            while True:
                try:
                    port = int(json.loads(published.read_text())["port"])
                    break
                except (OSError, ValueError, KeyError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"rank {rank}: rank 0 did not publish its port in '{published}' within "
                                           f"{timeout.total_seconds():.0f} s (dist.timeout_s)") from None
                    time.sleep(0.1)
            store = dist.TCPStore(host, port, world, False, timeout)
    store.wait([_LAUNCH_KEY], datetime.timedelta(seconds=max(1.0, deadline - time.monotonic())))
    got = store.get(_LAUNCH_KEY).decode()
    if got != ident:
        raise RuntimeError(f"rank {rank}: the process-group store at {host}:{port} belongs to launch {got}, not to "
                           f"this one ({ident}): two jobs collided on the port; set MASTER_PORT to a free port")
    os.environ["MASTER_PORT"] = str(port)  # for libraries that read it
    return store, port, published


def _torchrun_store(rank: int, world: int, timeout: datetime.timedelta):
    """The store of a torchrun worker group, with keys under this attempt's prefix.

    torchrun restarts a failed group (``--max-restarts``) with the same agent
    store on the same port and no per-attempt prefix, so the new workers would
    read the dead ones' addresses and hang or fail connecting; the prefix
    ``TORCHELASTIC_RESTART_COUNT`` keeps each attempt's keys apart.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)  # the agent serves it
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          rank == 0 and not agent_store, timeout, multi_tenant=True)
    return dist.PrefixStore(f"poa/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def init_distributed(device_kind: str = "auto", timeout_s: float = 600,
                     rendezvous_dir: Optional[str | Path] = None) -> DistContext:
    """Join the process group of this launch (torchrun's or srun's variables), if any.

    NCCL on CUDA (with asynchronous error handling), gloo on CPU; every collective
    gives up after ``timeout_s``.  A single process without those variables gets a
    trivial context and no process group.  Under srun the Slurm variables are
    exported as torchrun's (see :func:`slurm_launch_env`) so libraries that read
    them (DeepSpeed) see the same world; ``rendezvous_dir`` (a folder all ranks
    see) is where rank 0 publishes its port.
    """
    use_cuda = torch.cuda.is_available() and device_kind in ("auto", "cuda")
    if device_kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    slurm_port = False
    if "RANK" not in os.environ:
        slurm = slurm_launch_env()
        if slurm is not None:
            os.environ.update(slurm)
            slurm_port = "MASTER_PORT" not in slurm
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        # one task per GPU: all of the node's GPUs visible (index by local rank), or one bound to the task
        local_device = local % torch.cuda.device_count()
        torch.cuda.set_device(local_device)
        device = torch.device("cuda", local_device)
        for var in NCCL_ASYNC_ERROR_VARS:  # a collective past the timeout aborts the process, not hangs it
            os.environ.setdefault(var, "1")
    else:
        device = torch.device("cpu")
    launched = "MASTER_ADDR" in os.environ and "RANK" in os.environ  # torchrun, even with one process
    if (world > 1 or launched) and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        timeout = datetime.timedelta(seconds=float(timeout_s))
        if slurm_port:
            store, port, published = _slurm_store(rank, world, timeout, Path(rendezvous_dir) if rendezvous_dir else None)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
            if rank == 0:
                log.info("process group: %d ranks, master %s:%d (%s)", world, os.environ["MASTER_ADDR"], port,
                         slurm_launch_id())
            if published is not None:
                dist.barrier()  # every rank has read the port
                if rank == 0:
                    published.unlink(missing_ok=True)
        else:
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun or `poa train --nproc N`")
            if "TORCHELASTIC_RESTART_COUNT" in os.environ:  # a torchrun worker, maybe of a restarted group
                dist.init_process_group(backend, store=_torchrun_store(rank, world, timeout), rank=rank,
                                        world_size=world, timeout=timeout)
            else:
                dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
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
    """Mean over ranks of a dict of numbers and 0-d tensors, as floats: one collective and one
    device-to-host copy (the caller's one host synchronisation), however many entries."""
    keys = sorted(values)
    on_dev = [k for k in keys if isinstance(values[k], torch.Tensor)]
    on_host = [k for k in keys if not isinstance(values[k], torch.Tensor)]
    parts = []
    if on_dev:
        parts.append(torch.stack([values[k].detach().reshape(()).to(device, torch.float64) for k in on_dev]))
    if on_host:  # staged host-to-device copy: no wait on the device
        parts.append(torch.tensor([float(values[k]) for k in on_host], dtype=torch.float64).to(device))
    if not parts:
        return {}
    t = torch.cat(parts) if len(parts) > 1 else parts[0]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return dict(zip(on_dev + on_host, t.tolist()))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
