"""Evaluation of every size: k-NN and a linear probe for many sub-networks in one pass over the data.

``run_sweep`` takes the elastic teacher and a list of sub-networks, decodes each batch of the
evaluation splits once and runs every sub-network on it (``backbone(x, width, depth,
features=True)``, eval mode, no grad), keeps the features in memory, then scores each
sub-network with the weighted k-NN of :mod:`poa_hpc.eval.knn` (the same features and classifier
as ``poa eval knn`` on extracted files) and the linear probe of :mod:`poa_hpc.eval.linear`.
When the features of all sub-networks would not fit in ``max_feature_gb``, the sub-networks are
split into groups and the data is read once per group.

Results are rows (sub-network, width, depth, params, GFLOPs, k-NN, linear), written as
``sweep.json`` (rows and provenance), ``sweep.csv`` and ``sweep.png`` (accuracy against GFLOPs,
Pareto front, named sizes; :mod:`poa_hpc.eval.plot`, needs matplotlib).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from poa_hpc.config import POAConfig
from poa_hpc.data.loader import build_eval_datasets
from poa_hpc.eval.knn import knn_features, weighted_knn
from poa_hpc.eval.linear import BATCH_SIZE, LR_GRID, LinearProbeResult, linear_probe, probe_features
from poa_hpc.models.registry import get_backbone
from poa_hpc.models.subnets import Subnet, depth_str

__all__ = ["SweepRow", "NetResult", "CSV_COLUMNS", "resolve_subnets", "subsample_per_class", "eval_splits",
           "collect_features", "evaluate_networks", "score", "run_sweep", "write_results", "format_sweep_table",
           "warn_grid_edge"]

#: Columns of ``sweep.csv`` (and keys of each row in ``sweep.json``).
CSV_COLUMNS = ("name", "named", "width", "depth", "params_m", "gflops", "knn_top1", "linear_top1", "linear_lr")

Extractor = Callable[[Tensor], Dict[str, Tensor]]


@dataclass
class SweepRow:
    name: str  # <family>_<WxD>, as the files of `poa extract`
    named: str  # the family's name for it (ViT-S) or ""
    width: int
    depth: Any  # int, or per-stage block counts
    params_m: float
    gflops: float  # at the evaluation image size
    knn_top1: Optional[float]
    linear_top1: Optional[float]
    linear_lr: Optional[float]
    linear_per_lr: Optional[Dict[float, float]] = None  # val top-1 of every learning rate (JSON only)

    def as_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["depth"] = depth_str(self.depth)
        if self.linear_per_lr is not None:
            d["linear_per_lr"] = {f"{k:g}": v for k, v in self.linear_per_lr.items()}
        return d


@dataclass
class NetResult:
    knn_top1: Optional[float]
    linear: Optional[LinearProbeResult]


def resolve_subnets(family: str, arch: Any, text: str) -> List[Subnet]:
    """``--subnets``: :meth:`SubnetSpace.resolve` of the family's space and named sizes."""
    spec = get_backbone(family)
    try:
        return spec.space(arch).resolve(text, spec.named_sizes(arch))
    except ValueError as exc:
        raise ValueError(f"--subnets: {exc}") from None


# ------------------------------------------------------------------ data
def subsample_per_class(targets: Sequence[int], n: int, seed: int = 0) -> List[int]:
    """Sorted indices of at most ``n`` items per class, drawn without replacement by a generator seeded
    with ``seed`` (classes with fewer items keep them all)."""
    if n < 1:
        raise ValueError(f"--train-per-class: {n}; expected a positive number of images per class")
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        keep.append(idx if len(idx) <= n else rng.choice(idx, n, replace=False))
    return sorted(int(i) for i in np.concatenate(keep))


def eval_splits(cfg: POAConfig, train_per_class: int = 0, seed: int = 0) -> Tuple[Dataset, Dataset, int, int]:
    """``(train, val, num_classes, n_train_total)`` of the config's evaluation data, the training split
    subsampled to ``train_per_class`` images per class when > 0."""
    train, val, num_classes = build_eval_datasets(cfg)
    total = len(train)
    if train_per_class:
        targets = getattr(train, "targets", None)
        if targets is None:
            raise ValueError(f"--train-per-class: the {cfg.data.dataset} training split does not list its labels")
        train = Subset(train, subsample_per_class(targets, train_per_class, seed))
    return train, val, num_classes, total


# ------------------------------------------------------------------ features and scores
def _progress(total: int, desc: str, enabled: bool, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 10.0)


@torch.no_grad()
def collect_features(extractors: Sequence[Extractor], loader: DataLoader, device: torch.device,
                     bar=None) -> Tuple[List[Tensor], Tensor, List[int]]:
    """One pass over ``loader``: each batch is decoded once and run through every extractor.

    Returns per extractor the ``(N, C_cls + C_patch)`` float32 features of :func:`probe_features` on
    the CPU, the labels ``(N,)``, and per extractor ``C_cls`` (the k-NN features are the first
    ``C_cls`` columns, L2-normalised)."""
    feats: List[List[Tensor]] = [[] for _ in extractors]
    labels, cls_dims = [], [0] * len(extractors)
    for batch in loader:
        x = batch[0].to(device, non_blocking=True)
        for i, fn in enumerate(extractors):
            out = fn(x)
            cls_dims[i] = out["x_norm_clstoken"].reshape(x.shape[0], -1).shape[1]
            feats[i].append(probe_features(out).cpu())
        labels.append(torch.as_tensor(batch[1]).reshape(-1).long())
        if bar is not None:
            bar.update(1)
    if not labels:
        raise ValueError("the evaluation split is empty")
    return [torch.cat(f) for f in feats], torch.cat(labels), cls_dims


def evaluate_networks(
    extractors: Sequence[Extractor],
    train: Dataset,
    val: Dataset,
    num_classes: int,
    *,
    feature_dims: Sequence[int],
    knn: Optional[Tuple[int, float]] = (20, 0.07),
    linear: bool = True,
    lrs: Sequence[float] = LR_GRID,
    epochs: int = 100,
    seed: int = 0,
    batch_size: int = 256,
    num_workers: int = 0,
    device: Optional[torch.device | str] = None,
    max_feature_gb: float = 8.0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    timings: Optional[Dict[str, float]] = None,
) -> List[NetResult]:
    """k-NN (``knn=(k, T)``, or None) and linear-probe scores of every extractor (``x -> dict`` with
    ``x_norm_clstoken`` and ``x_norm_patchtokens``).

    ``feature_dims`` (the [CLS] width of each extractor) only sizes the feature memory: extractors are
    grouped so that one group's features (train + val, [CLS] and pooled patch tokens, float32) stay
    under ``max_feature_gb``; the data is read once per group.  ``timings`` (if given) receives the
    seconds spent on ``features`` and on ``scores``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n_img = len(train) + len(val)
    per_net = [n_img * 2 * d * 4 for d in feature_dims]
    budget = max_feature_gb * 1024 ** 3
    groups: List[List[int]] = [[]]
    for i, b in enumerate(per_net):
        if groups[-1] and sum(per_net[j] for j in groups[-1]) + b > budget:
            groups.append([])
        groups[-1].append(i)
    if len(groups) > 1:
        log(f"features of {len(extractors)} networks need {sum(per_net) / 1024 ** 3:.1f} GB > --max-feature-gb "
            f"{max_feature_gb:g}: {len(groups)} passes over the data")
    loaders = [DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers) for ds in (train, val)]
    results: List[Optional[NetResult]] = [None] * len(extractors)
    n_batches = sum(len(dl) for dl in loaders)
    spent = {"features": 0.0, "scores": 0.0}
    for g, group in enumerate(groups):
        fns = [extractors[i] for i in group]
        of = f" (pass {g + 1}/{len(groups)})" if len(groups) > 1 else ""
        t0 = time.perf_counter()
        with _progress(n_batches, f"features{of}", progress, "batch") as bar:
            tr_f, tr_y, cls_dims = collect_features(fns, loaders[0], device, bar)
            va_f, va_y, _ = collect_features(fns, loaders[1], device, bar)
        t1 = time.perf_counter()
        spent["features"] += t1 - t0
        with _progress(len(group), ("k-NN + linear" if linear else "k-NN") + of, progress, "net") as bar:
            for j, i in enumerate(group):
                results[i] = score(tr_f[j], tr_y, va_f[j], va_y, cls_dims[j], num_classes, knn=knn, linear=linear,
                                   lrs=lrs, epochs=epochs, seed=seed, device=device)
                tr_f[j] = va_f[j] = None  # free as we go
                bar.update(1)
        spent["scores"] += time.perf_counter() - t1
    if timings is not None:
        timings.update(spent)
    return results  # type: ignore[return-value]


def score(tr_f: Tensor, tr_y: Tensor, va_f: Tensor, va_y: Tensor, cls_dim: int, num_classes: int, *,
          knn: Optional[Tuple[int, float]], linear: bool, lrs: Sequence[float], epochs: int, seed: int,
          device: torch.device) -> NetResult:
    """Weighted k-NN on the L2-normalised [CLS] columns and the linear probe on all columns."""
    top1 = None
    if knn is not None:
        k, T = knn
        train_k = knn_features(tr_f[:, :cls_dim].contiguous()).to(device)
        val_k = knn_features(va_f[:, :cls_dim].contiguous()).to(device)
        top1 = weighted_knn(train_k, tr_y.to(device), val_k, va_y.to(device), k, T, num_classes)
    probe = None
    if linear:
        probe = linear_probe(tr_f.to(device), tr_y, va_f.to(device), va_y, num_classes, lrs=lrs, epochs=epochs,
                             seed=seed)
    return NetResult(top1, probe)


# ------------------------------------------------------------------ the sweep
def run_sweep(
    cfg: POAConfig,
    backbone: torch.nn.Module,
    subnets: Sequence[Subnet],
    out_dir: Optional[str | Path] = None,
    *,
    source: str = "",
    step: Optional[int] = None,
    train_per_class: int = 0,
    knn: bool = True,
    linear: bool = True,
    lrs: Sequence[float] = LR_GRID,
    epochs: int = 100,
    seed: int = 0,
    batch_size: int = 256,
    num_workers: Optional[int] = None,
    device: Optional[torch.device | str] = None,
    reference: Optional[List[Dict[str, Any]]] = None,
    reference_label: str = "reference",
    max_feature_gb: float = 8.0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> List[SweepRow]:
    """Evaluate ``subnets`` of the elastic ``backbone`` (a family's ``ElasticBackbone``, e.g. the
    teacher) on ``cfg``'s evaluation data (``data.*``, ``eval.*``); write ``sweep.json``,
    ``sweep.csv`` and ``sweep.png`` under ``out_dir`` when given.  Returns one row per sub-network,
    in the order given.  ``reference`` (rows of :func:`poa_hpc.eval.plot.read_reference`) is drawn
    as a second series on the plot.  The backbone is put in eval mode on ``device`` (default: CUDA
    when available) and left there."""
    t0 = time.perf_counter()
    family = backbone.family
    spec, arch = get_backbone(family), cfg.model.section
    space = spec.space(arch)
    for sub in subnets:
        space.check(sub)
    if not subnets:
        raise ValueError("no sub-networks to evaluate")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train, val, num_classes, n_train_total = eval_splits(cfg, train_per_class, seed)
    img_size = int(val[0][0].shape[-1])
    costs = [spec.gflops(arch, s, img_size=img_size) for s in subnets]
    dims = [spec.feature_dim(arch, s.width) for s in subnets]
    n_img, n_sub = len(train) + len(val), len(subnets)
    feat_gb = sum(n_img * 2 * d * 4 for d in dims) / 1024 ** 3
    log(f"sweep: {n_img:,} images ({len(train):,} train + {len(val):,} val, {cfg.data.eval_root or cfg.data.dataset} at {img_size} px) x "
        f"{n_sub} sub-networks = {n_img * n_sub:,} forward passes (~{n_img * sum(costs):,.0f} GFLOPs); "
        f"features {feat_gb:.2f} GB; on {device}")

    backbone = backbone.to(device).eval()
    timings: Dict[str, float] = {}
    extractors = [lambda x, s=s: backbone(x, s.width, s.depth, features=True) for s in subnets]
    workers = cfg.data.num_workers if num_workers is None else num_workers
    results = evaluate_networks(
        extractors, train, val, num_classes, feature_dims=dims,
        knn=(cfg.eval.knn_k, cfg.eval.knn_temperature) if knn else None, linear=linear, lrs=lrs, epochs=epochs,
        seed=seed, batch_size=batch_size, num_workers=workers, device=device, max_feature_gb=max_feature_gb,
        progress=progress, log=log, timings=timings)

    names = {sub: name for name, sub in spec.named_sizes(arch).items()}
    rows = []
    for sub, cost, res in zip(subnets, costs, results):
        rows.append(SweepRow(
            name=f"{family}_{sub}", named=names.get(sub, ""), width=sub.width, depth=sub.depth,
            params_m=spec.params(arch, sub) / 1e6, gflops=cost, knn_top1=res.knn_top1,
            linear_top1=res.linear.top1 if res.linear else None, linear_lr=res.linear.lr if res.linear else None,
            linear_per_lr=res.linear.per_lr if res.linear else None))
    seconds = time.perf_counter() - t0
    log(f"sweep: {n_sub} sub-networks evaluated in {seconds:.1f} s (features {timings['features']:.1f} s, "
        f"{'k-NN + linear' if linear else 'k-NN'} {timings['scores']:.1f} s)")
    if linear:
        warn_grid_edge(rows, lrs, log)
    if out_dir is not None:
        provenance = {
            "checkpoint": source, "step": step, "family": family, "model": dataclasses.asdict(arch),
            "dataset": {"name": "folder" if cfg.data.eval_root else cfg.data.dataset,
                        "root": cfg.data.eval_root or (cfg.data.root if cfg.data.dataset != "digits" else ""),
                        "image_size": img_size, "num_classes": num_classes, "n_train": len(train),
                        "n_train_total": n_train_total, "n_val": len(val), "train_per_class": train_per_class or None},
            "knn": {"k": cfg.eval.knn_k, "temperature": cfg.eval.knn_temperature,
                    "features": "final-norm [CLS], L2-normalised"} if knn else None,
            "linear": {"features": "concat(final-norm [CLS], mean of final-norm patch tokens), last block",
                       "standardized": True, "lr_grid": list(lrs), "epochs": epochs, "batch_size": BATCH_SIZE,
                       "optimizer": "SGD momentum 0.9, no weight decay, cosine decay",
                       "selection": "best learning rate on val (as DINOv2)", "seed": seed} if linear else None,
            "gflops": f"multiply-accumulates per image at {img_size} px",
            "seconds": {"total": round(seconds, 2), **{k: round(v, 2) for k, v in timings.items()}},
        }
        write_results(rows, out_dir, provenance, reference=reference, reference_label=reference_label, log=log)
    return rows


def warn_grid_edge(rows: Sequence[SweepRow], lrs: Sequence[float], log: Callable[[str], None]) -> None:
    """One line when the best learning rate of some rows is the grid's smallest or largest value."""
    if len(lrs) < 2:
        return
    edge = [r.name for r in rows if r.linear_lr in (min(lrs), max(lrs))]
    if edge:
        log(f"linear probe: the best learning rate is at the edge of the grid {list(lrs)} for {len(edge)} of "
            f"{len(rows)} networks ({', '.join(edge[:3])}{', ...' if len(edge) > 3 else ''}); consider widening --lrs")


# ------------------------------------------------------------------ outputs
def write_results(rows: Sequence[SweepRow], out_dir: str | Path, provenance: Dict[str, Any], *,
                  reference: Optional[List[Dict[str, Any]]] = None, reference_label: str = "reference",
                  log: Callable[[str], None] = print) -> Dict[str, Path]:
    """``sweep.json`` (rows + provenance), ``sweep.csv`` and, with matplotlib, ``sweep.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "sweep.json", "csv": out / "sweep.csv"}
    dicts = [r.as_dict() for r in rows]
    paths["json"].write_text(json.dumps({"rows": dicts, "provenance": provenance}, indent=1) + "\n")
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for d in dicts:
            w.writerow({k: ("" if d[k] is None else d[k]) for k in CSV_COLUMNS})
    try:
        from poa_hpc.eval.plot import plot_sweep

        ds = provenance.get("dataset") or {}
        title = (f"{provenance.get('family', '')}: {len(rows)} sub-networks, {ds.get('name', '')} val"
                 + (f" ({ds.get('n_train')} train images)" if ds.get("n_train") else "")
                 + (f", step {provenance['step']}" if provenance.get("step") is not None else ""))
        paths["png"] = plot_sweep(rows, out / "sweep.png", title=title, reference=reference,
                                  reference_label=reference_label, img_size=ds.get("image_size"),
                                  knn=provenance.get("knn"))
    except ImportError:
        log("sweep.png not written: the plot needs matplotlib (pip install 'poa_hpc[plot]')")
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths


def format_sweep_table(rows: Sequence[SweepRow], title: str = "") -> str:
    """The rows as a text table; the k-NN and linear columns only where some row has them."""
    has_knn = any(r.knn_top1 is not None for r in rows)
    has_lin = any(r.linear_top1 is not None for r in rows)

    def pct(v: Optional[float]) -> str:
        return "-" if v is None or math.isnan(v) else f"{v:.2f}%"

    head = f"{'sub-network':<22}{'name':<8}{'width':>6}{'depth':>10}{'params(M)':>11}{'GFLOPs':>10}"
    head += f"{'k-NN':>9}" * has_knn + (f"{'linear':>9}{'lr':>8}" if has_lin else "")
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for r in rows:
        line = (f"{r.name:<22}{r.named:<8}{r.width:>6}{depth_str(r.depth):>10}{r.params_m:>11.3f}"
                f"{r.gflops:>10.4f}")
        line += f"{pct(r.knn_top1):>9}" * has_knn
        if has_lin:
            line += f"{pct(r.linear_top1):>9}{(f'{r.linear_lr:g}' if r.linear_lr is not None else '-'):>8}"
        lines.append(line)
    return "\n".join(lines)
