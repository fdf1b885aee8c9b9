"""Run training with the stop/requeue protocol (used by ``poa train`` and by ``poa submit``'s task).

On ``SIGTERM`` (``scancel``, ``scontrol requeue``, preemption) every rank
finishes its step, the step is checkpointed, and the process exits with
``128 + signal``.  On ``SIGUSR1``/``SIGUSR2`` (Slurm's ``--signal`` warning
before the time limit) the same happens and rank 0 then requeues the job
(``scontrol requeue``), whose next run resumes from that checkpoint.  Without
Slurm a signal just stops the run with a checkpoint; ``--resume`` continues it.
"""

from __future__ import annotations

import logging
import signal
from typing import Dict, Tuple

from poa_hpc.config import POAConfig
from poa_hpc.launch.slurm import SlurmError, job_id, requeue_job
from poa_hpc.train.stop import StopRequest
from poa_hpc.train.trainer import train

log = logging.getLogger("poa_hpc.launch")

REQUEUE_SIGNALS = ("SIGUSR1", "SIGUSR2")

__all__ = ["run_training", "REQUEUE_SIGNALS"]


def run_training(cfg: POAConfig, resume: bool) -> Tuple[Dict[str, object], int]:
    """Train with stop handlers installed; returns the summary and the process exit code."""
    with StopRequest() as stop:
        summary = train(cfg, resume=resume, stop=stop)
    reason = summary.get("interrupted")
    if not reason:
        return summary, 0
    code = 128 + int(signal.Signals[str(reason)]) if str(reason) in signal.Signals.__members__ else 1
    jid = job_id()
    if reason in REQUEUE_SIGNALS and jid and summary.get("rank") == 0:
        try:
            requeue_job(jid)
            log.warning("requeued Slurm job %s; its next run resumes from step %s", jid, summary["step"])
        except SlurmError as exc:
            log.error("%s; the checkpoint at step %s is saved: resubmit with --resume", exc, summary["step"])
    return summary, code
