"""The ``poa`` command.

    poa train   --config CFG [--resume] [--nproc N [--max-restarts R]] [key=value ...]
    poa submit  --config CFG --nodes N --gpus-per-node G --partition P --time T [--max-restarts R] [key=value ...]
    poa extract CKPT [--step S] (--width W --depth D | --subnet WxD ... | --all) -o OUT
    poa eval knn SUBNET.safetensors ... [--config CFG] [key=value ...]
    poa eval knn RUN_DIR --step S --subnet WxD ...
    poa subnets --config CFG
    poa demo    [--output-dir DIR] [key=value ...]

Exit codes (poa_hpc.launch.status): errors in the user's input (config keys,
paths, sub-network sizes) end with a one-line message and exit code 2; a
diverged run with 3; a checkpoint or run folder that cannot be written (disk
full, read-only) with 4; a Slurm job that gave up restarting with 5; a
collective that timed out or lost a rank with a one-line message and 1.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from importlib import resources
from pathlib import Path
from typing import List, Optional, Sequence

from poa_hpc.config import ConfigError, POAConfig, from_dict, load_config

log = logging.getLogger("poa_hpc")


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


class WorkerFailure(RuntimeError):
    """A torchrun worker crashed or was killed (its own error is in the output): one line, exit code 1."""


def packaged_config(name: str) -> Path:
    """Path of a YAML shipped in ``configs/`` (installed as ``poa_hpc.configs``)."""
    p = resources.files("poa_hpc.configs") / name
    if not p.is_file():
        raise UsageError(f"packaged config '{name}' not found")
    return Path(str(p))


# ------------------------------------------------------------------ train
def _torchrun(argv: List[str], max_restarts: int) -> int:
    """torchrun's agent, in this process: the exit code is the workers' (2/3/4 for their known errors,
    128+N when they stopped on a signal), and a worker failure is one line here rather than
    torchrun's ChildFailedError traceback (each worker prints its own error above it)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from poa_hpc.launch.status import FATAL_EXIT_CODES

    try:
        run(parse_args(argv))
        return 0
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        root, first = exc.get_first_failure()
        codes = [f.exitcode for f in exc.failures.values()]
        fatal = [c for c in [first.exitcode, *codes] if c in FATAL_EXIT_CODES]
        if fatal:
            return fatal[0]
        if all(c > 128 for c in codes):  # every worker stopped on a signal (with a checkpoint)
            return codes[0]
        how = (f"was killed by {signal.Signals(-first.exitcode).name}" if first.exitcode < 0
               else f"exited with code {first.exitcode}")
        after = f" after {max_restarts} restart(s) (--max-restarts)" if max_restarts else ""
        raise WorkerFailure(f"rank {root} (pid {first.pid}) {how}; torchrun ended the run{after}. Its error "
                            f"is in the output above; continue with --resume") from None


def cmd_train(args: argparse.Namespace) -> int:
    import os

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
        return _torchrun(["--standalone", f"--nproc_per_node={args.nproc}", f"--max-restarts={args.max_restarts}",
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


# ------------------------------------------------------------------ extract
def _load_teacher(ckpt_path: str, which: str, step: Optional[int] = None):
    from poa_hpc.train.checkpoint import load_checkpoint
    from poa_hpc.train.meta_arch import build_branch

    try:
        ckpt = load_checkpoint(ckpt_path, step=step)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    cfg = from_dict(ckpt["config"])
    branch = build_branch(cfg, 0.0)
    prefix = f"{which}."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    branch.load_state_dict(state)
    backbone = branch.backbone.eval().requires_grad_(False)
    return cfg, backbone, int(ckpt.get("step", 0))


def _subnets_from_args(args: argparse.Namespace, space) -> List:
    from poa_hpc.models.subnets import Subnet

    if args.all:
        return space.all()
    subs = [Subnet.parse(s) for s in (args.subnet or [])]
    if args.width is not None or args.depth is not None:
        if args.width is None or args.depth is None:
            raise UsageError("--width and --depth go together")
        subs.append(Subnet(args.width, args.depth))
    if not subs:
        raise UsageError("name the sub-networks: --width W --depth D, --subnet WxD (repeatable) or --all")
    for s in subs:
        try:
            space.check(s)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return subs


def extract_to(cfg: POAConfig, backbone, subs, out: Path, single_file: bool, step: int, source: str) -> List[Path]:
    from poa_hpc.config import to_dict
    from poa_hpc.models.extract import extract_state_dict, save_subnet

    paths = []
    for sub in subs:
        arch, state = extract_state_dict(backbone, sub.width, sub.depth)
        path = out if single_file else out / f"vit_{sub.width}x{sub.depth}.safetensors"
        save_subnet(path, arch, state, width=sub.width, depth=sub.depth, step=step, source=source,
                    config=to_dict(cfg))
        paths.append(path)
    return paths


def cmd_extract(args: argparse.Namespace) -> int:
    from poa_hpc.models.subnets import SubnetSpace

    cfg, backbone, step = _load_teacher(args.checkpoint, args.branch, args.step)
    space = SubnetSpace.from_model_config(cfg.model)
    subs = _subnets_from_args(args, space)
    out = Path(args.output)
    single = len(subs) == 1 and out.suffix == ".safetensors"
    if not single and out.suffix == ".safetensors":
        raise UsageError(f"-o {out}: several sub-networks need an output folder, not a .safetensors file")
    source = f"{args.checkpoint}:{args.branch}" + (f"@step{args.step}" if args.step is not None else "")
    paths = extract_to(cfg, backbone, subs, out, single, step, source)
    for p in paths:
        print(p)
    return 0


# ------------------------------------------------------------------ eval
def _subnets_of_checkpoints(args: argparse.Namespace, tmp: Path) -> List[str]:
    """``poa eval knn`` inputs: .safetensors files as given; a run folder or training checkpoint
    (at ``--step``, default the newest) extracted to ``tmp`` first (``--subnet``, default smallest and intact)."""
    from poa_hpc.models.subnets import Subnet, SubnetSpace

    files = []
    for i, src in enumerate(args.subnets):
        if str(src).endswith(".safetensors"):
            if args.step is not None:
                raise UsageError(f"--step selects a checkpoint of a run folder; '{src}' is an extracted sub-network")
            files.append(str(src))
            continue
        cfg, backbone, step = _load_teacher(src, "teacher", args.step)
        space = SubnetSpace.from_model_config(cfg.model)
        subs = [Subnet.parse(x) for x in args.subnet] if args.subnet else [
            Subnet(space.widths[0], space.depths[0]), space.intact]
        for sub in subs:
            try:
                space.check(sub)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        out = tmp / f"{i}_step{step}"
        files += [str(p) for p in extract_to(cfg, backbone, subs, out, False, step, f"{src}@step{step}")]
    return files


def cmd_eval_knn(args: argparse.Namespace) -> int:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="poa-eval-") as tmp:
        return _eval_knn(args, _subnets_of_checkpoints(args, Path(tmp)))


def _eval_knn(args: argparse.Namespace, subnet_files: List[str]) -> int:
    import torch

    from poa_hpc.eval.evaluate import format_table, knn_evaluate
    from poa_hpc.models.extract import load_subnet

    models, meta0 = [], None
    for path in subnet_files:
        try:
            model, meta = load_subnet(path)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        meta0 = meta0 or meta
        stem = Path(path).stem
        models.append((f"{stem}@step{meta['step']}" if args.step is not None and "step" in meta else stem, model))
    # Defaults: the training config recorded in the file at extraction (its data and eval sections).
    cfg = load_config(args.config, args.overrides, base=meta0.get("config"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(format_table(knn_evaluate(models, cfg, device), "weighted k-NN"))
    return 0


# ------------------------------------------------------------------ subnets
def cmd_subnets(args: argparse.Namespace) -> int:
    from poa_hpc.models.subnets import SubnetSpace
    from poa_hpc.train.meta_arch import vit_arch
    from poa_hpc.models.vit import count_params, vit_gflops

    cfg = load_config(args.config, args.overrides)
    space = SubnetSpace.from_model_config(cfg.model)
    probs = space.probabilities()
    arch = vit_arch(cfg)
    print(f"{len(space)} sub-networks: widths {list(space.widths)}, depths {list(space.depths)}")
    print(f"{'sub-network':<12}{'params(M)':>11}{'GFLOPs':>9}{'p(sample)':>11}")
    for sub in space.all():
        a = arch.sub(sub.width, sub.depth)
        p = probs.get(sub)
        print(f"{str(sub):<12}{count_params(a) / 1e6:>11.2f}{vit_gflops(a):>9.2f}{(f'{p:.4f}' if p else 'intact'):>11}")
    return 0


# ------------------------------------------------------------------ demo
def cmd_demo(args: argparse.Namespace) -> int:
    from poa_hpc.eval.evaluate import format_table, knn_evaluate
    from poa_hpc.models.extract import load_subnet
    from poa_hpc.models.subnets import Subnet, SubnetSpace
    from poa_hpc.train.trainer import build_model, train

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    cfg = load_config(packaged_config("demo_cpu.yaml"), overrides)
    out = Path(cfg.train.output_dir)
    space = SubnetSpace.from_model_config(cfg.model)
    subs = [Subnet(space.widths[0], space.depths[0]),
            Subnet(space.widths[len(space.widths) // 2], space.depths[len(space.depths) // 2]),
            space.intact]
    print(f"POA demo: {len(space)} sub-networks; training on {cfg.data.dataset} for "
          f"{cfg.optim.epochs} epochs, output in {out}")
    t0 = time.perf_counter()
    summary = train(cfg, resume=True)
    print(f"training finished in {time.perf_counter() - t0:.0f}s (step {summary['step']})")

    init_backbone = build_model(cfg).teacher_backbone().eval()
    _, trained_backbone, step = _load_teacher(summary["checkpoint"], "teacher")
    tables = []
    for label, backbone, folder in (("at initialisation", init_backbone, out / "subnets_init"),
                                    ("after POA training (teacher)", trained_backbone, out / "subnets")):
        paths = extract_to(cfg, backbone, subs, folder, False, step, label)
        models = [(p.stem, load_subnet(p)[0]) for p in paths]
        rows = knn_evaluate(models, cfg)
        tables.append(rows)
        print()
        print(format_table(rows, f"weighted k-NN on {cfg.data.dataset} val, sub-networks {label}"))
    print()
    for a, b in zip(*tables):
        print(f"{a.name}: k-NN top-1 {a.top1:.2f}% at init -> {b.top1:.2f}% trained ({b.top1 - a.top1:+.2f})")
    print(f"\nextracted sub-networks: {out / 'subnets'}")
    return 0


# ------------------------------------------------------------------ bench
def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "engines":
        from poa_hpc.bench.engines import run

        return run(args.args)
    if args.what == "kernels":
        from poa_hpc.bench.kernels import bench_kernels

        return bench_kernels(args.args)
    if args.what == "attention":
        from poa_hpc.bench.kernels import bench_attention

        return bench_attention(args.args)
    if args.what == "data":
        from poa_hpc.bench.data import run as bench_data

        return bench_data(args.args)
    raise UsageError(f"unknown benchmark {args.what!r}")


# ------------------------------------------------------------------ submit
def cmd_submit(args: argparse.Namespace) -> int:
    from poa_hpc.launch.submit import submit

    return submit(args)


# ------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poa", description="POA: pre-train once, extract models of all sizes.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="pre-train a POA model")
    t.add_argument("--config", required=True, help="YAML config (see configs/)")
    t.add_argument("--resume", action="store_true", help="continue from <train.output_dir>/checkpoints")
    t.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (launches torchrun; needs dist.engine=fsdp, deepspeed or ddp)")
    t.add_argument("--max-restarts", type=int, default=0,
                   help="with --nproc: torchrun restarts all workers this many times when one fails (a crash, a "
                        "killed process, a collective past dist.timeout_s); they resume from the newest checkpoint")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=1e-3")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("extract", help="write dense sub-networks from a checkpoint's teacher")
    e.add_argument("checkpoint", help="training checkpoint (file, or run folder with checkpoints/last.pt)")
    e.add_argument("--step", type=int, default=None,
                   help="a kept checkpoint of a run folder (checkpoints/step_XXXXXXXX.pt) instead of the newest")
    e.add_argument("--width", type=int)
    e.add_argument("--depth", type=int)
    e.add_argument("--subnet", action="append", help="WIDTHxDEPTH, repeatable")
    e.add_argument("--all", action="store_true", help="every sub-network of the elastic space")
    e.add_argument("--branch", choices=("teacher", "student"), default="teacher")
    e.add_argument("-o", "--output", required=True, help=".safetensors file (one sub-network) or folder")
    e.set_defaults(func=cmd_extract)

    ev = sub.add_parser("eval", help="evaluate extracted sub-networks")
    evs = ev.add_subparsers(dest="eval_command", required=True)
    k = evs.add_parser("knn", help="weighted k-NN on frozen [CLS] features")
    k.add_argument("subnets", nargs="+", help="sub-network .safetensors files written by `poa extract`, or run "
                                                "folders / training checkpoints to extract them from")
    k.add_argument("--step", type=int, default=None, help="for a run folder: the kept checkpoint of this step")
    k.add_argument("--subnet", action="append", help="for a run folder: WIDTHxDEPTH, repeatable (default: the "
                                                     "smallest and the intact one)")
    k.add_argument("--config", help="config whose data/eval sections to use (default: recorded in the file)")
    k.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. data.root=/imagenet")
    k.set_defaults(func=cmd_eval_knn)

    s = sub.add_parser("subnets", help="list the elastic sub-networks and their sampling probabilities")
    s.add_argument("--config", required=True)
    s.add_argument("overrides", nargs="*")
    s.set_defaults(func=cmd_subnets)

    b = sub.add_parser("bench", help="benchmarks that print a table and write JSON under benchmarks/results/")
    b.add_argument("what", choices=("engines", "kernels", "attention", "data"),
                   help="engines: POA step img/s and peak memory per engine; kernels: sliced projection "
                        "fwd+bwd (torch, Triton, dense); attention: fwd+bwd TFLOP/s per backend; data: "
                        "multi-crop loader img/s (torchvision, DALI CPU, DALI GPU)")
    b.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options (see poa bench engines -h)")
    b.set_defaults(func=cmd_bench)

    sb = sub.add_parser("submit", help="submit a training job to Slurm (submitit; one task per GPU, "
                                        "checkpoint + requeue on time limit or preemption)")
    from poa_hpc.launch.submit import add_submit_arguments

    add_submit_arguments(sb)
    sb.set_defaults(func=cmd_submit)

    d = sub.add_parser("demo", help="train the embedded CPU demo, extract 3 sub-networks, k-NN them")
    d.add_argument("--output-dir", help="default: runs/demo")
    d.add_argument("overrides", nargs="*")
    d.set_defaults(func=cmd_demo)
    return p


def setup_logging(verbose: bool) -> None:
    """One voice per job: rank 0 logs at INFO, the other ranks only warn (torchrun's or srun's rank)."""
    import os

    from poa_hpc.distributed.env import slurm_launch_env

    rank = os.environ.get("RANK") or (slurm_launch_env() or {}).get("RANK", "0")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING if rank != "0" else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from poa_hpc.launch.status import classify_error, exit_rank

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"poa {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        known = classify_error(exc)  # exit codes: see the module doc
        if known is None:
            raise  # a bug: the traceback is the report
        code, message = known
        import os

        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank not in (None, "0") else ""
        print(f"poa {args.command}: error{where}: {message}", file=sys.stderr)
        return exit_rank(code)


if __name__ == "__main__":
    raise SystemExit(main())
