"""DINO projection heads: 3-layer MLP, L2-normalised bottleneck, weight-normalised prototypes.

The first layer is elastic in its input (an elastic student's [CLS] has width
``w``): it keeps the first ``w`` input columns and scales the input by
``D / w`` like every other elastic projection.  The elastic student shares the
intact student's heads (authors' MDINOHead).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from poa_hpc.models.elastic import ElasticLinear


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| per output row (g initialised to 1).

    Written out rather than with ``torch.nn.utils.weight_norm`` so that the two
    parameters are plain tensors that shard and checkpoint like any other.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    def weight_matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """The (out, in) prototype matrix ``g * v / ||v||`` in ``dtype`` (the input's)."""
        return (self.weight_g * F.normalize(self.weight_v, dim=1)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_matrix(x.dtype))


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, linear_backend: str = "torch"):
        super().__init__()
        nlayers = max(nlayers, 1)
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: List[nn.Module] = []
        for i in range(nlayers):
            if i == 0:
                layers.append(ElasticLinear(dims[0], dims[1], backend=linear_backend))
            else:
                layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x: torch.Tensor, project: bool = True):
        """Logits ``(T, K)``; with ``project=False`` the pair ``(z, W)`` instead: the L2-normalised
        bottleneck features ``z`` (T, bottleneck) and the prototype matrix ``W`` (K, bottleneck), whose
        product ``F.linear(z, W)`` is the logits.  The training step takes the pair and forms the logits
        chunk by chunk inside its losses (:mod:`poa_hpc.losses.chunked`), so a (T, K) matrix of every
        head is never alive at once; ``W`` is computed here, inside the module call, so sharding
        wrappers see their parameters used in this module's forward."""
        x = self.mlp(x)  # the first (elastic) layer reads the input width from x
        z = F.normalize(x, dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        if project:
            return self.last_layer(z)
        return z, self.last_layer.weight_matrix(z.dtype)


def build_heads(in_dim: int, prototypes: Sequence[int], hidden_dim: int, bottleneck_dim: int, nlayers: int,
                linear_backend: str = "torch") -> nn.ModuleList:
    """Multiple projection heads (MPH): one per prototype count."""
    return nn.ModuleList(
        DINOHead(in_dim, k, hidden_dim, bottleneck_dim, nlayers, linear_backend) for k in prototypes
    )
