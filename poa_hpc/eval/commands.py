"""``poa eval knn|sweep|linear``: k-NN and linear probes of extracted sub-networks or of a run's elastic teacher."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Sequence, Tuple

from poa_hpc.commands import register_command
from poa_hpc.config import load_config
from poa_hpc.errors import UsageError


def _subnets_of_checkpoints(args: argparse.Namespace, tmp: Path) -> List[str]:
    """``poa eval knn`` inputs: .safetensors files as given; a run folder or training checkpoint
    (at ``--step``, default the newest) extracted to ``tmp`` first (``--subnet``, default smallest and intact)."""
    from poa_hpc.config import to_dict
    from poa_hpc.models.extract import extract_to
    from poa_hpc.models.registry import get_backbone
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
            subs = [s for x in args.subnet for s in space.resolve(x, named)] if args.subnet else [
                min(space.all()), space.intact]
        except ValueError as exc:
            raise UsageError(f"--subnet {exc}") from None
        out = tmp / f"{i}_step{step}"
        files += [str(p) for p in extract_to(backbone, subs, out, False, step, f"{src}@step{step}", to_dict(cfg))]
    return files


def _split_files_and_overrides(args: argparse.Namespace, attr: str) -> None:
    """`nargs="+"` also takes dotted overrides written after the files: an argument with '=' that is no file is
    one; move those from ``args.<attr>`` to ``args.overrides``."""
    items = getattr(args, attr)
    files = [a for a in items if "=" not in a or Path(a).exists()]
    args.overrides = [a for a in items if a not in files] + list(args.overrides)
    setattr(args, attr, files)
    if not files:
        raise UsageError("name the sub-network files written by `poa extract` (or, for poa eval knn, a run folder)")


def cmd_eval_knn(args: argparse.Namespace) -> int:
    import tempfile

    _split_files_and_overrides(args, "subnets")
    with tempfile.TemporaryDirectory(prefix="poa-eval-") as tmp:
        return _eval_knn(args, _subnets_of_checkpoints(args, Path(tmp)))


def _load_subnet_files(paths: Sequence[str], with_step: bool = False) -> Tuple[list, dict]:
    """``[(name, model)]`` of extracted sub-network files and the first file's metadata; a missing or foreign
    file is a one-line error.  The name is the file's stem (``@step<N>`` appended with ``with_step``)."""
    from poa_hpc.models.extract import load_subnet

    models, meta0 = [], None
    for path in paths:
        try:
            model, meta = load_subnet(path)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        meta0 = meta0 or meta
        stem = Path(path).stem
        models.append((f"{stem}@step{meta['step']}" if with_step and "step" in meta else stem, model))
    return models, meta0


def _eval_knn(args: argparse.Namespace, subnet_files: List[str]) -> int:
    import torch

    from poa_hpc.eval.evaluate import format_table, knn_evaluate

    models, meta0 = _load_subnet_files(subnet_files, with_step=args.step is not None)
    # Defaults: the training config recorded in the file at extraction (its data and eval sections).
    cfg = load_config(args.config, args.overrides, base=meta0.get("config"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(format_table(knn_evaluate(models, cfg, device), "weighted k-NN"))
    return 0


def _parse_lrs(text: str) -> tuple:
    try:
        lrs = tuple(float(v) for v in text.split(","))
    except ValueError:
        lrs = ()
    if not lrs or not all(lr > 0 for lr in lrs):
        raise UsageError(f"--lrs {text!r}: expected comma-separated positive learning rates, e.g. 0.01,0.1,1")
    return lrs


def _check_probe_args(args: argparse.Namespace) -> None:
    if args.train_per_class is not None and args.train_per_class < 1:
        raise UsageError(f"--train-per-class {args.train_per_class}: expected a positive number of images per class")
    if args.linear_epochs < 1:
        raise UsageError(f"--linear-epochs {args.linear_epochs}: expected a positive number")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: expected a positive number")
    if not args.max_feature_gb > 0:
        raise UsageError(f"--max-feature-gb {args.max_feature_gb}: expected a positive size")


def _run_folder(checkpoint: str) -> Path:
    """The run folder of a checkpoint argument (a run folder, its checkpoints/ folder or a file in it)."""
    p = Path(checkpoint)
    if p.is_file():
        p = p.parent
    return p.parent if p.name == "checkpoints" else p


def cmd_eval_sweep(args: argparse.Namespace) -> int:
    from poa_hpc.config import to_dict
    from poa_hpc.eval.plot import read_reference
    from poa_hpc.eval.sweep import format_sweep_table, resolve_subnets, run_sweep
    from poa_hpc.train.load import load_teacher

    _check_probe_args(args)
    lrs = _parse_lrs(args.lrs)
    model_keys = [o for o in args.overrides if o.split("=", 1)[0].strip().startswith("model.")]
    if model_keys:
        raise UsageError(f"override {model_keys[0]!r}: the model comes from the checkpoint; only data.* and eval.* "
                         "apply to an evaluation")
    try:
        reference = read_reference(args.reference) if args.reference else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    train_cfg, backbone, step = load_teacher(args.checkpoint, args.branch)
    try:
        subs = resolve_subnets(train_cfg.model.arch, train_cfg.model.section, args.subnets)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    # Data and evaluation settings: the run's, then --config, then overrides; the model stays the checkpoint's.
    cfg = load_config(args.config, args.overrides, base=to_dict(train_cfg))
    cfg.model = train_cfg.model
    out = Path(args.out) if args.out else _run_folder(args.checkpoint) / "eval"
    try:
        rows = run_sweep(cfg, backbone, subs, out, source=f"{args.checkpoint}:{args.branch}", step=step,
                         train_per_class=args.train_per_class or 0, linear=not args.no_linear, lrs=lrs,
                         epochs=args.linear_epochs, seed=args.seed, batch_size=args.batch_size,
                         reference=reference,
                         reference_label=args.reference_label or (Path(args.reference).stem if args.reference else ""),
                         max_feature_gb=args.max_feature_gb, progress=not args.no_progress)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(format_sweep_table(rows))
    return 0


def cmd_eval_linear(args: argparse.Namespace) -> int:
    import torch

    from poa_hpc.eval.evaluate import dense_cost
    from poa_hpc.eval.sweep import SweepRow, eval_splits, evaluate_networks, format_sweep_table, warn_grid_edge
    from poa_hpc.models.registry import get_backbone

    _check_probe_args(args)
    lrs = _parse_lrs(args.lrs)
    _split_files_and_overrides(args, "subnets")
    models, meta0 = _load_subnet_files(args.subnets)
    cfg = load_config(args.config, args.overrides, base=meta0.get("config"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        train, val, num_classes, _ = eval_splits(cfg, args.train_per_class or 0, args.seed)
        img_size = int(val[0][0].shape[-1])
        costs = [dense_cost(m, img_size) for _, m in models]
        dims = [get_backbone(m.family).feature_dim(m.arch, sub.width) for (_, m), (sub, _, _) in zip(models, costs)]
        n_img = len(train) + len(val)
        print(f"linear probe: {n_img:,} images ({len(train):,} train + {len(val):,} val, {cfg.data.dataset} at "
              f"{img_size} px) x {len(models)} networks = {n_img * len(models):,} forward passes "
              f"(~{n_img * sum(c[2] for c in costs):,.0f} GFLOPs); learning rates {list(lrs)}, best on val")
        extractors = [lambda x, m=m.to(device): m(x, features=True) for _, m in models]  # noqa: B008
        results = evaluate_networks(extractors, train, val, num_classes, feature_dims=dims, knn=None, linear=True,
                                    lrs=lrs, epochs=args.linear_epochs, seed=args.seed, batch_size=args.batch_size,
                                    num_workers=cfg.data.num_workers, device=device,
                                    max_feature_gb=args.max_feature_gb, progress=not args.no_progress)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    rows = [SweepRow(name, "", sub.width, sub.depth, params / 1e6, gflops, None, r.linear.top1, r.linear.lr)
            for (name, _), (sub, params, gflops), r in zip(models, costs, results)]
    warn_grid_edge(rows, lrs, print)
    print(format_sweep_table(rows, title="linear probe (final-norm [CLS] + mean patch tokens; best lr on val)"))
    return 0


def _add_probe_arguments(p: argparse.ArgumentParser) -> None:
    from poa_hpc.eval.linear import LR_GRID

    p.add_argument("--train-per-class", type=int, metavar="N",
                   help="use N training images per class (seeded subsample; default: all)")
    p.add_argument("--lrs", default=",".join(f"{v:g}" for v in LR_GRID),
                   help="linear probe learning-rate grid, comma-separated (default: %(default)s)")
    p.add_argument("--linear-epochs", type=int, default=100, help="linear probe epochs (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsample and of the linear probe")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward batch (default: %(default)s)")
    p.add_argument("--max-feature-gb", type=float, default=8.0,
                   help="memory for cached features; more networks than fit are run in several passes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


@register_command("eval knn")
class EvalKnnCommand:
    """weighted k-NN on frozen [CLS] features"""

    @staticmethod
    def add_arguments(k: argparse.ArgumentParser) -> None:
        k.add_argument("subnets", nargs="+", help="sub-network .safetensors files written by `poa extract`, or run "
                                                    "folders / training checkpoints to extract them from")
        k.add_argument("--step", type=int, default=None, help="for a run folder: the kept checkpoint of this step")
        k.add_argument("--subnet", action="append", help="for a run folder: WIDTHxDEPTH, repeatable (default: the "
                                                         "smallest and the intact one)")
        k.add_argument("--config", help="config whose data/eval sections to use (default: recorded in the file)")
        k.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. data.root=/imagenet")

    run = staticmethod(cmd_eval_knn)


@register_command("eval sweep")
class EvalSweepCommand:
    """k-NN and linear probe of many sub-networks straight from the elastic teacher; JSON, CSV and an accuracy-vs-GFLOPs plot"""

    @staticmethod
    def add_arguments(sw: argparse.ArgumentParser) -> None:
        sw.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                        help="training checkpoint (file, or run folder with checkpoints/last.pt)")
        sw.add_argument("--subnets", default="all",
                        help="all (default), named sizes (ViT-S or S), WIDTHxDEPTH (384x12; 64x3-4-6-3), comma-separated")
        sw.add_argument("--out", help="output folder (default: <run>/eval)")
        sw.add_argument("--branch", choices=("teacher", "student"), default="teacher")
        sw.add_argument("--no-linear", action="store_true", help="k-NN only")
        sw.add_argument("--reference", metavar="CSV",
                        help="reference points to plot (columns name,gflops,accuracy[,metric]), e.g. "
                             "benchmarks/reference/poa_paper_vit.csv")
        sw.add_argument("--reference-label", help="legend of the reference points (default: the file name)")
        sw.add_argument("--config", help="config whose data/eval sections to use (default: the run's)")
        _add_probe_arguments(sw)
        sw.add_argument("overrides", nargs="*", default=[],
                        help="dotted overrides of data.* / eval.*, e.g. data.root=/imagenet")

    run = staticmethod(cmd_eval_sweep)


@register_command("eval linear")
class EvalLinearCommand:
    """linear probe (DINOv2 protocol on cached features) of extracted sub-networks"""

    @staticmethod
    def add_arguments(li: argparse.ArgumentParser) -> None:
        li.add_argument("subnets", nargs="+", help="sub-network .safetensors files written by `poa extract`")
        li.add_argument("--config", help="config whose data/eval sections to use (default: recorded in the file)")
        _add_probe_arguments(li)
        li.set_defaults(overrides=[])

    run = staticmethod(cmd_eval_linear)
