"""Restart after a failed step: the batch script's side of a POA Slurm job.

Each batch script (``poa submit``'s, ``slurm/train_srun.sbatch``,
``slurm/train_torchrun.sbatch``) runs, on the batch host::

    python -m poa_hpc.launch.restarts start --max-restarts N --config CFG [overrides]
    srun --kill-on-bad-exit=1 ...            # the training step; one dead task ends it at once
    python -m poa_hpc.launch.restarts end --exit-code $? --max-restarts N --config CFG [overrides]

``start`` records, in ``<train.output_dir>/status/restarts.json``, the job, the
run (``SLURM_RESTART_COUNT``) and the newest committed checkpoint, and clears
the ranks' reports (:mod:`poa_hpc.launch.status`).  ``end`` decides what the
step's end means:

* exit code 0: finished.
* a rank reports a stop on a signal (time limit, preemption, ``scontrol
  requeue``, ``scancel``): the stop protocol has checkpointed and Slurm or rank 0
  requeues (or cancels); nothing to do.
* a rank reports exit code 2, 3 or 4 (bad input, NaN loss, checkpoint not
  writable): a restart would fail the same way; the job ends with that code.
* anything else (a rank crashed or was killed, a collective timed out, a node
  failed): the job requeues itself (``scontrol requeue``) and its next run
  resumes from the newest good checkpoint.  A failed run that leaves no newer
  checkpoint than it started from counts against ``--max-restarts``; once more
  than that many runs failed without progress, the job ends (exit code 5) with a
  message naming the last error and the log file.  Runs that made progress do
  not count, so a multi-day run survives any number of isolated faults.

The decision and the count are written to ``restarts.json`` before ``scontrol
requeue``: the requeue makes slurmd signal every process of the job, this one
included.  Only the reports of this run (job id and ``SLURM_RESTART_COUNT``)
are read.  A run whose ``end`` never ran (a time-limit stop requeued by rank 0,
a lost batch host) is closed by the next ``start``: ``stopped``, ``completed``,
or ``lost`` (counted as a failed run without progress).

The counter belongs to the job: a new job (``poa submit`` again, with the same
``train.output_dir``) starts from zero.  Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from poa_hpc.checkpoint.layout import newest_step
from poa_hpc.errors import EXIT_GAVE_UP, EXIT_USAGE, FATAL_EXIT_CODES, SlurmError
from poa_hpc.launch.slurm import job_id, requeue_job
from poa_hpc.launch.status import clear_rank_reports, rank_reports, read_state, write_state

DEFAULT_MAX_RESTARTS = 3


def _say(text: str) -> None:
    print(f"poa: {text}", file=sys.stderr, flush=True)


def _step_text(step: Optional[int]) -> str:
    return "none" if step is None else f"step {step}"


def _signal_text(code: int) -> str:
    if code > 128:
        try:
            return f"exit code {code}: killed by {signal.Signals(code - 128).name}"
        except ValueError:
            pass
    return f"exit code {code}"


def _batch_log(jid: str, pattern: Optional[str]) -> Optional[str]:
    """The batch script's stderr: ``pattern`` for task 0 (submitit writes task 0's and the batch
    script's stderr to one file), else the job's StdErr per scontrol."""
    if pattern:
        return pattern.replace("%j", jid.split("_")[0]).replace("%t", "0")
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    fields = dict(re.findall(r"(\w+)=(\S+)", out))
    return fields.get("StdErr") or fields.get("StdOut")


_SRUN_TASK = re.compile(r"^srun: error: \S+: tasks? (\d+)(?:-\d+)?: (.+)$", re.M)


def _srun_task_lines(log: Optional[str], marker: str) -> List[tuple]:
    """srun's verdicts on this run's tasks, in the order srun saw them end: [(task, "Killed"), ...],
    read from the batch log after this run's start marker."""
    if not log:
        return []
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.path.getsize(log) - (1 << 20)))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    at = text.rfind(marker)
    return [(int(t), what.strip()) for t, what in _SRUN_TASK.findall(text[at:] if at >= 0 else "")]


def _is_consequence(report: dict) -> bool:
    """A rank that failed because another one died or hung (its collective lost the peer or timed out)."""
    message = report.get("message") or ""
    return message.startswith(("lost the connection to another rank", "a collective did not complete"))


def _failure(code: int, reports: List[dict], srun_tasks: List[tuple]) -> tuple:
    """(one-line description of what failed, the rank whose log to name, or None for the job's log).

    The rank to blame: one that ended without a report (killed: out of memory, a fault) before one
    that reported an error, and one with an error of its own before one that only lost its peer;
    among several, the one srun saw end first (with one task per rank, srun's task = the rank)."""
    silent = [r for r in reports if r.get("state") == "running"]  # ended without a word: killed or lost
    failed = [r for r in reports if r.get("state") == "failed"]
    seen = {}
    for i, (task, what) in enumerate(srun_tasks):
        seen.setdefault(task, (i, what))

    def first(candidates: List[dict]) -> Optional[dict]:
        known = [r for r in candidates if r["rank"] in seen]
        if known:
            return min(known, key=lambda r: seen[r["rank"]][0])
        return candidates[0] if len(candidates) == 1 else None

    if silent:
        culprit = first(silent)
    else:
        own = [r for r in failed if not _is_consequence(r)]
        culprit = first(own or failed) or (own or failed or [None])[0]
    parts = []
    if culprit is not None and culprit in silent:
        how = seen.get(culprit["rank"], (0, None))[1]
        parts.append(f"rank {culprit['rank']} (pid {culprit['pid']} on {culprit['host']}) ended without a report ("
                     + (f"srun: '{how}'; " if how else "")
                     + "killed by a signal, e.g. out of memory, or its node failed)")
        others = [r for r in silent if r is not culprit]
        if others:
            parts.append(f"rank{'s' if len(others) > 1 else ''} {', '.join(str(r['rank']) for r in others[:8])} "
                         f"ended by srun after it")
    elif silent:
        ranks = ", ".join(str(r["rank"]) for r in silent[:8]) + (", ..." if len(silent) > 8 else "")
        parts.append(f"ranks {ranks} ended without a report (one was killed by a signal, e.g. out of memory, or "
                     f"its node failed, and srun ended the others)")
    for r in sorted(failed, key=lambda r: r is not culprit)[:2]:
        parts.append(f"rank {r['rank']} on {r['host']}: {r.get('message') or _signal_text(r.get('code') or 1)}")
    if not parts:
        parts.append("the training step ended before any rank reported")
    return "; ".join(parts) + f" (srun {_signal_text(code)})", (culprit["rank"] if culprit else None)


def _job_log(jid: str, pattern: Optional[str], rank: Optional[int], batch_log: Optional[str]) -> str:
    """The log to read for ``rank``: ``pattern`` (``%j`` job, ``%t`` task), else the batch log."""
    if pattern:
        return pattern.replace("%j", jid.split("_")[0]).replace("%t", str(rank if rank is not None else 0))
    return batch_log or "the job's output file"


def _start_marker(jid: str, restart: int) -> str:
    return f"poa: job {jid} run {restart}:"


def _this_run(reports: List[dict], jid: str, restart: int) -> List[dict]:
    """The reports of run ``restart`` of job ``jid``: a report left by an earlier run or another job
    (not cleared, or written late by a straggler) says nothing about this run."""
    return [r for r in reports if str(r.get("job")) == str(jid) and int(r.get("restart", -1)) == int(restart)]


def _made_progress(newest: Optional[int], start_step: Optional[int]) -> bool:
    return newest is not None and (start_step is None or newest > start_step)


LOST = ("the run ended without the batch script's verdict (the job was requeued or cancelled from outside, or "
        "its batch host failed)")


def _close_unfinished(state: Dict, reports: List[dict], newest: Optional[int]) -> None:
    """Give the previous run its real outcome if its ``end`` never ran: a stop on a signal (rank 0
    requeued the job at the time limit, which ends the batch script too), or a run lost without a
    verdict, which counts as a failed run when it left no newer checkpoint."""
    last = state["runs"][-1] if state.get("runs") else None
    if not last or last.get("outcome") != "running":
        return
    mine = _this_run(reports, state["job"], int(last.get("restart", 0)))
    stopped = [r for r in mine if r.get("state") == "stopped"]
    if stopped:
        last.update(outcome="stopped", error=stopped[0].get("message"))
    elif mine and all(r.get("state") == "completed" for r in mine):
        last.update(outcome="completed")
    else:
        if not _made_progress(newest, last.get("start_step")):
            state["no_progress"] = int(state.get("no_progress", 0)) + 1
        last.update(outcome="lost", error=LOST)


def start(run_dir: Path, max_restarts: int) -> int:
    jid = job_id() or "local"
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    state = read_state(run_dir)
    if not state or state.get("job") != jid:
        state = {"job": jid, "no_progress": 0, "runs": [], "gave_up": None}
    newest = newest_step(run_dir / "checkpoints")
    _close_unfinished(state, rank_reports(run_dir), newest)
    state["max_restarts"] = max_restarts
    if state["no_progress"] > max_restarts:  # runs lost without a verdict used up the restarts
        message = (f"job {jid} gave up: {state['no_progress']} failed run(s) without a newer checkpoint "
                   f"(--max-restarts {max_restarts}; newest checkpoint: {_step_text(newest)}). "
                   f"Last error: {state['runs'][-1].get('error')}")
        state["gave_up"] = message
        write_state(run_dir, state)
        _say(message)
        return EXIT_GAVE_UP
    state["runs"].append({"restart": restart, "start_step": newest, "started": time.time(), "outcome": "running"})
    state["runs"] = state["runs"][-50:]
    clear_rank_reports(run_dir)
    write_state(run_dir, state)
    _say(f"{_start_marker(jid, restart)[5:]} newest checkpoint {_step_text(newest)}; "
         f"{state['no_progress']} of {max_restarts} restarts without progress used")
    return 0


def end(run_dir: Path, code: int, max_restarts: int, log_pattern: Optional[str]) -> int:
    jid = job_id() or "local"
    state = read_state(run_dir)
    if not state or state.get("job") != jid or not state.get("runs"):
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        state = {"job": jid, "no_progress": 0, "runs": [{"restart": restart, "start_step": None}], "gave_up": None}
    run: Dict = state["runs"][-1]
    reports = _this_run(rank_reports(run_dir), jid, int(run.get("restart", 0)))
    run.update(ended=time.time(), exit_code=code)

    def finish(outcome: str, ret: int, **extra) -> int:
        run.update(outcome=outcome, **extra)
        write_state(run_dir, state)
        return ret

    ntasks = int(os.environ.get("SLURM_NTASKS", "0") or 0)
    if code == 0 or (reports and len(reports) >= ntasks and all(r.get("state") == "completed" for r in reports)):
        if code:  # every rank finished and said so; the exit code came from the processes' teardown
            _say(f"every rank reported the run complete; ignoring the step's {_signal_text(code)}")
        return finish("completed", 0)
    stopped = [r for r in reports if r.get("state") == "stopped"]
    if stopped:
        _say(f"the training stopped on a signal ({stopped[0].get('message')}); not restarting it here")
        return finish("stopped", code)
    fatal = [r for r in reports if r.get("state") == "failed" and r.get("code") in FATAL_EXIT_CODES]
    if fatal or (not reports and code in FATAL_EXIT_CODES):
        fcode = fatal[0]["code"] if fatal else code
        what = fatal[0].get("message") if fatal else _signal_text(code)
        _say(f"not restarting job {jid}: {FATAL_EXIT_CODES[fcode]} (exit code {fcode}), a restart would fail the "
             f"same way: {what}")
        return finish("fatal", fcode, error=what)

    batch_log = _batch_log(jid, log_pattern)
    one_task_per_rank = len(reports) == ntasks  # srun's tasks are the ranks (not torchrun's agents)
    srun_tasks = _srun_task_lines(batch_log, _start_marker(jid, int(run.get("restart", 0)))) if one_task_per_rank else []
    error, blame = _failure(code, reports, srun_tasks)
    log = _job_log(jid, log_pattern, blame, batch_log)
    if max_restarts == 0:
        _say(f"run {run.get('restart', 0)} of job {jid} failed: {error}. Not restarting (--max-restarts 0). "
             f"Log: {log}")
        return finish("failed", code or 1, error=error, log=log)
    newest = newest_step(run_dir / "checkpoints")
    start_step = run.get("start_step")
    progress = _made_progress(newest, start_step)
    if not progress:
        state["no_progress"] = int(state.get("no_progress", 0)) + 1
    if state["no_progress"] > max_restarts:
        message = (f"job {jid} gave up: {state['no_progress']} failed run(s) without a newer checkpoint "
                   f"(--max-restarts {max_restarts}; newest checkpoint: {_step_text(newest)}). "
                   f"Last error: {error}. Log: {log}")
        state["gave_up"] = message
        _say(message)
        return finish("gave_up", EXIT_GAVE_UP, error=error, log=log)
    # Record the decision (and the count) BEFORE the requeue: `scontrol requeue` makes slurmd signal
    # every process of the job, this one included, so anything after it may never run.  (Writing after
    # it let a loaded machine lose the count: --max-restarts 1 then allowed a second restart.)
    count = "made progress" if progress else f"{state['no_progress']} of {max_restarts} restarts without progress"
    _say(f"run {run.get('restart', 0)} of job {jid} failed: {error}. Requeuing; the next run resumes from "
         f"{_step_text(newest)} ({count}). Log: {log}")
    finish("requeued", code, error=error, log=log)
    try:
        requeue_job(jid)
    except SlurmError as exc:
        _say(f"run failed ({error}) and the job could not requeue itself: {exc}; resubmit to continue (log: {log})")
        return finish("failed", code, error=error, log=log)
    return code


def _run_dir(args: argparse.Namespace) -> Path:
    if args.run_dir:
        return Path(args.run_dir).expanduser().resolve()
    from poa_hpc.config import load_config
    from poa_hpc.errors import ConfigError

    if not args.config:
        raise ConfigError("give --run-dir or --config (the training config, with its overrides)")

    return Path(load_config(args.config, args.overrides).train.output_dir).expanduser().resolve()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m poa_hpc.launch.restarts",
                                description="restart-after-failure bookkeeping of a POA Slurm job (batch script side)")
    p.add_argument("phase", choices=("start", "end"))
    p.add_argument("--exit-code", type=int, default=0, help="end: the exit code of the training step (srun)")
    p.add_argument("--max-restarts", type=int, default=DEFAULT_MAX_RESTARTS,
                   help="failed runs without a newer checkpoint before the job gives up (0: never restart)")
    p.add_argument("--log", default=None, help="the tasks' log file, %%j = job id, %%t = task (for messages)")
    p.add_argument("--run-dir", default=None, help="the run folder (default: train.output_dir of --config)")
    p.add_argument("--config", default=None)
    p.add_argument("overrides", nargs="*", default=[])
    args = p.parse_intermixed_args(argv)  # overrides may follow the options
    from poa_hpc.errors import ConfigError

    try:
        run_dir = _run_dir(args)
    except ConfigError as exc:
        _say(f"error: {exc}")
        return EXIT_USAGE
    if args.max_restarts < 0:
        _say("error: --max-restarts must be >= 0")
        return EXIT_USAGE
    try:
        if args.phase == "start":
            return start(run_dir, args.max_restarts)
        return end(run_dir, args.exit_code, args.max_restarts, args.log)
    except OSError as exc:  # the run folder is not writable: let the step fail (or the job end) on its own
        _say(f"cannot keep the restart state in {run_dir / 'status'}: {exc}")
        return 0 if args.phase == "start" else (args.exit_code or 1)


if __name__ == "__main__":
    raise SystemExit(main())
