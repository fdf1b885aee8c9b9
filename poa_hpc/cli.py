"""The ``poa`` command: assembles the subcommands registered next to the code they drive.

    poa train   --config CFG [--resume] [--nproc N [--max-restarts R]] [key=value ...]
    poa submit  --config CFG --nodes N --gpus-per-node G --partition P --time T [--max-restarts R] [key=value ...]
    poa extract CKPT [--step S] (--width W --depth D | --subnet WxD|NAME ... | --all) -o OUT
    poa export  CKPT_OR_SUBNET [--step S] [--format timm|safetensors] [--subnet WxD|NAME ... | --all] [--img-size S] -o DIR
    poa eval knn SUBNET.safetensors ... [--config CFG] [key=value ...]
    poa eval knn RUN_DIR --step S --subnet WxD ...
    poa eval sweep RUN_OR_CHECKPOINT [--subnets all|S,B,L|384x12,...] [--out DIR] [key=value ...]
    poa eval linear SUBNET.safetensors ... [--config CFG] [key=value ...]
    poa subnets --config CFG
    poa demo    [--output-dir DIR] [key=value ...]
    poa bench engines|kernels|attention|data|step|demo [options]
    poa estimate flops|memory|comm --config CFG [options] [key=value ...]
    poa profile --config CFG [--steps N] [key=value ...]

A subcommand is a class registered with :func:`poa_hpc.commands.register_command` in its own module,
listed once in :data:`COMMAND_MODULES`.  Exit codes (:mod:`poa_hpc.errors`): errors in the user's input
(config keys, paths, sub-network sizes) end with a one-line message and exit code 2; a diverged run
with 3; a checkpoint or run folder that cannot be written (disk full, read-only) with 4; a Slurm job
that gave up restarting with 5; a collective that timed out or lost a rank with a one-line message and 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence, Tuple

from poa_hpc.commands import add_registered

# Modules that register `poa` subcommands (poa_hpc.commands.register_command): one line each.
COMMAND_MODULES: Tuple[str, ...] = (
    "poa_hpc.launch.commands",     # train, submit
    "poa_hpc.models.commands",     # extract, export, subnets
    "poa_hpc.eval.commands",       # eval knn|sweep|linear
    "poa_hpc.bench.demo",          # demo, bench demo
    "poa_hpc.bench.engines",       # bench engines
    "poa_hpc.bench.kernels",       # bench kernels, bench attention
    "poa_hpc.bench.data",          # bench data
    "poa_hpc.bench.step",          # bench step
    "poa_hpc.perf.commands",       # estimate flops|memory|comm, profile
    "poa_hpc.data.pack",           # data pack
    "poa_hpc.config_docs",         # config show
    "poa_hpc.plot",                # plot
)

GROUP_HELP = {
    "eval": "evaluate extracted sub-networks",
    "bench": "benchmarks that print a table and write JSON under benchmarks/results/",
    "estimate": "FLOPs, peak memory per rank, communication of a POA step, without a GPU (tables + JSON under "
                "benchmarks/results/)",
}


class _Version(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        from poa_hpc import version_string

        print(version_string())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poa", description="POA: pre-train once, extract models of all sizes.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action=_Version, nargs=0, help="print the version and git commit, then exit")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    groups = {}
    for name, text in GROUP_HELP.items():
        g = sub.add_parser(name, help=text, description=text)
        groups[(name,)] = g.add_subparsers(dest=f"{name}_command", required=True)
    add_registered(sub, groups)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Dotted overrides may also follow options (`poa eval sweep RUN --subnets S data.root=...`).
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for a command that relaunches itself (torchrun)
    from poa_hpc.distributed.env import setup_logging
    from poa_hpc.launch.status import classify_error, exit_rank

    setup_logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"poa {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        known = classify_error(exc)  # exit codes: see the module doc
        if known is None:
            raise  # a bug: the traceback is the report
        code, message = known
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank not in (None, "0") else ""
        print(f"poa {args.command}: error{where}: {message}", file=sys.stderr)
        return exit_rank(code)


if __name__ == "__main__":
    raise SystemExit(main())
