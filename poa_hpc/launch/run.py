"""Run training with the stop/requeue protocol (used by ``poa train`` and by ``poa submit``'s task).

On ``SIGTERM`` (``scancel``, ``scontrol requeue``, preemption) every rank
finishes its step, the step is checkpointed, and the process exits with
``128 + signal``.  On ``SIGUSR1``/``SIGUSR2`` (Slurm's ``--signal`` warning
before the time limit) the same happens and rank 0 then requeues the job
(``scontrol requeue``) before any rank exits, so the job's next run resumes
from that checkpoint.  Without Slurm a signal just stops the run with a
checkpoint; ``--resume`` continues it.

Under Slurm each rank also reports how it ended in the run folder
(:class:`poa_hpc.launch.status.RankReport`), which is what the batch script's
restart logic (:mod:`poa_hpc.launch.restarts`) reads after a failed step.
"""

from __future__ import annotations

import logging
import signal
from typing import Dict, Tuple

from poa_hpc.config import POAConfig
from poa_hpc.errors import SlurmError
from poa_hpc.launch.slurm import job_id, requeue_job
from poa_hpc.launch.status import RankReport, describe, record_run_outcome
from poa_hpc.train.stop import StopRequest
from poa_hpc.train.trainer import train

log = logging.getLogger("poa_hpc.launch")

REQUEUE_SIGNALS = ("SIGUSR1", "SIGUSR2")

__all__ = ["run_training", "REQUEUE_SIGNALS"]


def _stop_code(reason: str) -> int:
    return 128 + int(signal.Signals[reason]) if reason in signal.Signals.__members__ else 1


def run_training(cfg: POAConfig, resume: bool) -> Tuple[Dict[str, object], int]:
    """Train with stop handlers installed; returns the summary and the process exit code."""
    report = RankReport.for_run(cfg.train.output_dir)
    if report is not None:
        report.write("running")
    jid = job_id()

    def on_stop(step: int, reason: str, rank: int) -> None:
        # Runs on every rank after the checkpoint, before the ranks leave together: rank 0's requeue
        # is done before any task exits (srun --kill-on-bad-exit would end it on the first 128+N exit).
        requeued = ""
        if jid and rank == 0:  # first: a requeue ends the batch script, which would record it
            record_run_outcome(cfg.train.output_dir, jid, report.base["restart"] if report else 0, "stopped",
                               f"stopped by {reason} at step {step}")
        if reason in REQUEUE_SIGNALS and jid and rank == 0:
            try:
                requeue_job(jid)
                requeued = "; job requeued"
                log.warning("requeued Slurm job %s; its next run resumes from step %s", jid, step)
            except SlurmError as exc:
                log.error("%s; the checkpoint at step %s is saved: resubmit with --resume", exc, step)
        if report is not None:
            report.write("stopped", _stop_code(reason), f"stopped by {reason} at step {step}{requeued}")

    try:
        with StopRequest() as stop:
            summary = train(cfg, resume=resume, stop=stop, on_stop=on_stop)
    except BaseException as exc:
        if report is not None:
            code, message = describe(exc)
            report.write("failed", code, message)
        raise
    reason = summary.get("interrupted")
    if not reason:
        if report is not None:
            report.write("completed", 0, f"trained to step {summary['step']}")
        return summary, 0
    return summary, _stop_code(str(reason))
