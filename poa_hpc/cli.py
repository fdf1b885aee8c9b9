"""The ``poa`` command.

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
    poa estimate flops|memory|comm --config CFG [options] [key=value ...]
    poa profile --config CFG [--steps N] [key=value ...]

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
from typing import List, Optional, Sequence, Tuple

from poa_hpc.config import POAConfig, from_dict, load_config
from poa_hpc.errors import ConfigError, UsageError, WorkerFailure

log = logging.getLogger("poa_hpc")

# Modules that register `poa` subcommands (poa_hpc.commands.register_command): one line each.
COMMAND_MODULES: Tuple[str, ...] = (
    "poa_hpc.eval.commands",  # poa eval knn|sweep|linear|latency|..., poa select
)


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


def _subnets_from_args(args: argparse.Namespace, space, named=None) -> List:
    """The sub-networks named by ``--all`` / ``--subnet WxD|NAME`` / ``--width W --depth D``, checked."""
    from poa_hpc.models.subnets import Subnet

    if args.all:
        return space.all()
    named = named or {}
    try:
        subs = [named[s] if s in named else Subnet.parse(s) for s in (args.subnet or [])]
    except ValueError as exc:
        raise UsageError(f"{exc} or a named size ({', '.join(named) or 'none in this space'})") from None
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
        arch, state = extract_state_dict(backbone, sub)
        path = out if single_file else out / f"{backbone.family}_{sub}.safetensors"
        save_subnet(path, backbone.family, arch, state, width=sub.width, depth=sub.depth, step=step, source=source,
                    config=to_dict(cfg))
        paths.append(path)
    return paths


def cmd_extract(args: argparse.Namespace) -> int:
    from poa_hpc.models.registry import get_backbone

    cfg, backbone, step = _load_teacher(args.checkpoint, args.branch, args.step)
    spec = get_backbone(cfg.model.arch)
    subs = _subnets_from_args(args, spec.space(cfg.model.section), spec.named_sizes(cfg.model.section))
    out = Path(args.output)
    single = len(subs) == 1 and out.suffix == ".safetensors"
    if not single and out.suffix == ".safetensors":
        raise UsageError(f"-o {out}: several sub-networks need an output folder, not a .safetensors file")
    source = f"{args.checkpoint}:{args.branch}" + (f"@step{args.step}" if args.step is not None else "")
    paths = extract_to(cfg, backbone, subs, out, single, step, source)
    for p in paths:
        print(p)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Sub-networks of a run (or one extracted file) as timm models or poa_hpc safetensors files."""
    from poa_hpc.config import to_dict
    from poa_hpc.models.extract import export_timm, extract_state_dict, read_subnet, save_subnet
    from poa_hpc.models.registry import get_backbone

    src = Path(args.source)
    items = []  # (family, dense arch, tensors, sub-network, provenance)
    if src.suffix == ".safetensors":
        if args.subnet or args.all or args.width is not None or args.depth is not None:
            raise UsageError(f"'{src}' holds one extracted sub-network; --subnet/--all/--width/--depth select "
                             "sub-networks of a run or checkpoint")
        try:
            family, arch, state, meta = read_subnet(src)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        sub = get_backbone(family).space(arch).intact
        items.append((family, arch, state, sub, {"source": str(src), "step": meta.get("step"),
                                                 "run": meta.get("source"), "config": meta.get("config")}))
    else:
        cfg, backbone, step = _load_teacher(args.source, args.branch)
        spec = get_backbone(cfg.model.arch)
        for sub in _subnets_from_args(args, spec.space(cfg.model.section), spec.named_sizes(cfg.model.section)):
            arch, state = extract_state_dict(backbone, sub)
            items.append((cfg.model.arch, arch, state, sub, {"source": f"{args.source}:{args.branch}", "step": step,
                                                            "run": str(src), "config": to_dict(cfg)}))
    out = Path(args.output)
    for family, arch, state, sub, prov in items:
        stem = out / f"{family}_{sub}"
        if args.format == "safetensors":
            print(save_subnet(stem.with_suffix(".safetensors"), family, arch, state, width=sub.width, depth=sub.depth,
                              step=prov["step"], source=prov["source"], config=prov["config"]))
            continue
        if args.format == "onnx":
            from poa_hpc.models.onnx_export import export_onnx

            dense = get_backbone(family).build_dense(arch)
            dense.load_state_dict(state)
            size = args.img_size or getattr(arch, "img_size", None) or 224
            diff = export_onnx(dense, size, stem.with_suffix(".onnx"))
            print(f"{stem.with_suffix('.onnx')}  (input {size} px, onnxruntime vs PyTorch max abs diff {diff:.2e})")
            continue
        try:
            weights, info = export_timm(stem, family, arch, state, img_size=args.img_size, run=prov["run"],
                                        step=prov["step"], width=sub.width, depth=sub.depth)
        except (NotImplementedError, ValueError) as exc:
            raise UsageError(f"--format timm: {exc}") from None
        print(f"{weights}  {info}")
    return 0


# ------------------------------------------------------------------ subnets
def cmd_subnets(args: argparse.Namespace) -> int:
    from poa_hpc.models.registry import get_backbone

    cfg = load_config(args.config, args.overrides)
    spec, arch = get_backbone(cfg.model.arch), cfg.model.section
    space = spec.space(arch)
    probs = space.probabilities()
    names = {sub: name for name, sub in spec.named_sizes(arch).items()}
    depths = [str(d) if not isinstance(d, tuple) else "-".join(map(str, d)) for d in space.depths]
    shown = depths if len(depths) <= 16 else depths[:4] + ["..."] + depths[-2:]
    print(f"{cfg.model.arch}: {len(space)} sub-networks: widths {list(space.widths)}, "
          f"{len(depths)} depths {', '.join(shown)}; pool of {sum(space.weights().values())} (eq. 14, s={space.s})")
    print(f"{'sub-network':<16}{'name':<8}{'params(M)':>11}{'GFLOPs':>9}{'p(sample)':>11}")
    for sub in space.all():
        p = probs.get(sub)
        print(f"{str(sub):<16}{names.get(sub, ''):<8}{spec.params(arch, sub) / 1e6:>11.2f}"
              f"{spec.gflops(arch, sub):>9.2f}{(f'{p:.4f}' if p else 'intact'):>11}")
    return 0


# ------------------------------------------------------------------ demo
def cmd_demo(args: argparse.Namespace) -> int:
    from poa_hpc.bench.demo import demo_subnets
    from poa_hpc.eval.baseline import raw_pixel_knn
    from poa_hpc.eval.evaluate import format_table, knn_evaluate
    from poa_hpc.eval.sweep import format_sweep_table, run_sweep
    from poa_hpc.models.extract import load_subnet
    from poa_hpc.models.registry import get_backbone
    from poa_hpc.train.trainer import build_model, train

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    cfg = load_config(args.config or packaged_config("demo_cpu.yaml"), overrides)
    if args.linear_epochs < 1:
        raise UsageError(f"--linear-epochs {args.linear_epochs}: expected a positive number of epochs")
    out = Path(cfg.train.output_dir)
    space = get_backbone(cfg.model.arch).space(cfg.model.section)
    subs = demo_subnets(space)
    t_start = time.perf_counter()
    baseline = raw_pixel_knn(cfg)
    print(f"POA demo: {len(space)} sub-networks; training on {cfg.data.dataset} for "
          f"{cfg.optim.epochs} epochs, output in {out}")
    print(f"reference: weighted k-NN (k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature:g}) on the centred raw pixels "
          f"of the same split: {baseline:.2f}%")
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

    print(f"\nevery sub-network of the trained teacher (k-NN and linear probe):")
    sweep_dir = out / "sweep"
    rows = run_sweep(cfg, trained_backbone, space.all(), sweep_dir, source=f"{summary['checkpoint']}:teacher",
                     step=step, epochs=args.linear_epochs, device="cpu", progress=False)
    print(format_sweep_table(rows))

    print(f"\nraw pixels (centred): k-NN top-1 {baseline:.2f}%")
    for a, b in zip(*tables):
        print(f"{a.name}: k-NN top-1 {a.top1:.2f}% at init -> {b.top1:.2f}% trained ({b.top1 - a.top1:+.2f})")
    print(f"\nextracted sub-networks: {out / 'subnets'}")
    plot = sweep_dir / "sweep.png"
    print(f"sweep of all {len(rows)} sub-networks: {sweep_dir / 'sweep.json'}, {sweep_dir / 'sweep.csv'}"
          + (f"\nplot: {plot}" if plot.is_file() else " (no plot: matplotlib is not installed)"))
    print(f"demo finished in {time.perf_counter() - t_start:.0f}s")
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
    if args.what == "step":
        from poa_hpc.bench.step import run as bench_step

        return bench_step(args.args)
    if args.what == "demo":
        from poa_hpc.bench.demo import run as bench_demo

        return bench_demo(args.args)
    raise UsageError(f"unknown benchmark {args.what!r}")


# ------------------------------------------------------------------ estimate, profile
def cmd_estimate(args: argparse.Namespace) -> int:
    from poa_hpc.perf.cli import estimate

    return estimate(args.what, args.args)


def cmd_profile(args: argparse.Namespace) -> int:
    from poa_hpc.perf.profile import profile

    return profile(args)


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
    e.add_argument("--subnet", action="append",
                   help="WIDTHxDEPTH (384x12; per-stage depths 64x3-4-6-3) or a named size (ViT-S), repeatable")
    e.add_argument("--all", action="store_true", help="every sub-network of the elastic space")
    e.add_argument("--branch", choices=("teacher", "student"), default="teacher")
    e.add_argument("-o", "--output", required=True, help=".safetensors file (one sub-network) or folder")
    e.set_defaults(func=cmd_extract)

    x = sub.add_parser("export", help="write sub-networks as timm models (safetensors + JSON) or poa_hpc files")
    x.add_argument("source", help="run folder / training checkpoint, or one extracted .safetensors file")
    x.add_argument("--format", choices=("timm", "safetensors", "onnx"), default="timm",
                   help="timm: state dict + JSON for timm.create_model; safetensors: poa_hpc files (as poa extract); "
                        "onnx: opset 18, dynamic batch, checked against PyTorch with onnxruntime")
    x.add_argument("--subnet", action="append", help="WIDTHxDEPTH or a named size (ViT-S), repeatable")
    x.add_argument("--all", action="store_true", help="every sub-network of the elastic space")
    x.add_argument("--width", type=int)
    x.add_argument("--depth", type=int)
    x.add_argument("--img-size", type=int, help="input size the timm model is built for (default: the native size)")
    x.add_argument("--branch", choices=("teacher", "student"), default="teacher")
    x.add_argument("-o", "--output", required=True, help="output folder")
    x.set_defaults(func=cmd_export)

    groups = {}

    s = sub.add_parser("subnets", help="list the elastic sub-networks and their sampling probabilities")
    s.add_argument("--config", required=True)
    s.add_argument("overrides", nargs="*")
    s.set_defaults(func=cmd_subnets)

    b = sub.add_parser("bench", help="benchmarks that print a table and write JSON under benchmarks/results/")
    b.add_argument("what", choices=("engines", "kernels", "attention", "data", "step", "demo"),
                   help="engines: POA step img/s and peak memory per engine; kernels: sliced projection "
                        "fwd+bwd (torch, Triton, dense); attention: fwd+bwd TFLOP/s per backend; data: "
                        "multi-crop loader img/s (torchvision, DALI CPU, DALI GPU); step: one device's POA step "
                        "(img/s, MFU, phase times, peak memory vs poa estimate memory); demo: train demo recipes, "
                        "k-NN of their sub-networks, CPU time, collapse")
    b.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options (see poa bench engines -h)")
    b.set_defaults(func=cmd_bench)

    es = sub.add_parser("estimate", help="FLOPs, peak memory per rank, communication of a POA step, without a GPU "
                                          "(tables + JSON under benchmarks/results/)")
    es.add_argument("what", choices=("flops", "memory", "comm"),
                    help="flops: FLOPs per part, eq. 14 expectation, GPU-hours at an MFU; memory: peak device memory "
                         "per rank (fake tensors, fake process group); comm: bytes per rank and engine, scaling floor")
    es.add_argument("args", nargs=argparse.REMAINDER, help="options (see poa estimate flops -h)")
    es.set_defaults(func=cmd_estimate)

    pr = sub.add_parser("profile", help="a few steps under torch.profiler: Chrome trace, memory snapshot (CUDA), "
                                        "top operators, per-phase times")
    from poa_hpc.perf.profile import add_arguments as add_profile_arguments

    add_profile_arguments(pr)
    pr.set_defaults(func=cmd_profile)

    sb = sub.add_parser("submit", help="submit a training job to Slurm (submitit; one task per GPU, "
                                        "checkpoint + requeue on time limit or preemption)")
    from poa_hpc.launch.submit import add_submit_arguments

    add_submit_arguments(sb)
    sb.set_defaults(func=cmd_submit)

    d = sub.add_parser("demo", help="train the embedded CPU demo, k-NN 3 sub-networks against raw pixels, "
                                    "sweep all sub-networks (k-NN + linear probe, plot)")
    d.add_argument("--config", help="default: the packaged configs/demo_cpu.yaml (ViT); "
                                     "configs/swin_demo_cpu.yaml is the Swin demo")
    d.add_argument("--output-dir", help="default: the config's train.output_dir (runs/demo)")
    d.add_argument("--linear-epochs", type=int, default=100, help="linear-probe epochs of the final sweep")
    d.add_argument("overrides", nargs="*")
    d.set_defaults(func=cmd_demo)

    import importlib

    from poa_hpc.commands import add_registered

    for module in COMMAND_MODULES:
        importlib.import_module(module)
    add_registered(sub, groups)
    return p


def setup_logging(verbose: bool) -> None:
    """One voice per job: rank 0 logs at INFO, the other ranks only warn (torchrun's or srun's rank)."""
    import os

    from poa_hpc.distributed.env import slurm_launch_env

    rank = os.environ.get("RANK") or (slurm_launch_env() or {}).get("RANK", "0")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING if rank != "0" else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Dotted overrides may also follow options (`poa eval sweep RUN --subnets S data.root=...`).
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(args.verbose)
    from poa_hpc.launch.status import classify_error, exit_rank

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"poa {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
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
