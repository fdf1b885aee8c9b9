"""Checkpoint files: atomic writes, the per-step history, ``last.pt``, pruning.

Layout of ``<train.output_dir>/checkpoints/`` (every engine)::

    step_00000120.pt          full model weights + meta of step 120 (none/ddp: also the optimizer)
    step_00000120_dcp/        fsdp: the sharded resume state of step 120 (torch.distributed.checkpoint)
    deepspeed/step00000120/   deepspeed: DeepSpeed's own checkpoint (tag) of step 120
    last.pt -> step_00000120.pt

A step's checkpoint is *committed* when ``step_XXXXXXXX.pt`` exists: it is
written (temp file, fsync, rename) only after the engine's resume state of that
step is complete on every rank, so a crash at any point leaves either the
previous committed steps or the new one.  ``last.pt`` (a relative symlink) then
moves to it, and the history is pruned to the newest ``train.keep_checkpoints``
steps plus every ``train.keep_every``-th step.  Nothing in this module imports
torch at import time, so the job wrapper (:mod:`poa_hpc.launch.restarts`) can
list checkpoints cheaply.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, List, Optional, Set

from poa_hpc.errors import ResumeError
from poa_hpc.files import atomic_write, fsync_dir

LAST = "last.pt"
_STEP_FILE = re.compile(r"^step_(\d{8,})\.pt$")


def step_file(ckpt_dir: str | Path, step: int) -> Path:
    """The committed checkpoint file of ``step``."""
    return Path(ckpt_dir) / f"step_{step:08d}.pt"


def committed_steps(ckpt_dir: str | Path) -> List[int]:
    """Steps with a committed checkpoint, newest first.  A folder of the layout before the per-step history
    (``last.pt`` as a plain file and no step file) is a :class:`ResumeError`."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    steps = sorted((int(m.group(1)) for m in map(_STEP_FILE.match, os.listdir(d)) if m), reverse=True)
    if not steps and (d / LAST).is_file() and not (d / LAST).is_symlink():
        raise ResumeError(f"'{d}' holds a checkpoint of an older poa_hpc layout (last.pt without step_XXXXXXXX.pt "
                          "files): resume it with the poa_hpc version that wrote it, or train into another "
                          "train.output_dir")
    return steps


def newest_step(ckpt_dir: str | Path) -> Optional[int]:
    steps = committed_steps(ckpt_dir)
    return steps[0] if steps else None


def atomic_save(obj: Any, path: str | Path) -> Path:
    import torch

    def write(tmp: Path) -> None:
        # Through a Python file object: a full disk is then an OSError naming ENOSPC (torch.save to a path
        # raises its C++ writer's RuntimeError instead), which the save phase reports as such.
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()

    return atomic_write(path, write, fsync=True)


def point_last(ckpt_dir: str | Path, step: int) -> None:
    """Move ``last.pt`` to the committed checkpoint of ``step`` atomically (a relative symlink;
    a hard link where the file system has no symlinks)."""
    d = Path(ckpt_dir)
    target = step_file(d, step)
    if target.name == LAST:
        return
    tmp = d / f".{LAST}.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    try:
        os.symlink(target.name, tmp)
    except OSError:
        os.link(target, tmp)
    os.replace(tmp, d / LAST)
    fsync_dir(d)


def last_step(ckpt_dir: str | Path) -> Optional[int]:
    """The step ``last.pt`` points to (``None`` if it is missing or not a step checkpoint link)."""
    p = Path(ckpt_dir) / LAST
    if not p.is_symlink():
        return None
    m = _STEP_FILE.match(os.path.basename(os.readlink(p)))
    return int(m.group(1)) if m else None


def retained(steps: Iterable[int], keep_last: int, keep_every: int, protect: Iterable[Optional[int]] = ()) -> Set[int]:
    """The steps pruning keeps: the newest ``keep_last``, every multiple of ``keep_every`` (if > 0)
    and the ``protect``-ed ones (the step ``last.pt`` points to)."""
    steps = sorted(set(steps), reverse=True)
    keep = set(steps[: max(1, keep_last)])
    if keep_every > 0:
        keep |= {s for s in steps if s > 0 and s % keep_every == 0}
    keep |= {s for s in protect if s is not None and s in steps}
    return keep


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def set_aside(ckpt_dir: str | Path) -> Optional[Path]:
    """A fresh (not resumed) run in a folder that holds checkpoints: move them into
    ``checkpoints/replaced_<time>/`` (so pruning never mixes two runs' histories); returns that folder."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return None
    entries = [p for p in d.iterdir() if not p.name.startswith("replaced_")]
    if not entries:
        return None
    dest = d / f"replaced_{datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
    dest.mkdir()
    for p in entries:
        os.replace(p, dest / p.name)
    return dest


def describe_write_error(exc: BaseException) -> str:
    """The root cause of a failed write in a few words: the OSError in the chain if there is one
    (torch.save reports ENOSPC as a RuntimeError whose context is the OSError), else the exception."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return f"{e.strerror or e} [errno {e.errno}]" + (f": '{e.filename}'" if e.filename else "")
        todo += [e.__cause__, e.__context__]
        # torch.distributed.checkpoint's CheckpointException: {rank: (exception, stack summary)}
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def resolve(path: str | Path, step: Optional[int] = None) -> Path:
    """The checkpoint file a user names: a file, or a run folder / its ``checkpoints/`` folder
    (then ``last.pt``, or the step file of ``step``)."""
    path = Path(path)
    if not path.is_dir():
        if step is not None:
            raise FileNotFoundError(f"--step {step} needs a run folder or its checkpoints/ folder, not a file ('{path}')")
        return path
    d = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if step is None:
        return d / LAST
    f = step_file(d, step)
    if not f.is_file():
        have = committed_steps(d)
        raise FileNotFoundError(f"no checkpoint of step {step} in '{d}' (kept steps: "
                                f"{', '.join(map(str, sorted(have))) or 'none'})")
    return f


def load_checkpoint(path: str | Path, map_location: Any = "cpu", step: Optional[int] = None) -> dict:
    import torch

    path = resolve(path, step)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise ValueError(f"checkpoint '{path}' could not be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"'{path}' is not a poa_hpc training checkpoint (expected keys 'model' and 'config')")
    return ckpt
