"""Evaluation of every size: k-NN and a linear probe for many sub-networks in one pass over the data.

``run_sweep`` takes the elastic teacher and a list of sub-networks, decodes each batch of the
evaluation splits once and runs every sub-network on it (``backbone(x, width, depth,
features=True)``, eval mode, no grad), keeps the features in memory, then scores each
sub-network with the weighted k-NN of :mod:`poa_hpc.eval.knn` (the same features and classifier
as ``poa eval knn`` on extracted files) and the linear probe of :mod:`poa_hpc.eval.linear`.
When the features of all sub-networks would not fit in ``max_feature_gb``, the sub-networks are
split into groups and the data is read once per group.

What runs on each sub-network are evaluation protocols (:mod:`poa_hpc.eval.protocols`: ``knn`` and
``linear`` on the cached features, ``latency`` on the dense extracted network, ...).  Results are
rows (sub-network, width, depth, params, GFLOPs, then each protocol's columns), written as
``sweep.json`` (rows and provenance), ``sweep.csv`` and ``sweep.png`` (each protocol metric against
GFLOPs and the measured costs, Pareto front, named sizes; :mod:`poa_hpc.eval.plot`, needs matplotlib).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from poa_hpc.config import POAConfig
from poa_hpc.data.loader import build_eval_datasets
from poa_hpc.eval.linear import LR_GRID, probe_features
from poa_hpc.eval.protocols import BASE_COLUMNS, Column, NetFeatures, Protocol, format_value, get_protocol
from poa_hpc.models.registry import get_backbone
from poa_hpc.models.subnets import Subnet, depth_str

__all__ = ["SweepRow", "CSV_COLUMNS", "sweep_columns", "default_protocols", "resolve_subnets", "subsample_per_class", "eval_splits",
           "collect_features", "evaluate_networks", "run_sweep", "write_results", "format_sweep_table",
           "measure_networks", "dense_network"]

#: Columns of ``sweep.csv`` with the default protocols (knn, linear); see :func:`sweep_columns`.
CSV_COLUMNS = ("name", "named", "width", "depth", "params_m", "gflops", "knn_top1", "linear_top1", "linear_lr")

Extractor = Callable[[Tensor], Dict[str, Tensor]]
#: A protocol with its options.
Run = Tuple[Protocol, Dict[str, Any]]


class SweepRow:
    """One sub-network: its size columns and ``values`` (each protocol's columns), also readable as
    attributes (``row.knn_top1``; ``None`` where no protocol wrote that column)."""

    def __init__(self, name: str, named: str, width: int, depth: Any, params_m: float, gflops: float,
                 values: Optional[Dict[str, Any]] = None):
        self.name, self.named, self.width, self.depth = name, named, width, depth  # name: <family>_<WxD>
        self.params_m, self.gflops = params_m, gflops  # gflops: at the evaluation image size
        self.values: Dict[str, Any] = dict(values or {})

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__") or key == "values":
            raise AttributeError(key)
        return self.values.get(key)

    def get(self, key: str) -> Any:
        return getattr(self, key) if key in ("name", "named", "width", "depth", "params_m", "gflops") else self.values.get(key)

    def as_dict(self) -> Dict[str, Any]:
        d = {"name": self.name, "named": self.named, "width": self.width, "depth": depth_str(self.depth),
             "params_m": self.params_m, "gflops": self.gflops}
        for k, v in self.values.items():
            d[k] = {f"{a:g}": b for a, b in v.items()} if k == "linear_per_lr" and v is not None else v
        return d

    def __repr__(self) -> str:
        return f"SweepRow({self.as_dict()})"


def default_protocols(knn: bool = True, linear: bool = True, *, cfg: Optional[POAConfig] = None,
                      lrs: Sequence[float] = LR_GRID, epochs: int = 100, seed: int = 0) -> List[Run]:
    """The k-NN (``cfg.eval`` k and T) and linear-probe protocols with these options."""
    runs: List[Run] = []
    if knn:
        runs.append((get_protocol("knn"), {"k": cfg.eval.knn_k if cfg else 20,
                                           "temperature": cfg.eval.knn_temperature if cfg else 0.07}))
    if linear:
        runs.append((get_protocol("linear"), {"lrs": tuple(lrs), "epochs": epochs, "seed": seed}))
    return runs


def sweep_columns(runs: Sequence[Run]) -> List[Column]:
    """The base columns, then each protocol's, in order."""
    cols = list(BASE_COLUMNS)
    for p, opts in runs:
        cols += [c for c in p.columns(opts) if c.key not in {x.key for x in cols}]
    return cols


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
    protocols: Sequence[Run],
    batch_size: int = 256,
    num_workers: int = 0,
    device: Optional[torch.device | str] = None,
    max_feature_gb: float = 8.0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    timings: Optional[Dict[str, float]] = None,
) -> List[Dict[str, Any]]:
    """The one feature driver: the values of every feature protocol in ``protocols`` (``[(protocol,
    opts)]``) for every extractor (``x -> dict`` with ``x_norm_clstoken`` and ``x_norm_patchtokens``).

    ``feature_dims`` (the [CLS] width of each extractor) only sizes the feature memory: extractors are
    grouped so that one group's features (train + val, [CLS] and pooled patch tokens, float32) stay
    under ``max_feature_gb``; the data is read once per group.  ``timings`` (if given) receives the
    seconds spent on ``features`` and on ``scores``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    runs = [(p, o) for p, o in protocols if "features" in p.needs]
    if not runs:
        return [{} for _ in extractors]
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
    results: List[Dict[str, Any]] = [{} for _ in extractors]
    n_batches = sum(len(dl) for dl in loaders)
    spent = {"features": 0.0, "scores": 0.0}
    what = " + ".join(p.name for p, _ in runs)
    for g, group in enumerate(groups):
        fns = [extractors[i] for i in group]
        of = f" (pass {g + 1}/{len(groups)})" if len(groups) > 1 else ""
        t0 = time.perf_counter()
        with _progress(n_batches, f"features{of}", progress, "batch") as bar:
            tr_f, tr_y, cls_dims = collect_features(fns, loaders[0], device, bar)
            va_f, va_y, _ = collect_features(fns, loaders[1], device, bar)
        t1 = time.perf_counter()
        spent["features"] += t1 - t0
        with _progress(len(group), what + of, progress, "net") as bar:
            for j, i in enumerate(group):
                feats = NetFeatures(tr_f[j], tr_y, va_f[j], va_y, cls_dims[j], num_classes, device)
                for p, opts in runs:
                    results[i].update(p.score(feats, opts))
                tr_f[j] = va_f[j] = None  # free as we go
                bar.update(1)
        spent["scores"] += time.perf_counter() - t1
    if timings is not None:
        timings.update(spent)
    return results


def dense_network(backbone: torch.nn.Module, arch: Any, sub: Subnet) -> torch.nn.Module:
    """The dense extracted network of ``sub`` (what ``poa extract`` writes), in eval mode on the CPU."""
    from poa_hpc.models.extract import extract_state_dict

    dense_arch, state = extract_state_dict(backbone, sub, arch)
    model = get_backbone(backbone.family).build_dense(dense_arch)
    model.load_state_dict({k: v.detach().cpu() for k, v in state.items()})
    return model.eval()


def measure_networks(models: Sequence[Callable[[], torch.nn.Module]], img_size: int, protocols: Sequence[Run], *,
                     progress: bool = True, timings: Optional[Dict[str, float]] = None,
                     only: Optional[Dict[str, Sequence[int]]] = None) -> List[Dict[str, Any]]:
    """The values of every model protocol for each network (``models``: builders of the dense networks,
    called one at a time so one network is in memory).  ``only`` (protocol name -> indices into ``models``)
    runs a protocol on those networks alone; the others get ``None`` in its columns."""
    runs = [(p, o) for p, o in protocols if "model" in p.needs]
    results: List[Dict[str, Any]] = [{} for _ in models]
    if not runs:
        return results
    only = {name: set(idx) for name, idx in (only or {}).items()}
    todo = [[(p, o) for p, o in runs if p.name not in only or i in only[p.name]] for i in range(len(models))]
    t0 = time.perf_counter()
    with _progress(sum(1 for t in todo if t), " + ".join(p.name for p, _ in runs), progress, "net") as bar:
        for i, build in enumerate(models):
            results[i].update({c.key: None for p, o in runs if (p, o) not in todo[i] for c in p.columns(o)})
            if not todo[i]:
                continue
            model = build()
            for p, opts in todo[i]:
                results[i].update(p.measure(model, img_size, opts))
            del model
            bar.update(1)
    if timings is not None:
        timings["models"] = time.perf_counter() - t0
    return results


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
    protocols: Optional[Sequence[Run]] = None,
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
    protocol_subnets: Optional[Dict[str, Sequence[Subnet]]] = None,
) -> List[SweepRow]:
    """Evaluate ``subnets`` of the elastic ``backbone`` (a family's ``ElasticBackbone``, e.g. the
    teacher) on ``cfg``'s evaluation data (``data.*``, ``eval.*``) with ``protocols`` (``[(protocol,
    opts)]``; default: k-NN and/or the linear probe as ``knn`` / ``linear`` and ``lrs``, ``epochs``,
    ``seed`` say); write ``sweep.json``, ``sweep.csv`` and ``sweep.png`` under ``out_dir`` when given.
    Returns one row per sub-network, in the order given.  ``reference`` (rows of
    :func:`poa_hpc.eval.plot.read_reference`) is drawn as a second series on the plot.  The backbone is
    put in eval mode on ``device`` (default: CUDA when available) and left there.  ``protocol_subnets``
    (model protocol name -> some of ``subnets``) runs an expensive protocol (``finetune``) on that subset
    only; the other rows get ``None`` in its columns (empty in the CSV, null in the JSON, not plotted)."""
    t0 = time.perf_counter()
    family = backbone.family
    spec, arch = get_backbone(family), cfg.model.section
    space = spec.space(arch)
    for sub in subnets:
        space.check(sub)
    if not subnets:
        raise ValueError("no sub-networks to evaluate")
    runs = list(protocols) if protocols is not None else default_protocols(knn, linear, cfg=cfg, lrs=lrs,
                                                                            epochs=epochs, seed=seed)
    if not runs:
        raise ValueError("no evaluation protocol to run")
    only: Dict[str, List[int]] = {}
    for name, subset in (protocol_subnets or {}).items():
        proto = next((p for p, _ in runs if p.name == name), None)
        if proto is None or "model" not in proto.needs:
            raise ValueError(f"--{name}-subnets: {name} is not one of the model protocols run here")
        missing = [str(x) for x in subset if x not in subnets]
        if missing:
            raise ValueError(f"--{name}-subnets: {', '.join(missing)} not among the sweep's --subnets")
        only[name] = [i for i, x in enumerate(subnets) if x in subset]
    need_features = any("features" in p.needs for p, _ in runs)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train, val, num_classes, n_train_total = eval_splits(cfg, train_per_class, seed)
    img_size = int(val[0][0].shape[-1])
    costs = [spec.gflops(arch, s, img_size=img_size) for s in subnets]
    dims = [spec.feature_dim(arch, s.width) for s in subnets]
    n_img, n_sub = len(train) + len(val), len(subnets)
    names_run = ", ".join(p.name for p, _ in runs)
    if need_features:
        feat_gb = sum(n_img * 2 * d * 4 for d in dims) / 1024 ** 3
        log(f"sweep ({names_run}): {n_img:,} images ({len(train):,} train + {len(val):,} val, {cfg.data.eval_root or cfg.data.dataset} at "
            f"{img_size} px) x {n_sub} sub-networks = {n_img * n_sub:,} forward passes (~{n_img * sum(costs):,.0f} "
            f"GFLOPs); features {feat_gb:.2f} GB; on {device}")
    else:
        log(f"sweep ({names_run}): {n_sub} sub-networks at {img_size} px")

    backbone = backbone.to(device).eval()
    timings: Dict[str, float] = {}
    extractors = [lambda x, s=s: backbone(x, s.width, s.depth, features=True) for s in subnets]
    workers = cfg.data.num_workers if num_workers is None else num_workers
    values = evaluate_networks(
        extractors, train, val, num_classes, feature_dims=dims, protocols=runs, batch_size=batch_size,
        num_workers=workers, device=device, max_feature_gb=max_feature_gb, progress=progress, log=log,
        timings=timings)
    measured = measure_networks([lambda s=s: dense_network(backbone, arch, s) for s in subnets], img_size, runs,
                                progress=progress, timings=timings, only=only)

    names = {sub: name for name, sub in spec.named_sizes(arch).items()}
    rows = []
    for sub, cost, v, m in zip(subnets, costs, values, measured):
        rows.append(SweepRow(f"{family}_{sub}", names.get(sub, ""), sub.width, sub.depth,
                             spec.params(arch, sub) / 1e6, cost, {**v, **m}))
    seconds = time.perf_counter() - t0
    log(f"sweep: {n_sub} sub-networks evaluated in {seconds:.1f} s ("
        + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + ")")
    for p, opts in runs:
        p.after(rows, opts, log)
    if out_dir is not None:
        provenance = {
            "checkpoint": source, "step": step, "family": family, "model": dataclasses.asdict(arch),
            "dataset": {"name": "folder" if cfg.data.eval_root else cfg.data.dataset,
                        "root": cfg.data.eval_root or (cfg.data.root if cfg.data.dataset != "digits" else ""),
                        "image_size": img_size, "num_classes": num_classes, "n_train": len(train),
                        "n_train_total": n_train_total, "n_val": len(val), "train_per_class": train_per_class or None},
            "protocols": [p.name for p, _ in runs],
            **{n: None for n in ("knn", "linear")},
            **{p.name: {**p.provenance(opts), **({"subnets": [f"{family}_{subnets[i]}" for i in only[p.name]]}
                                                   if p.name in only else {})} for p, opts in runs},
            "gflops": f"multiply-accumulates per image at {img_size} px",
            "seconds": {"total": round(seconds, 2), **{k: round(v, 2) for k, v in timings.items()}},
        }
        write_results(rows, out_dir, provenance, reference=reference, reference_label=reference_label, log=log,
                      protocols=runs)
    return rows


# ------------------------------------------------------------------ outputs
def write_results(rows: Sequence[SweepRow], out_dir: str | Path, provenance: Dict[str, Any], *,
                  reference: Optional[List[Dict[str, Any]]] = None, reference_label: str = "reference",
                  log: Callable[[str], None] = print, protocols: Optional[Sequence[Run]] = None,
                  x_axes: Optional[Sequence[str]] = None) -> Dict[str, Path]:
    """``sweep.json`` (rows + provenance), ``sweep.csv`` (the protocols' columns) and, with matplotlib,
    ``sweep.png`` (one panel per metric and x-axis: GFLOPs, then each measured cost)."""
    runs = list(protocols) if protocols is not None else default_protocols()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "sweep.json", "csv": out / "sweep.csv"}
    dicts = [r.as_dict() for r in rows]
    paths["json"].write_text(json.dumps({"rows": dicts, "provenance": provenance}, indent=1) + "\n")
    csv_cols = [c.key for c in sweep_columns(runs) if not c.json_only]
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=csv_cols)
        w.writeheader()
        for d in dicts:
            w.writerow({k: ("" if d.get(k) is None else d[k]) for k in csv_cols})
    try:
        from poa_hpc.eval.plot import plot_sweep

        ds = provenance.get("dataset") or {}
        title = (f"{provenance.get('family', '')}: {len(rows)} sub-networks, {ds.get('name', '')} val"
                 + (f" ({ds.get('n_train')} train images)" if ds.get("n_train") else "")
                 + (f", step {provenance['step']}" if provenance.get("step") is not None else ""))
        metrics = [m for p, o in runs for m in p.metrics(o)]
        costs = [c for p, o in runs for c in p.costs(o) if not c.higher_is_better]
        if metrics:
            paths["png"] = plot_sweep(rows, out / "sweep.png", title=title, reference=reference,
                                      reference_label=reference_label, img_size=ds.get("image_size"),
                                      knn=provenance.get("knn"), metrics=metrics,
                                      x_axes=list(x_axes) if x_axes else ["gflops", *(c.key for c in costs)],
                                      cost_labels={c.key: c.label for p, o in runs for c in p.costs(o)})
    except ImportError:
        log("sweep.png not written: the plot needs matplotlib (pip install 'poa_hpc[plot]')")
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths


def format_sweep_table(rows: Sequence[SweepRow], title: str = "", protocols: Optional[Sequence[Run]] = None) -> str:
    """The rows as a text table: the size columns (GFLOPs included), then the protocols' columns where
    some row has a value (default protocols: k-NN and linear)."""
    runs = list(protocols) if protocols is not None else default_protocols()
    cols = [c for c in sweep_columns(runs)[6:] if not c.json_only and any(r.get(c.key) is not None for r in rows)]
    head = f"{'sub-network':<22}{'name':<8}{'width':>6}{'depth':>10}{'params(M)':>11}{'GFLOPs':>10}"
    widths = [max(9, len(c.header) + 2) for c in cols]
    head += "".join(f"{c.header:>{w}}" for c, w in zip(cols, widths))
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for r in rows:
        line = (f"{r.name:<22}{r.named:<8}{r.width:>6}{depth_str(r.depth):>10}{r.params_m:>11.3f}"
                f"{r.gflops:>10.4f}")
        line += "".join(f"{format_value(c, r.get(c.key)):>{w}}" for c, w in zip(cols, widths))
        lines.append(line)
    return "\n".join(lines)
