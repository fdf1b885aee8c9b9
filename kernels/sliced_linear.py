"""Sliced ("elastic") linear projection: the reference implementation.

Computes ``y = F.linear(alpha * x, W[rows, cols], b[rows])`` where the
rows are the leading ``out_features`` rows of each of ``groups`` equal row blocks
of the full weight (``groups=1``: a leading block; ``groups=3``: the q, k and v
blocks of a fused qkv weight) and the columns likewise the leading
``in_features / in_groups`` columns of each of ``in_groups`` equal column blocks
(``in_groups=1``: the leading ``in_features`` columns; ``in_groups=4``: the four
concatenated neighbours of a Swin patch merge).  The weight is read through views
(no copy for ``groups=1, in_groups=1``), and autograd writes the gradient into the
matching sub-block of the full parameter's gradient, so several calls on one
parameter accumulate.

This module is the seam a fused GPU kernel replaces; it knows nothing of the
model that calls it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def slice_rows(t: torch.Tensor, out_features: int, groups: int) -> torch.Tensor:
    """Leading ``out_features`` rows of each of ``groups`` equal row blocks of ``t``."""
    if groups == 1:
        return t[:out_features]
    block = t.shape[0] // groups
    if out_features == block:
        return t
    return torch.cat([t[g * block : g * block + out_features] for g in range(groups)], dim=0)


def slice_cols(t: torch.Tensor, in_features: int, in_groups: int = 1) -> torch.Tensor:
    """Leading ``in_features / in_groups`` entries of each of ``in_groups`` equal blocks of ``t``'s last
    dimension (a weight's columns, or a LayerNorm's affine vector over grouped features)."""
    if in_groups == 1:
        return t[..., :in_features]
    block = t.shape[-1] // in_groups
    per = in_features // in_groups
    if per == block:
        return t
    return t.unflatten(-1, (in_groups, block))[..., :per].flatten(-2)


def check_slice(name: str, x: torch.Tensor, weight: torch.Tensor, out_features: int, in_features: int,
                groups: int, in_groups: int = 1) -> None:
    """The contract every sliced-projection implementation checks: a clear error, not a kernel fault."""
    max_out = weight.shape[0] // groups
    if (weight.shape[0] % groups or weight.shape[1] % in_groups or in_features % in_groups
            or not (0 < out_features <= max_out) or not (0 < in_features <= weight.shape[1])):
        cols = f"{in_groups}x{in_features // in_groups}" if in_groups > 1 else f"{in_features}"
        raise ValueError(
            f"{name}: cannot take {groups}x{out_features} rows x {cols} cols of a weight of shape {tuple(weight.shape)}"
        )
    if x.shape[-1] != in_features:
        raise ValueError(f"{name}: input has {x.shape[-1]} features, expected {in_features}")


def sliced_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_features: int,
    in_features: int,
    alpha: float = 1.0,
    groups: int = 1,
    in_groups: int = 1,
) -> torch.Tensor:
    """Reference sliced projection.

    Args:
        x: (..., in_features) input.
        weight: full (groups * max_out, max_in) weight.
        bias: full (groups * max_out,) bias or None; it is sliced, never scaled.
        out_features: rows kept per group.
        in_features: leading input columns kept.
        alpha: scale applied to the input (equivalently to the sliced weight).
        groups: number of equal row blocks in ``weight``.
        in_groups: number of equal column blocks in ``weight`` (``in_features`` is split evenly over them).

    Returns:
        (..., groups * out_features)
    """
    check_slice("sliced_linear", x, weight, out_features, in_features, groups, in_groups)
    w = slice_cols(slice_rows(weight, out_features, groups), in_features, in_groups)
    b = None if bias is None else slice_rows(bias, out_features, groups)
    if alpha != 1.0:
        x = x * alpha
    return F.linear(x, w, b)
