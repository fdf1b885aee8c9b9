"""Sliced ("elastic") 2-D convolution: the reference implementation.

Computes ``y = conv2d(alpha * x, W[:out_channels, :in_channels], b[:out_channels])``
with the stride, padding and dilation of the full convolution: the leading
``out_channels`` filters, each restricted to its leading ``in_channels`` input
channels.  The input scale ``alpha`` is applied to the weight slice instead of
the input (``conv2d(alpha * x, W) == conv2d(x, alpha * W)``, convolution being
linear in each argument), because the slice is the much smaller tensor.  Autograd
writes the gradient into the matching sub-block of the full parameter's gradient,
so several calls on one parameter accumulate.

This module is the seam a fused GPU kernel replaces; it knows nothing of the model
that calls it.

Cost of the reference, per sliced call (to measure on a GPU against a dense
``F.conv2d`` of the sliced shape):

* forward: one pass over the weight slice, ``alpha * W[:out, :in]``, which is also
  the copy that makes the strided slice contiguous for cuDNN (a slice with
  ``in < max_in`` is not contiguous; scaling it produces the contiguous operand in
  the same pass).  With the scale on the input instead, the call would add one
  read + write of the activation, ``B * in * H * W`` elements, forward and again
  backward (the gradient of ``x`` is scaled too); for a 3x3 conv of a ResNet stage-1
  bottleneck at batch 40, 224 px, that is ~16 M elements against the weight's
  ~0.15 M;
* backward: the weight gradient of the slice, ``out * in * k * k`` elements, is
  scaled by ``alpha`` (one pass) and scattered into a zero-filled tensor of the
  full weight's shape (autograd's slice backward: one full-size fill plus one
  slice copy), which is then accumulated into ``.grad`` (one full-size add);
* no extra activation-sized copies: ``x`` goes to the convolution as it is.

A kernel that reads the weight in place with channel strides (a Triton conv, or
cuDNN's grouped-strided descriptors) removes the forward copy and writes the
weight gradient into the slice of ``.grad`` directly.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

_Pair = Union[int, Tuple[int, int]]


def check_conv_slice(name: str, x: torch.Tensor, weight: torch.Tensor, out_channels: int, in_channels: int) -> None:
    """The contract every sliced-convolution implementation checks: a clear error, not a kernel fault."""
    if weight.ndim != 4 or x.ndim != 4:
        raise ValueError(f"{name}: expected a 4-D weight and a 4-D (N, C, H, W) input, got {tuple(weight.shape)} "
                         f"and {tuple(x.shape)}")
    if not (0 < out_channels <= weight.shape[0]) or not (0 < in_channels <= weight.shape[1]):
        raise ValueError(f"{name}: cannot take {out_channels} filters x {in_channels} input channels of a weight "
                         f"of shape {tuple(weight.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{name}: input has {x.shape[1]} channels, expected {in_channels}")


def sliced_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_channels: int,
    in_channels: int,
    alpha: float = 1.0,
    stride: _Pair = 1,
    padding: _Pair = 0,
    dilation: _Pair = 1,
) -> torch.Tensor:
    """Reference sliced convolution (no channel groups).

    Args:
        x: (N, in_channels, H, W) input.
        weight: full (max_out, max_in, kh, kw) weight.
        bias: full (max_out,) bias or None; it is sliced, never scaled.
        out_channels: leading filters kept.
        in_channels: leading input channels kept.
        alpha: scale of the input (applied to the weight slice).
        stride, padding, dilation: as ``F.conv2d``.

    Returns:
        (N, out_channels, H', W')
    """
    check_conv_slice("sliced_conv2d", x, weight, out_channels, in_channels)
    w = weight[:out_channels, :in_channels]
    w = w * alpha if alpha != 1.0 else w.contiguous()
    b = None if bias is None else bias[:out_channels]
    return F.conv2d(x, w, b, stride, padding, dilation)
