"""Linear probe on frozen features (DINOv2's linear evaluation, adapted to cached features).

Protocol (DINOv2 ``eval/linear.py``, ``n_last_blocks=1, avgpool=True``):

* features: the final-norm [CLS] token concatenated with the average of the final-norm
  patch tokens (:func:`probe_features`), computed once per network and cached;
* one linear layer per learning rate of a small grid, all trained together on the same
  mini-batches (DINOv2 trains its grid of classifiers in parallel the same way): SGD with
  momentum 0.9, no weight decay, cosine learning-rate decay to 0, weights initialised
  ``N(0, 0.01)`` and biases 0, cross-entropy;
* the classifier with the best top-1 on the validation split is reported, with its
  learning rate.  DINOv2 also selects on the split it reports, so the number is the best
  of the grid, slightly optimistic; a held-out split would be needed for an unbiased one.

Departures, for CPU scale: features are computed once (no random-resized-crop / flip
augmentation of the training images, which DINOv2 recomputes every epoch), and are
standardised with the training split's per-dimension mean and standard deviation by
default, so one learning-rate grid fits every family and size.  Only the last block's
output is used: intermediate blocks are not exposed through the backbone spec.

Deterministic given ``seed`` (initialisation and the shuffling of every epoch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["LR_GRID", "BATCH_SIZE", "LinearProbeResult", "probe_features", "standardize", "linear_probe", "cosine_lr"]

#: Default learning-rate grid (for standardised features, batch 256).
LR_GRID: Tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
MOMENTUM = 0.9
BATCH_SIZE = 256
INIT_STD = 0.01


@dataclass
class LinearProbeResult:
    top1: float  # best validation top-1 (%) over the grid
    lr: float  # its learning rate
    per_lr: Dict[float, float]  # validation top-1 (%) of every learning rate (nan where training diverged)
    weight: Tensor  # (D, C) of the best classifier (on standardised features when standardize=True)
    bias: Tensor  # (C,)


def probe_features(out: Dict[str, Tensor]) -> Tensor:
    """``concat(x_norm_clstoken, mean(x_norm_patchtokens))`` as float32, shape ``(B, C_cls + C_patch)``."""
    cls, patches = out["x_norm_clstoken"], out["x_norm_patchtokens"]
    return torch.cat([cls.float().reshape(cls.shape[0], -1), patches.float().mean(dim=1)], dim=1)


def standardize(train_x: Tensor, *others: Tensor, eps: float = 1e-6) -> Tuple[Tensor, ...]:
    """Every tensor minus the training split's per-dimension mean, divided by its standard deviation."""
    mean = train_x.mean(dim=0, keepdim=True)
    std = train_x.std(dim=0, keepdim=True, unbiased=False).clamp_min(eps)
    return tuple((x - mean) / std for x in (train_x, *others))


def cosine_lr(base: float, step: int, total: int) -> float:
    """``base * (1 + cos(pi * step / total)) / 2``: from ``base`` at step 0 towards 0 at ``total``."""
    return base * 0.5 * (1.0 + math.cos(math.pi * step / total))


@torch.no_grad()
def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    num_classes: int,
    lrs: Sequence[float] = LR_GRID,
    epochs: int = 100,
    batch_size: int = BATCH_SIZE,
    seed: int = 0,
    standardized: bool = True,
) -> LinearProbeResult:
    """Train one linear classifier per learning rate in ``lrs`` on ``(train_x, train_y)`` and report
    the best validation top-1 (ties: the first learning rate of the grid).

    The gradient of the mean cross-entropy is computed in closed form (``(softmax - onehot) / B``)
    for all classifiers at once; momentum SGD as ``torch.optim.SGD`` (``buf = m * buf + g``,
    ``w -= lr * buf``), learning rate decayed per step with :func:`cosine_lr` over ``epochs``.
    """
    if not lrs or any(lr <= 0 for lr in lrs):
        raise ValueError(f"linear probe: learning rates must be positive, got {list(lrs)}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"linear probe: need epochs >= 1 and batch_size >= 1 (got {epochs}, {batch_size})")
    n, dim = train_x.shape
    if n == 0 or val_x.shape[0] == 0:
        raise ValueError(f"linear probe: empty train ({n}) or val ({val_x.shape[0]}) split")
    device = train_x.device
    train_x, val_x = train_x.float(), val_x.to(device).float()
    train_y = train_y.to(device=device, dtype=torch.long).reshape(-1)
    val_y = val_y.to(device=device, dtype=torch.long).reshape(-1)
    if int(train_y.min()) < 0 or int(train_y.max()) >= num_classes:
        raise ValueError(f"linear probe: train labels must lie in [0, {num_classes})")
    if standardized:
        train_x, val_x = standardize(train_x, val_x)

    # The K classifiers side by side as one (D, K * C) matrix: two plain matmuls per step for the whole grid.
    K, C = len(lrs), num_classes
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(dim, C, generator=gen) * INIT_STD
    weight = w0.to(device).repeat(1, K)  # (D, K * C): the same start for every learning rate
    bias = torch.zeros(K * C, device=device)
    buf_w, buf_b = torch.zeros_like(weight), torch.zeros_like(bias)
    base = torch.tensor(list(lrs), dtype=torch.float32, device=device).repeat_interleave(C)  # (K * C,)
    total = epochs * math.ceil(n / batch_size)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb, yb = train_x[idx], train_y[idx]
            B = len(idx)
            logits = torch.addmm(bias, xb, weight).view(B, K, C)
            grad = (logits - logits.amax(dim=-1, keepdim=True)).exp_()  # softmax (faster than .softmax on
            grad /= grad.sum(dim=-1, keepdim=True)  # a short last dimension)
            grad[torch.arange(B, device=device), :, yb] -= 1.0
            grad = grad.view(B, K * C).div_(B)  # d(mean cross-entropy)/d(logits) of every classifier
            buf_w.addmm_(xb.t(), grad, beta=MOMENTUM)  # buf = momentum * buf + gradient
            buf_b.mul_(MOMENTUM).add_(grad.sum(dim=0))
            lr = base * cosine_lr(1.0, step, total)
            weight.addcmul_(buf_w, lr, value=-1.0)
            bias.addcmul_(buf_b, lr, value=-1.0)
            step += 1

    weight, bias = weight.view(dim, K, C).permute(1, 0, 2), bias.view(K, C)  # (K, D, C), (K, C)
    logits = torch.einsum("bd,kdc->kbc", val_x, weight) + bias[:, None, :]
    correct = (logits.argmax(dim=-1) == val_y[None, :]).sum(dim=1).tolist()
    finite = [bool(torch.isfinite(weight[k]).all() and torch.isfinite(bias[k]).all()) for k in range(K)]
    accs = [100.0 * c / val_x.shape[0] if ok else float("nan") for c, ok in zip(correct, finite)]
    best = max(range(K), key=lambda k: (accs[k] if finite[k] else -1.0, -k))
    return LinearProbeResult(accs[best] if finite[best] else float("nan"), float(lrs[best]),
                             {float(lr): a for lr, a in zip(lrs, accs)}, weight[best].clone(), bias[best].clone())
