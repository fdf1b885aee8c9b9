"""Small Slurm helpers: am I in a job, requeue me, parse a time limit.  Nothing here imports submitit."""

from __future__ import annotations

import os
import re
import subprocess
from typing import Mapping, Optional

from poa_hpc.errors import SlurmError

__all__ = ["job_id", "requeue_job", "parse_time_minutes"]


def job_id(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """This job's id (the array job's own id for array tasks), or ``None`` outside Slurm."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID")


def requeue_job(jid: str, timeout_s: float = 60.0) -> None:
    """``scontrol requeue JOBID``: the job goes back to pending and runs again from its script."""
    try:
        r = subprocess.run(["scontrol", "requeue", jid], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmError(f"scontrol requeue {jid} failed: {exc}") from None
    if r.returncode != 0:
        message = (r.stderr or r.stdout).strip()
        if "pending execution" in message.lower():
            return  # Slurm requeued it already (preemption with PreemptMode=REQUEUE): nothing to do
        raise SlurmError(f"scontrol requeue {jid} failed: {message}")


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_time_minutes(text: str) -> int:
    """Slurm's time formats as whole minutes (rounded up): ``90``, ``1:30:00``, ``2-00:00:00``, ``45:00``.

    As sbatch: a bare number is minutes, ``M:S`` minutes and seconds, ``H:M:S``,
    ``D-H``, ``D-H:M`` and ``D-H:M:S``.
    """
    m = _TIME.match(str(text).strip())
    if not m:
        raise ValueError(f"time limit {text!r}: expected minutes, MM:SS, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = m.groups()
    if days is not None:  # D-H[:M[:S]]
        h, mi, s = int(a), int(b or 0), int(c or 0)
        total_s = ((int(days) * 24 + h) * 60 + mi) * 60 + s
    elif c is not None:  # H:M:S
        total_s = (int(a) * 60 + int(b)) * 60 + int(c)
    elif b is not None:  # M:S
        total_s = int(a) * 60 + int(b)
    else:  # M
        total_s = int(a) * 60
    if total_s <= 0:
        raise ValueError(f"time limit {text!r} must be positive")
    return -(-total_s // 60)
