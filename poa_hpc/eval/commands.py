"""``poa eval knn|sweep|<protocol>`` and ``poa select``: the evaluation commands.

``poa eval sweep RUN --protocols knn,linear,latency`` runs any registered protocols
(:mod:`poa_hpc.eval.protocols`) on many sub-networks of a run; ``poa eval <protocol> FILES...`` runs
one on extracted files (``poa eval knn`` also takes run folders)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from poa_hpc.commands import register_command
from poa_hpc.config import load_config
from poa_hpc.errors import UsageError
from poa_hpc.eval import select as _select  # noqa: F401  (registers `poa select`)
from poa_hpc.eval.protocols import get_protocol, protocol_names


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-per-class", type=int, metavar="N",
                   help="use N training images per class (seeded subsample; default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsample and of the linear probe")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward batch (default: %(default)s)")
    p.add_argument("--max-feature-gb", type=float, default=8.0,
                   help="memory for cached features; more networks than fit are run in several passes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _check_data_args(args: argparse.Namespace) -> None:
    if args.train_per_class is not None and args.train_per_class < 1:
        raise UsageError(f"--train-per-class {args.train_per_class}: expected a positive number of images per class")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: expected a positive number")
    if not args.max_feature_gb > 0:
        raise UsageError(f"--max-feature-gb {args.max_feature_gb}: expected a positive size")


def _runs(protocols, args, cfg):
    try:
        return [(p, p.options(args, cfg)) for p in protocols]
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# ------------------------------------------------------------------ eval knn
def _subnets_of_checkpoints(args: argparse.Namespace, tmp: Path):
    from poa_hpc.config import to_dict
    from poa_hpc.models.extract import extract_to
    from poa_hpc.models.registry import get_backbone
    from poa_hpc.models.subnets import Subnet
    from poa_hpc.train.load import load_teacher

    files = []
    for i, src in enumerate(args.subnets):
        if str(src).endswith(".safetensors"):
            if args.step is not None:
                raise UsageError(f"--step selects a checkpoint of a run folder; '{src}' is an extracted sub-network")
            files.append(str(src))
            continue
        cfg, backbone, step = load_teacher(src, "teacher", args.step)
        spec = get_backbone(cfg.model.arch)
        space, named = spec.space(cfg.model.section), spec.named_sizes(cfg.model.section)
        try:
            subs = [named[x] if x in named else Subnet.parse(x) for x in args.subnet] if args.subnet else [
                min(space.all()), space.intact]
            for sub in subs:
                space.check(sub)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        files += [str(p) for p in extract_to(backbone, subs, tmp / f"{i}_step{step}", False, step, f"{src}@step{step}", to_dict(cfg))]
    return files


@register_command("eval knn")
class EvalKnnCommand:
    """Weighted k-NN on frozen [CLS] features of extracted sub-networks (or of a run's sub-networks)."""

    @staticmethod
    def add_arguments(k: argparse.ArgumentParser) -> None:
        k.add_argument("subnets", nargs="+", help="sub-network .safetensors files written by `poa extract`, or run "
                                                    "folders / training checkpoints to extract them from")
        k.add_argument("--step", type=int, default=None, help="for a run folder: the kept checkpoint of this step")
        k.add_argument("--subnet", action="append", help="for a run folder: WIDTHxDEPTH, repeatable (default: the "
                                                         "smallest and the intact one)")
        k.add_argument("--config", help="config whose data/eval sections to use (default: recorded in the file)")
        k.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. data.root=/imagenet")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        import torch

        from poa_hpc.eval.evaluate import format_table, knn_evaluate
        from poa_hpc.eval.source import load_subnet_files, split_files_and_overrides

        split_files_and_overrides(args, "subnets", " (or, for poa eval knn, a run folder)")
        with tempfile.TemporaryDirectory(prefix="poa-eval-") as tmp:
            files = _subnets_of_checkpoints(args, Path(tmp))
            models, meta0 = load_subnet_files(files, with_step=args.step is not None)
            cfg = load_config(args.config, args.overrides, base=meta0.get("config"))
            device = "cuda" if torch.cuda.is_available() else "cpu"
            print(format_table(knn_evaluate(models, cfg, device), "weighted k-NN"))
        return 0


# ------------------------------------------------------------------ eval <protocol> FILES
def _file_command(name: str) -> type:
    proto = get_protocol(name)

    class FileProtocolCommand:
        @staticmethod
        def add_arguments(p: argparse.ArgumentParser) -> None:
            p.add_argument("subnets", nargs="+", help="sub-network .safetensors files written by `poa extract`")
            p.add_argument("--config", help="config whose data/eval sections to use (default: recorded in the file)")
            _add_data_arguments(p)
            proto.add_arguments(p)
            if proto.distributed:
                p.add_argument("--nproc", type=int, default=1,
                               help="data-parallel processes on this machine (launches torchrun; under torchrun or "
                                    "srun the ranks come from the launcher)")
                p.add_argument("--dist-timeout", type=float, default=600,
                               help="seconds a collective waits for the other ranks (default: %(default)s)")
            p.set_defaults(overrides=[])

        @staticmethod
        def run(args: argparse.Namespace) -> int:
            return run_on_files(proto, args)

    FileProtocolCommand.__doc__ = f"{proto.help[0].upper() + proto.help[1:]} (extracted sub-networks)."
    return FileProtocolCommand


def _relaunch_under_torchrun(args: argparse.Namespace) -> int:
    """``--nproc N`` outside a launch: the same command under torchrun, N processes on this machine."""
    from poa_hpc.distributed.torchrun import torchrun

    argv, skip = [], False
    for a in args.argv:  # the command line less --nproc
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            argv.append(a)
    return torchrun(["--standalone", f"--nproc_per_node={args.nproc}", "-m", "poa_hpc", *argv], 0)


def _join_launch(args: argparse.Namespace):
    """The process group of a distributed protocol under torchrun / srun (``None`` for one process); on
    ranks other than 0 the progress output is off."""
    import os

    from poa_hpc.distributed.env import init_distributed, slurm_launch_env

    if args.nproc < 1:
        raise UsageError(f"--nproc {args.nproc}: expected a positive number of processes")
    launched = "RANK" in os.environ or slurm_launch_env() is not None
    if not launched:
        return None
    # srun without MASTER_PORT: rank 0 publishes its port in a folder every rank sees (--ft-out's)
    ctx = init_distributed("auto", args.dist_timeout, getattr(args, "ft_out", None))
    if not ctx.is_main:
        args.no_progress = True
    return ctx


def run_on_files(proto, args: argparse.Namespace) -> int:
    """``poa eval <protocol> FILES``: the protocol on extracted sub-network files, as a table.

    A distributed protocol (``finetune``) with ``--nproc N`` relaunches the command under torchrun; under
    torchrun / srun every rank runs it together and rank 0 prints the table."""
    if proto.distributed:
        import os

        from poa_hpc.distributed.env import slurm_launch_env

        if args.nproc > 1 and "RANK" not in os.environ and slurm_launch_env() is None:
            return _relaunch_under_torchrun(args)
        ctx = _join_launch(args)
        try:
            code = _run_on_files(proto, args, ctx is None or ctx.is_main)
        except BaseException:
            if ctx is not None and ctx.distributed:  # no barrier: the other ranks may be gone
                import torch.distributed

                torch.distributed.destroy_process_group()
            raise
        if ctx is not None and ctx.distributed:
            from poa_hpc.distributed.env import shutdown

            shutdown()
        return code
    return _run_on_files(proto, args, True)


def _run_on_files(proto, args: argparse.Namespace, main: bool) -> int:
    import torch

    from poa_hpc.eval.evaluate import dense_cost
    from poa_hpc.eval.source import load_subnet_files, split_files_and_overrides
    from poa_hpc.eval.sweep import SweepRow, eval_splits, evaluate_networks, format_sweep_table, measure_networks
    from poa_hpc.models.registry import get_backbone

    _check_data_args(args)
    split_files_and_overrides(args, "subnets")
    models, meta0 = load_subnet_files(args.subnets)
    cfg = load_config(args.config, args.overrides, base=meta0.get("config"))
    runs = _runs([proto], args, cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        train, val, num_classes, _ = eval_splits(cfg, args.train_per_class or 0, args.seed)
        img_size = int(val[0][0].shape[-1])
        costs = [dense_cost(m, img_size) for _, m in models]
        values = [{} for _ in models]
        if "features" in proto.needs:
            dims = [get_backbone(m.family).feature_dim(m.arch, sub.width) for (_, m), (sub, _, _) in zip(models, costs)]
            n_img = len(train) + len(val)
            print(f"{proto.name}: {n_img:,} images ({len(train):,} train + {len(val):,} val, {cfg.data.dataset} at "
                  f"{img_size} px) x {len(models)} networks = {n_img * len(models):,} forward passes "
                  f"(~{n_img * sum(c[2] for c in costs):,.0f} GFLOPs)")
            nets = [m.to(device) for _, m in models]
            extractors = [lambda x, m=m: m(x, features=True) for m in nets]
            values = evaluate_networks(extractors, train, val, num_classes, feature_dims=dims, protocols=runs,
                                       batch_size=args.batch_size, num_workers=cfg.data.num_workers, device=device,
                                       max_feature_gb=args.max_feature_gb, progress=not args.no_progress)
        if "model" in proto.needs:
            measured = measure_networks([lambda m=m: m.cpu().eval() for _, m in models], img_size, runs,
                                        progress=not args.no_progress)
            values = [{**v, **m} for v, m in zip(values, measured)]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    rows = [SweepRow(name, "", sub.width, sub.depth, params / 1e6, gflops, v)
            for (name, _), (sub, params, gflops), v in zip(models, costs, values)]
    if not main:
        return 0
    for p, opts in runs:
        p.after(rows, opts, print)
    print(format_sweep_table(rows, title=proto.help, protocols=runs))
    return 0


for _name in protocol_names():
    if _name != "knn":
        register_command(f"eval {_name}")(_file_command(_name))


# ------------------------------------------------------------------ eval sweep
@register_command("eval sweep")
class EvalSweepCommand:
    """Evaluation protocols (k-NN, linear probe, latency, ...) of many sub-networks straight from the elastic teacher.

    JSON, CSV and a plot of each metric against GFLOPs and the measured costs, with the Pareto front."""

    @staticmethod
    def add_arguments(sw: argparse.ArgumentParser) -> None:
        sw.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                        help="training checkpoint (file, or run folder with checkpoints/last.pt)")
        sw.add_argument("--subnets", default="all",
                        help="all (default), named sizes (ViT-S or S), WIDTHxDEPTH (384x12; 64x3-4-6-3), comma-separated")
        sw.add_argument("--protocols", default="knn,linear",
                        help=f"evaluation protocols, comma-separated, of: {', '.join(protocol_names())} "
                             "(default: %(default)s)")
        sw.add_argument("--out", help="output folder (default: <run>/eval)")
        sw.add_argument("--branch", choices=("teacher", "student"), default="teacher")
        sw.add_argument("--no-linear", action="store_true", help="leave out the linear probe (k-NN only)")
        sw.add_argument("--reference", metavar="CSV",
                        help="reference points to plot (columns name,gflops,accuracy[,metric]), e.g. "
                             "benchmarks/reference/poa_paper_vit.csv")
        sw.add_argument("--reference-label", help="legend of the reference points (default: the file name)")
        sw.add_argument("--config", help="config whose data/eval sections to use (default: the run's)")
        _add_data_arguments(sw)
        for name in protocol_names():
            get_protocol(name).add_arguments(sw)
        for name in protocol_names():
            if "model" in get_protocol(name).needs:
                sw.add_argument(f"--{name}-subnets", metavar="SUBNETS",
                                help=f"run {name} on these of --subnets only (same names, and smallest, middle, "
                                     "intact); the other rows get an empty column (default: all)")
        sw.add_argument("overrides", nargs="*", default=[],
                        help="dotted overrides of data.* / eval.*, e.g. data.root=/imagenet")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from poa_hpc.config import to_dict
        from poa_hpc.eval.plot import read_reference
        from poa_hpc.eval.protocols import resolve_protocols
        from poa_hpc.eval.source import run_folder
        from poa_hpc.eval.sweep import format_sweep_table, resolve_subnets, run_sweep
        from poa_hpc.train.load import load_teacher

        _check_data_args(args)
        try:
            protocols = [p for p in resolve_protocols(args.protocols) if not (args.no_linear and p.name == "linear")]
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        model_keys = [o for o in args.overrides if o.split("=", 1)[0].strip().startswith("model.")]
        if model_keys:
            raise UsageError(f"override {model_keys[0]!r}: the model comes from the checkpoint; only data.* and "
                             "eval.* apply to an evaluation")
        try:
            reference = read_reference(args.reference) if args.reference else None
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        train_cfg, backbone, step = load_teacher(args.checkpoint, args.branch)
        try:
            subs = resolve_subnets(train_cfg.model.arch, train_cfg.model.section, args.subnets)
            subsets = {}
            for p in protocols:
                text = getattr(args, f"{p.name}_subnets", None) if "model" in p.needs else None
                if text:
                    try:
                        subsets[p.name] = resolve_subnets(train_cfg.model.arch, train_cfg.model.section, text)
                    except ValueError as exc:
                        raise ValueError(f"--{p.name}-subnets: {str(exc).removeprefix('--subnets: ')}") from None
            given = [p for p in protocol_names() if getattr(args, f"{p}_subnets", None) and p not in subsets]
            if given:
                raise ValueError(f"--{given[0]}-subnets: add {given[0]} to --protocols")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        # Data and evaluation settings: the run's, then --config, then overrides; the model stays the checkpoint's.
        cfg = load_config(args.config, args.overrides, base=to_dict(train_cfg))
        cfg.model = train_cfg.model
        runs = _runs(protocols, args, cfg)
        out = Path(args.out) if args.out else run_folder(args.checkpoint) / "eval"
        try:
            rows = run_sweep(cfg, backbone, subs, out, source=f"{args.checkpoint}:{args.branch}", step=step,
                             train_per_class=args.train_per_class or 0, protocols=runs, seed=args.seed,
                             batch_size=args.batch_size, reference=reference,
                             reference_label=args.reference_label or (Path(args.reference).stem if args.reference else ""),
                             max_feature_gb=args.max_feature_gb, progress=not args.no_progress,
                             protocol_subnets=subsets)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        print(format_sweep_table(rows, protocols=runs))
        return 0
