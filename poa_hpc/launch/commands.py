"""``poa train`` and ``poa submit``: launching training on this machine (torchrun) or on Slurm."""

from __future__ import annotations

import argparse
import logging

from poa_hpc.commands import register_command
from poa_hpc.distributed.torchrun import torchrun
from poa_hpc.errors import UsageError

log = logging.getLogger("poa_hpc")


@register_command("train")
class TrainCommand:
    """pre-train a POA model"""

    @staticmethod
    def add_arguments(t: argparse.ArgumentParser) -> None:
        t.add_argument("--config", required=True, help="YAML config, or a packaged one by name (demo_cpu, vit_l_poa, ...)")
        t.add_argument("--resume", action="store_true", help="continue from <train.output_dir>/checkpoints")
        t.add_argument("--nproc", type=int, default=1,
                       help="processes on this machine (launches torchrun; needs dist.engine=fsdp, deepspeed or ddp)")
        t.add_argument("--max-restarts", type=int, default=0,
                       help="with --nproc: torchrun restarts all workers this many times when one fails (a crash, a "
                            "killed process, a collective past dist.timeout_s); they resume from the newest checkpoint")
        t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=1e-3 (every key and its doc: "
                                                    "poa config show)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        import os

        from poa_hpc.config import load_config
        from poa_hpc.distributed.env import slurm_launch_env
        from poa_hpc.launch.run import run_training

        cfg = load_config(args.config, args.overrides)  # fail fast on a bad config, before any launch
        launched = "RANK" in os.environ or slurm_launch_env() is not None  # torchrun, or a task of an srun step
        if args.max_restarts < 0:
            raise UsageError("--max-restarts must be >= 0")
        if (args.nproc > 1 or cfg.dist.engine != "none") and not launched:
            if cfg.dist.engine == "none":
                raise UsageError("--nproc > 1 needs a distributed engine: add dist.engine=fsdp (or deepspeed, ddp)")
            # torchrun restarts all workers (up to --max-restarts times) when one fails; restarted workers resume.
            return torchrun(["--standalone", f"--nproc_per_node={args.nproc}", f"--max-restarts={args.max_restarts}",
                             "-m", "poa_hpc", "train", "--config", args.config, *(["--resume"] if args.resume else []),
                             *args.overrides], args.max_restarts)
        if args.max_restarts and not launched:
            raise UsageError("--max-restarts restarts torchrun's workers: use it with --nproc N (or a distributed engine)")
        # A worker torchrun restarted after a failure continues from the newest checkpoint.
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
        if restarted and not args.resume:
            log.warning("torchrun restart %s: resuming from the newest checkpoint", os.environ["TORCHELASTIC_RESTART_COUNT"])
        summary, code = run_training(cfg, resume=args.resume or restarted)
        if summary["rank"] == 0:
            if summary.get("interrupted"):
                print(f"stopped by {summary['interrupted']} at step {summary['step']}; checkpoint: "
                      f"{summary['checkpoint']} (continue with --resume)")
            else:
                print(f"trained to step {summary['step']}; checkpoint: {summary['checkpoint']}")
        return code


@register_command("submit")
class SubmitCommand:
    """submit a training job to Slurm (submitit; one task per GPU, checkpoint + requeue on time limit or preemption)"""

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        from poa_hpc.launch.submit import add_submit_arguments

        add_submit_arguments(p)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from poa_hpc.launch.submit import submit

        return submit(args)
