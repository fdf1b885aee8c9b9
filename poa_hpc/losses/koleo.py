"""KoLeo regulariser (DINOv2): -mean log distance of each feature to its nearest neighbour."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from poa_hpc.losses.dino import upcast


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Features (n, d) are L2-normalised first; the nearest neighbour excludes the point itself."""
    x = F.normalize(upcast(features), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)  # below any cosine similarity
        nn_idx = dots.argmax(dim=1)
    dist = F.pairwise_distance(x, x[nn_idx], p=2, eps=eps)
    return -torch.log(dist + eps).mean()
