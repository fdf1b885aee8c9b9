"""What each rank of a Slurm job reports about how it ended, and the exit code of a failure.

The exit codes and the exception types that carry them are in :mod:`poa_hpc.errors` (codes 2-4 do not
restart a Slurm job: the same input, the same step or the same full disk would fail again).

Under Slurm every rank writes ``<train.output_dir>/status/rank_NNNNN.json``
(job, host, pid, and at the end its state, code and a one-line message): the
job wrapper (:mod:`poa_hpc.launch.restarts`) reads them to tell a rank that
stopped on a signal from one that failed, and a killed rank (its report still
says ``running``) from the ranks that merely lost it.  Nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from poa_hpc.errors import EXIT_CRASH, EXIT_USAGE, PoaError
from poa_hpc.files import atomic_write_text
from poa_hpc.launch.slurm import job_id

STATUS_DIR = "status"


def status_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / STATUS_DIR


def _atomic_write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class RankReport:
    """``status/rank_NNNNN.json`` of one rank of a Slurm job (see the module doc)."""

    def __init__(self, run_dir: str | Path, rank: int, job: str) -> None:
        self.path = status_dir(run_dir) / f"rank_{rank:05d}.json"
        self.base = {"job": job, "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0), "rank": rank,
                     "host": socket.gethostname(), "pid": os.getpid()}

    @classmethod
    def for_run(cls, run_dir: str | Path) -> Optional[RankReport]:
        """This process's report in a Slurm job (torchrun's ``RANK`` or srun's ``SLURM_PROCID``); else ``None``."""
        jid = job_id()
        if not jid:
            return None
        rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
        return cls(run_dir, int(rank), jid)

    def write(self, state: str, code: Optional[int] = None, message: str = "") -> None:
        """Record ``state`` (running, completed, stopped, failed); never raises (a full disk must not
        turn the real error into another one)."""
        try:
            _atomic_write_json(self.path, {**self.base, "state": state, "code": code, "message": message,
                                           "time": time.time()})
        except OSError:
            pass


def rank_reports(run_dir: str | Path) -> List[dict]:
    return [r for r in (read_json(p) for p in sorted(status_dir(run_dir).glob("rank_*.json"))) if r]


def clear_rank_reports(run_dir: str | Path) -> None:
    for p in status_dir(run_dir).glob("rank_*.json"):
        try:
            p.unlink()
        except OSError:
            pass


def collective_failure(exc: BaseException) -> Optional[str]:
    """A one-line explanation if ``exc`` is a collective that timed out or lost its peer, else ``None``."""
    name = type(exc).__name__
    text = str(exc)
    if not (isinstance(exc, RuntimeError) and (name.startswith("Dist") or "gloo" in text or "NCCL" in text
                                               or "c10d" in text or "ProcessGroup" in text)):
        return None
    first = text.strip().splitlines()[0] if text.strip() else name
    first = first.split("] ", 1)[-1] if first.startswith("[") else first  # drop gloo's source location
    first = first.split(". This is typically", 1)[0][:160]  # and gloo's advice
    if "timed out" in text.lower() or "timeout" in text.lower():
        return f"a collective did not complete within dist.timeout_s (another rank is stuck or gone): {first}"
    if any(s in text for s in ("Connection reset", "Connection closed", "Broken pipe", "Connection refused",
                               "Read error", "Write error", "remote process exited")):
        return f"lost the connection to another rank (it probably died; see its log): {first}"
    return None


def classify_error(exc: BaseException) -> Optional[Tuple[int, str]]:
    """(exit code, one-line message) of a known failure; ``None`` for an unexpected one (a crash)."""
    if isinstance(exc, PoaError):
        return exc.exit_code, str(exc)
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return EXIT_USAGE, str(exc)
    collective = collective_failure(exc)
    if collective:
        return EXIT_CRASH, collective
    return None


def describe(exc: BaseException) -> Tuple[int, str]:
    """(exit code, one line) for any exception: a known one's, else 1 and ``Type: message``."""
    known = classify_error(exc)
    if known:
        return known
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(exc, SystemExit):
        return (exc.code if isinstance(exc.code, int) else 1), "exited"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return EXIT_CRASH, f"{type(exc).__name__}: {text}"[:300]


def read_state(run_dir: str | Path) -> Optional[Dict]:
    return read_json(status_dir(run_dir) / "restarts.json")


def write_state(run_dir: str | Path, state: Dict) -> None:
    _atomic_write_json(status_dir(run_dir) / "restarts.json", state)


def record_run_outcome(run_dir: str | Path, job: str, restart: int, outcome: str, message: str = "") -> None:
    """Close run ``restart`` of ``job`` in ``restarts.json`` with ``outcome`` if it is still running.

    Rank 0 calls this before it requeues the job at the time limit: the requeue ends the batch
    script, whose ``end`` would otherwise never record the run.  Never raises."""
    try:
        state = read_state(run_dir)
        runs = (state or {}).get("runs") or []
        if not state or str(state.get("job")) != str(job) or not runs:
            return
        last = runs[-1]
        if int(last.get("restart", -1)) != int(restart) or last.get("outcome") != "running":
            return
        last.update(outcome=outcome, ended=time.time(), error=message)
        write_state(run_dir, state)
    except (OSError, ValueError, TypeError):
        pass


def exit_rank(code: int) -> int:
    """Return ``code``, or, in a rank of a multi-process run, leave now with it.

    After a failure the process group is destroyed without the usual barrier; the
    interpreter's teardown then runs C++ destructors of process-group and
    checkpoint threads that can abort the process (SIGABRT, "terminate called
    without an active exception"), which would replace the exit code the
    launcher and the restart logic read.  Output is flushed first.
    """
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return code
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
