"""Reference point for k-NN numbers: the same weighted k-NN on raw pixels instead of network features.

A network's k-NN top-1 means little on its own on a small, easy set: on the demo's digits the
centred raw pixels already classify almost every validation image.  ``raw_pixel_knn`` scores
the evaluation images exactly as the networks get them (the config's evaluation transform:
resize, centre crop, ImageNet normalisation), each flattened to one vector, minus the
training split's mean image (centring), then L2-normalised, with the weighted k-NN of
:mod:`poa_hpc.eval.knn` (k = ``eval.knn_k``, T = ``eval.knn_temperature``).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from poa_hpc.config import POAConfig
from poa_hpc.data.loader import build_eval_datasets
from poa_hpc.eval.knn import knn_features, weighted_knn

__all__ = ["pixels", "raw_pixel_knn"]


def pixels(ds: Dataset, batch_size: int = 512) -> Tuple[Tensor, Tensor]:
    """``(N, C*H*W)`` float32 pixels and ``(N,)`` labels of an evaluation split, in order."""
    xs, ys = [], []
    for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0):
        xs.append(x.float().reshape(x.shape[0], -1))
        ys.append(torch.as_tensor(y).reshape(-1).long())
    if not xs:
        raise ValueError("the evaluation split is empty")
    return torch.cat(xs), torch.cat(ys)


def raw_pixel_knn(cfg: POAConfig) -> float:
    """Weighted k-NN top-1 (%) of the centred raw pixels of the config's evaluation splits."""
    train, val, num_classes = build_eval_datasets(cfg)
    tr_x, tr_y = pixels(train)
    va_x, va_y = pixels(val)
    mean = tr_x.mean(dim=0, keepdim=True)
    return weighted_knn(knn_features(tr_x - mean), tr_y, knn_features(va_x - mean), va_y, cfg.eval.knn_k,
                        cfg.eval.knn_temperature, num_classes)
