"""Weighted k-NN classification of frozen features (DINO / DINOv2 protocol, k=20, T=0.07).

For every test feature: cosine similarity to all (L2-normalised) train features, keep
the top-k, weight each neighbour by ``exp(sim / T)``, sum the weights per class and
predict the class with the largest vote.  Weights are computed as
``exp((sim - sim_max) / T)`` -- the same votes up to a positive per-sample factor, so the
same prediction, without overflow for small T (DINOv2 uses a softmax for the same reason).
"""

from __future__ import annotations

from typing import Callable, Iterable, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_features", "extract_features", "weighted_knn"]


def knn_features(out: Tensor) -> Tensor:
    """A batch of model outputs as k-NN features: float32, flattened to ``(B, D)``, L2-normalised along D.

    Every k-NN path (``extract_features`` on dense models, the sweep on the elastic teacher) goes
    through this one function, so equal model outputs give equal features."""
    out = out.float().reshape(out.shape[0], -1)
    return F.normalize(out, dim=-1)


@torch.no_grad()
def extract_features(
    model: Callable[[Tensor], Tensor], loader: Iterable, device: torch.device | str
) -> Tuple[Tensor, Tensor]:
    """Run ``model`` over ``loader`` (batches ``(images, labels, ...)``).

    Returns ``(feats, labels)`` on ``device``: float32 features of shape ``(N, D)``,
    L2-normalised along D, and int64 labels ``(N,)``, in loader order.  An ``nn.Module``
    is put in eval mode for the pass and restored afterwards.
    """
    device = torch.device(device)
    was_training = None
    if isinstance(model, torch.nn.Module):
        was_training = model.training
        model.eval()
    feats, labels = [], []
    try:
        for batch in loader:
            images, targets = batch[0], batch[1]
            feats.append(knn_features(model(images.to(device, non_blocking=True))))
            labels.append(torch.as_tensor(targets).reshape(-1).to(device=device, dtype=torch.long))
    finally:
        if was_training:
            model.train()
    if not feats:
        raise ValueError("extract_features: the loader yielded no batches")
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def weighted_knn(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    k: int,
    T: float,
    num_classes: int,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy (%) of the temperature-weighted k-NN classifier.

    Features are expected L2-normalised (cosine similarity = dot product).  ``k`` is
    capped at the number of train samples; test samples are processed ``chunk`` at a time
    so memory is ``O(chunk * N_train)``.
    """
    n_train, n_test = train_feats.shape[0], test_feats.shape[0]
    if n_train == 0 or n_test == 0:
        raise ValueError(f"weighted_knn: empty train ({n_train}) or test ({n_test}) set")
    if k < 1 or T <= 0 or chunk < 1:
        raise ValueError(f"weighted_knn: need k >= 1, T > 0, chunk >= 1 (got k={k}, T={T}, chunk={chunk})")
    device = train_feats.device
    train_feats = train_feats.float()
    train_labels = train_labels.to(device=device, dtype=torch.long).reshape(-1)
    test_labels = test_labels.reshape(-1).long()
    if int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes:
        raise ValueError(f"weighted_knn: train labels must lie in [0, {num_classes})")
    k = min(int(k), n_train)
    train_t = train_feats.t()
    correct = 0
    for start in range(0, n_test, chunk):
        q = test_feats[start : start + chunk].to(device=device, dtype=torch.float32)
        sim = q @ train_t  # (b, n_train)
        top_sim, idx = sim.topk(k, dim=1, largest=True, sorted=True)
        weights = torch.exp((top_sim - top_sim[:, :1]) / T)
        votes = torch.zeros(q.shape[0], num_classes, device=device, dtype=torch.float32)
        votes.scatter_add_(1, train_labels[idx], weights)
        pred = votes.argmax(dim=1)
        correct += int((pred == test_labels[start : start + chunk].to(device)).sum())
    return 100.0 * correct / n_test
