"""``poa submit``: a POA training job on Slurm through submitit, one task per GPU.

    poa submit --config configs/vit_l_poa.yaml --nodes 4 --gpus-per-node 8 --partition gpu \\
        --time 72:00:00 data.root=/datasets/imagenet dist.engine=fsdp train.output_dir=/scratch/poa_vitl

The run folder is ``train.output_dir`` (made absolute at submission): the frozen
config the job runs (``submitted_config.yaml``), the trainer's ``config.yaml``,
``metrics.jsonl`` and ``checkpoints/``, ``status/`` (restart bookkeeping, one
report per rank) and ``slurm/`` with submitit's files and one log per task
(``<job>_<task>_log.out/.err``).  Every task runs
:func:`poa_hpc.launch.run.run_training` with ``--resume`` semantics: the
process group comes from Slurm's variables, a requeued job continues from the
newest good checkpoint, the time-limit signal (``USR2``, ``--signal-delay``
seconds before the end) checkpoints and requeues, ``scancel`` checkpoints and
stops.  Every task is started with ``srun --kill-on-bad-exit=1`` (one dead task
ends the step at once), and the batch script requeues the job after a failed
step, up to ``--max-restarts`` failed runs without progress
(:mod:`poa_hpc.launch.restarts`).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List

from poa_hpc.config import POAConfig, load_config, to_yaml
from poa_hpc.errors import EXIT_GAVE_UP, SubmitError
from poa_hpc.files import atomic_write_text
from poa_hpc.launch.restarts import DEFAULT_MAX_RESTARTS
from poa_hpc.launch.slurm import parse_time_minutes
from poa_hpc.launch.status import read_state

log = logging.getLogger("poa_hpc.launch")

__all__ = ["TrainTask", "add_submit_arguments", "submit", "SubmitError"]


class TrainTask:
    """The callable submitit pickles and runs in every task: train from the frozen config, resuming."""

    def __init__(self, config_path: str) -> None:
        self.config_path = config_path

    def __call__(self) -> Dict[str, object]:
        from poa_hpc.distributed.env import setup_logging
        from poa_hpc.launch.run import run_training
        from poa_hpc.launch.status import classify_error, exit_rank

        setup_logging(False)
        try:
            cfg = load_config(self.config_path)
            summary, code = run_training(cfg, resume=True)
        except Exception as exc:
            # End with the exit code and no result file: submitit would otherwise record the error
            # as the job's result, although the job may restart and finish.
            known = classify_error(exc)
            if known is None:
                log.exception("training failed")
                raise SystemExit(exit_rank(1)) from None
            log.error("%s", known[1])
            raise SystemExit(exit_rank(known[0])) from None
        if code != 0:
            # Stopped by a signal after checkpointing: end without a result, so submitit does not
            # report the job as finished (a requeued job runs again and resumes).
            raise SystemExit(code)
        return summary

    def checkpoint(self) -> Any:
        """submitit's hook on its own time-limit signal: resubmit the same task (it resumes).

        Only reached if the signal arrives before training installs its handlers,
        which checkpoint first; afterwards training handles the signal itself.
        """
        import submitit

        return submitit.helpers.DelayedSubmission(TrainTask(self.config_path))


def add_submit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training config (YAML)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="one task per GPU; 0 for a CPU job")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="default: --gpus-per-node, or 1 for a CPU job")
    p.add_argument("--cpus-per-task", type=int, default=10)
    p.add_argument("--mem-gb", type=int, default=None, help="memory per node (default: Slurm's default)")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default="60", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS (default 60)")
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--exclude", default=None)
    p.add_argument("--name", default="poa", help="Slurm job name")
    p.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which the job checkpoints and requeues itself")
    p.add_argument("--max-restarts", type=int, default=DEFAULT_MAX_RESTARTS,
                   help="after a failed step (a task crashed or was killed, a node failed) the job requeues "
                        "itself and resumes; it gives up after this many failed runs without a newer "
                        f"checkpoint (default {DEFAULT_MAX_RESTARTS}; 0: never restart)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end and print its summary")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. data.root=/imagenet")


def _freeze_config(cfg: POAConfig, out_dir: Path) -> Path:
    return atomic_write_text(out_dir / "submitted_config.yaml", to_yaml(cfg))


def _slurm_message(exc: BaseException) -> str:
    """The useful line(s) of a failed sbatch call as submitit wraps it."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower() and ln.strip()]
    return "; ".join(dict.fromkeys(lines)) or text.strip().splitlines()[-1]


def submit(args: argparse.Namespace) -> int:
    try:
        import submitit
    except ImportError:
        raise SubmitError("poa submit needs submitit: pip install submitit (or pip install -e '.[slurm]')") from None
    try:
        minutes = parse_time_minutes(args.time)
    except ValueError as exc:
        raise SubmitError(f"--time: {exc}") from None
    # Slurm checks time limits every 30 s and sends the warning up to that much early; a warning due
    # while the job is still starting (before its tasks exist) is sent to nobody and never repeated.
    if args.signal_delay < 1 or args.signal_delay + 60 > minutes * 60:
        raise SubmitError(f"--signal-delay {args.signal_delay}: expected 1 to {minutes * 60 - 60} seconds (at least "
                          f"a minute less than the {minutes}-minute time limit: Slurm may send it 30 s early and "
                          "the job must have started to receive it)")
    if args.max_restarts < 0:
        raise SubmitError("--max-restarts must be >= 0")
    gpus = max(0, int(args.gpus_per_node))
    tasks = args.tasks_per_node or (gpus if gpus > 0 else 1)
    if gpus and tasks != gpus:
        raise SubmitError(f"--tasks-per-node {tasks} with --gpus-per-node {gpus}: POA runs one task per GPU")
    world = tasks * args.nodes
    overrides: List[str] = list(args.overrides)
    cfg = load_config(args.config, overrides)
    if world > 1 and cfg.dist.engine == "none":
        raise SubmitError(f"{world} tasks need a distributed engine: add dist.engine=fsdp (or deepspeed, ddp)")
    out_dir = Path(cfg.train.output_dir).expanduser().resolve()
    cfg.train.output_dir = str(out_dir)
    if gpus == 0 and cfg.train.device == "auto":
        cfg.train.device = "cpu"
    frozen = _freeze_config(cfg, out_dir)

    executor = submitit.AutoExecutor(folder=str(out_dir / "slurm" / "%j"), cluster="slurm")
    # The batch script around the srun step: restart bookkeeping before it, and after it the decision
    # to requeue (poa_hpc.launch.restarts); `$?` on the first teardown line is srun's exit code.
    guard = [sys.executable, "-m", "poa_hpc.launch.restarts"]
    common = ["--max-restarts", str(args.max_restarts), "--config", str(frozen)]
    log_pattern = str(out_dir / "slurm" / "%j" / "%j_%t_log.err")
    params: Dict[str, Any] = dict(
        name=args.name, nodes=args.nodes, tasks_per_node=tasks, cpus_per_task=args.cpus_per_task,
        timeout_min=minutes, slurm_signal_delay_s=args.signal_delay,
        slurm_additional_parameters={"requeue": True},
        slurm_srun_args=["--kill-on-bad-exit=1"],
        slurm_setup=[shlex.join([*guard, "start", *common]) + " || exit $?"],
        slurm_teardown=["poa_rc=$?",
                        shlex.join([*guard, "end", *common, "--log", log_pattern]) + ' --exit-code "$poa_rc"',
                        "exit $?"],
    )
    if gpus:
        params["gpus_per_node"] = gpus
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        value = getattr(args, key)
        if value:
            params[f"slurm_{key}"] = value
    executor.update_parameters(**params)
    try:
        job = executor.submit(TrainTask(str(frozen)))
    except Exception as exc:  # sbatch refused it: surface Slurm's words, not submitit's traceback
        raise SubmitError(f"Slurm refused the job: {_slurm_message(exc)}") from None
    print(f"submitted Slurm job {job.job_id}: {args.nodes} node(s) x {tasks} task(s), {minutes} min, "
          f"run folder {out_dir}")
    print(f"  logs: {out_dir / 'slurm' / job.job_id}/{job.job_id}_<task>_log.out  "
          f"(metrics: {out_dir / 'metrics.jsonl'})")
    if not args.wait:
        return 0
    try:
        results = job.results()
    except Exception as exc:
        state = read_state(out_dir) or {}
        if state.get("job") == job.job_id and state.get("gave_up"):
            print(f"poa submit: error: {state['gave_up']}", file=sys.stderr)
            return EXIT_GAVE_UP
        raise SubmitError(f"job {job.job_id} did not finish: {str(exc).strip().splitlines()[0]} "
                          f"(see {out_dir / 'slurm' / job.job_id})") from None
    main = next((r for r in results if isinstance(r, dict) and r.get("rank") == 0), results[0])
    print(f"job {job.job_id} finished: step {main['step']}, checkpoint {main['checkpoint']}")
    return 0
