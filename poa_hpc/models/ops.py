"""The two seams of the elastic model: the sliced projection and attention.

Every elastic projection and every attention call of the model goes through
these functions, so faster backends (a Triton kernel for the sliced projection,
xFormers for attention) plug in here without touching the model.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from poa_hpc.kernels.sliced_linear import sliced_linear

ELASTIC_LINEAR_BACKENDS = ("torch", "auto")
ATTENTION_BACKENDS = ("sdpa", "math")


def elastic_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_features: int,
    groups: int = 1,
    backend: str = "torch",
) -> torch.Tensor:
    """y = F.linear(x * alpha, W[rows, :in], b[rows]) with alpha = max_in / in.

    The input width ``in`` is the last dimension of ``x``; ``rows`` are the
    leading ``out_features`` rows of each of ``groups`` row blocks of ``weight``
    (spec §0: the scale multiplies the input; the bias is not scaled).
    """
    max_in = weight.shape[1]
    in_features = x.shape[-1]
    if in_features == max_in and out_features * groups == weight.shape[0]:
        return F.linear(x, weight, bias)
    if backend not in ELASTIC_LINEAR_BACKENDS:
        raise ValueError(f"model.elastic_linear: unknown backend {backend!r}, expected one of {ELASTIC_LINEAR_BACKENDS}")
    return sliced_linear(x, weight, bias, out_features, in_features, alpha=max_in / in_features, groups=groups)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Softmax attention over (B, H, N, d) tensors with scale d**-0.5."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        scale = q.shape[-1] ** -0.5
        attn = (q * scale) @ k.transpose(-2, -1)
        return attn.softmax(dim=-1) @ v
    raise ValueError(f"model.attention: unknown backend {backend!r}, expected one of {ATTENTION_BACKENDS}")
