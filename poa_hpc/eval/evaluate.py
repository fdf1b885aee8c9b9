"""k-NN evaluation of dense (extracted) sub-networks, with size and cost columns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Sequence

import torch

from poa_hpc.config import POAConfig
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
    """Weighted k-NN top-1 (k = eval.knn_k, T = eval.knn_temperature) of each model's [CLS] features, by the
    sweep's feature driver (:func:`poa_hpc.eval.sweep.evaluate_networks` with the ``knn`` protocol)."""
    from poa_hpc.eval.sweep import default_protocols, eval_splits, evaluate_networks

    models = [(name, model.to(device).eval()) for name, model in models]
    train_ds, val_ds, num_classes, _ = eval_splits(cfg)
    img_size = int(val_ds[0][0].shape[-1])
    costs = [dense_cost(m, img_size) for _, m in models]
    dims = [get_backbone(m.family).feature_dim(m.arch, sub.width) for (_, m), (sub, _, _) in zip(models, costs)]
    extractors = [lambda x, m=m: m(x, features=True) for _, m in models]
    values = evaluate_networks(extractors, train_ds, val_ds, num_classes, feature_dims=dims,
                               protocols=default_protocols(True, False, cfg=cfg), batch_size=batch_size,
                               device=device, progress=False)
    return [KnnRow(name, sub.width, sub.depth, params / 1e6, gflops, v["knn_top1"])
            for (name, _), (sub, params, gflops), v in zip(models, costs, values)]


def format_table(rows: Sequence[KnnRow], title: str = "") -> str:
    head = f"{'sub-network':<22}{'width':>6}{'depth':>10}{'params(M)':>11}{'GFLOPs':>9}{'k-NN top-1':>12}"
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.name:<22}{r.width:>6}{depth_str(r.depth):>10}{r.params_m:>11.3f}{r.gflops:>9.4f}{r.top1:>11.2f}%")
    return "\n".join(lines)
