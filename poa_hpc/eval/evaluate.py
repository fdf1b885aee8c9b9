"""k-NN evaluation of dense (extracted) sub-networks, with size and cost columns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Sequence

import torch
from torch.utils.data import DataLoader

from poa_hpc.config import POAConfig
from poa_hpc.data.loader import build_eval_datasets
from poa_hpc.eval.knn import extract_features, weighted_knn
from poa_hpc.models.registry import get_backbone
from poa_hpc.models.subnets import depth_str


@dataclass
class KnnRow:
    name: str
    width: int
    depth: object  # int, or per-stage block counts
    params_m: float
    gflops: float
    top1: float


def dense_cost(model, img_size: int):
    """(sub-network, params, GFLOPs at ``img_size``) of a dense extracted model of any family."""
    spec = get_backbone(model.family)
    sub = spec.space(model.arch).intact
    return sub, spec.params(model.arch), spec.gflops(model.arch, img_size=img_size)


def knn_evaluate(models: Iterable[tuple[str, torch.nn.Module]], cfg: POAConfig, device: torch.device | str = "cpu",
                 batch_size: int = 256) -> List[KnnRow]:
    """Weighted k-NN top-1 (k = eval.knn_k, T = eval.knn_temperature) of each model's [CLS] features."""
    train_ds, val_ds, num_classes = build_eval_datasets(cfg)
    loaders = [DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0) for ds in (train_ds, val_ds)]
    img_size = next(iter(loaders[1]))[0].shape[-1]
    rows = []
    for name, model in models:
        model = model.to(device).eval()
        tr_f, tr_y = extract_features(model, loaders[0], device)
        va_f, va_y = extract_features(model, loaders[1], device)
        top1 = weighted_knn(tr_f, tr_y, va_f, va_y, cfg.eval.knn_k, cfg.eval.knn_temperature, num_classes)
        sub, params, gflops = dense_cost(model, img_size)
        rows.append(KnnRow(name, sub.width, sub.depth, params / 1e6, gflops, top1))
    return rows


def format_table(rows: Sequence[KnnRow], title: str = "") -> str:
    head = f"{'sub-network':<22}{'width':>6}{'depth':>10}{'params(M)':>11}{'GFLOPs':>9}{'k-NN top-1':>12}"
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.name:<22}{r.width:>6}{depth_str(r.depth):>10}{r.params_m:>11.3f}{r.gflops:>9.4f}{r.top1:>11.2f}%")
    return "\n".join(lines)
