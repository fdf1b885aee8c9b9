"""The seams of the elastic model: the sliced projection, the sliced convolution and attention.

Every elastic projection, elastic convolution and attention call of the model goes
through these functions, so faster backends (a Triton kernel for the sliced
projection, xFormers for attention) plug in here without touching the model.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from poa_hpc.kernels.sliced_conv import sliced_conv2d
from poa_hpc.kernels.sliced_linear import sliced_linear

ELASTIC_LINEAR_BACKENDS = ("torch", "triton", "auto")
ELASTIC_CONV_BACKENDS = ("torch",)
ATTENTION_BACKENDS = ("sdpa", "math", "xformers")

log = logging.getLogger("poa_hpc.ops")
_fallback_said = set()
_kernel: Optional[Callable[..., torch.Tensor]] = None


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    if bias is not None:  # a GPU's SDPA runs the memory-efficient kernel for an additive bias (Swin windows)
        return _efficient(q, k, v, bias)
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]


def _efficient(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    if bias is not None:
        bias = bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, q.requires_grad)[0]


ATTENTION_KERNELS = {"flash": _flash, "efficient": _efficient}


@contextlib.contextmanager
def attention_kernel(name: Optional[str]) -> Iterator[None]:
    """Within this context every :func:`attention` call runs the named SDPA kernel directly: ``flash``
    (what a GPU's SDPA runs for bf16/fp16) or ``efficient`` (fp32); ``None`` changes nothing.

    For accounting on fake or meta tensors (``poa estimate``, FLOP counting): there SDPA's own dispatch
    sees no GPU and takes the math path, whose autograd saves the N x N attention matrix; the kernels
    called here save what they save on a GPU (output and log-sum-exp), and FLOP counters see them."""
    global _kernel
    saved, _kernel = _kernel, (ATTENTION_KERNELS[name] if name else None)
    try:
        yield
    finally:
        _kernel = saved


@functools.cache
def _xformers_attention():
    """xformers' memory_efficient_attention, or None where it cannot run."""
    try:
        from xformers.ops import memory_efficient_attention
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    return memory_efficient_attention


def _say_once(reason: str) -> None:
    if reason not in _fallback_said:
        _fallback_said.add(reason)
        log.warning("model.attention=xformers: %s; using torch SDPA instead", reason)


def elastic_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_features: int,
    groups: int = 1,
    backend: str = "torch",
    in_groups: int = 1,
) -> torch.Tensor:
    """y = F.linear(x * alpha, W[rows, cols], b[rows]) with alpha = max_in / in.

    ``backend``: ``torch`` (slice + matmul), ``triton`` (the kernels in
    ``poa_hpc.kernels.sliced_linear_triton``, reading the weight in place), or
    ``auto`` (Triton for CUDA tensors, torch elsewhere).  At full width every
    backend is a plain ``F.linear``.

    The input width ``in`` is the last dimension of ``x``; ``rows`` are the
    leading ``out_features`` rows of each of ``groups`` row blocks of ``weight``
    and ``cols`` the leading ``in / in_groups`` columns of each of ``in_groups``
    column blocks (Swin's patch merge: 4 concatenated neighbours) (spec §0: the
    scale multiplies the input; the bias is not scaled).  The Triton kernels take
    leading columns only; ``in_groups > 1`` runs on the torch path (the patch
    merges are a small share of the FLOPs).
    """
    max_in = weight.shape[1]
    in_features = x.shape[-1]
    if in_features == max_in and out_features * groups == weight.shape[0]:
        return F.linear(x, weight, bias)
    if backend not in ELASTIC_LINEAR_BACKENDS:
        raise ValueError(f"model.elastic_linear: unknown backend {backend!r}, expected one of {ELASTIC_LINEAR_BACKENDS}")
    alpha = max_in / in_features
    if in_groups > 1:
        return sliced_linear(x, weight, bias, out_features, in_features, alpha=alpha, groups=groups,
                             in_groups=in_groups)
    kernel = _triton_kernel() if backend == "triton" or (backend == "auto" and x.is_cuda) else None
    if kernel is not None:
        return kernel(x, weight, bias, out_features, in_features, alpha=alpha, groups=groups)
    if backend == "triton":
        raise RuntimeError("model.elastic_linear=triton but triton is not installed")
    return sliced_linear(x, weight, bias, out_features, in_features, alpha=alpha, groups=groups)


def elastic_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_channels: int,
    stride=1,
    padding=0,
    dilation=1,
    backend: str = "torch",
) -> torch.Tensor:
    """y = conv2d(x * alpha, W[:out, :in], b[:out]) with alpha = max_in / in (no channel groups).

    The input width ``in`` is ``x.shape[1]``.  ``backend``: ``torch`` (the reference in
    ``poa_hpc.kernels.sliced_conv``: slice, scale the weight slice, ``F.conv2d``; its
    docstring lists what that costs per call); a Triton or cuDNN-strided kernel plugs
    in here.  At full width it is a plain ``F.conv2d``.  ``model.elastic_linear`` does
    not select it: the sliced projection and the sliced convolution are different
    kernels, measured separately.
    """
    max_in = weight.shape[1]
    in_channels = x.shape[1]
    if in_channels == max_in and out_channels == weight.shape[0]:
        return F.conv2d(x, weight, bias, stride, padding, dilation)
    if backend not in ELASTIC_CONV_BACKENDS:
        raise ValueError(f"elastic_conv2d: unknown backend {backend!r}, expected one of {ELASTIC_CONV_BACKENDS}")
    return sliced_conv2d(x, weight, bias, out_channels, in_channels, alpha=max_in / in_channels, stride=stride,
                         padding=padding, dilation=dilation)


@functools.cache  # looked up once, not on every projection call
def _triton_kernel():
    try:
        from poa_hpc.kernels.sliced_linear_triton import sliced_linear_triton
    except ImportError:
        return None
    return sliced_linear_triton


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa",
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax attention over (B, H, N, d) tensors with scale d**-0.5.

    ``bias``: an additive float bias of the scores, broadcastable to (B, H, N, N)
    (Swin's relative position bias plus its shifted-window mask); it may require grad.
    ``xformers``: memory-efficient attention (CUDA only; where it is missing, the
    tensors are on the CPU or a bias is given, one log line says so and SDPA runs
    instead).
    ``sdpa``: torch's scaled_dot_product_attention, which picks flash / efficient /
    cuDNN kernels itself.  ``math``: the plain reference.  An elastic width just
    means fewer heads H; every backend takes any H.  Inside :func:`attention_kernel` the
    named kernel runs instead.
    """
    if q.numel() == 0 and bias is not None and bias.requires_grad:
        # An empty batch (a block a sub-network skips, run so that sharded engines' per-block collectives
        # stay aligned): SDPA returns an output detached from the bias there, leaving its parameters
        # (Swin's bias tables) without a gradient on this rank only; the math path gives them zeros.
        backend = "math"
    elif _kernel is not None:
        return _kernel(q, k, v, bias)
    if backend == "xformers":
        if bias is not None:
            # xformers wants a bias whose rows are padded to a multiple of 8 elements; Swin's windows
            # (N = 49) are not, and SDPA's kernels take any additive mask.
            _say_once("an attention bias (Swin windows) is given")
            backend = "sdpa"
        elif not q.is_cuda:
            _say_once("tensors are on the CPU, where xformers has no kernel")
            backend = "sdpa"
        else:
            mea = _xformers_attention()
            if mea is None:
                _say_once("xformers is not installed or does not load")
                backend = "sdpa"
            else:  # xformers wants (B, N, H, d)
                return mea(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    if backend == "math":
        scale = q.shape[-1] ** -0.5
        attn = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            attn = attn + bias
        return attn.softmax(dim=-1) @ v
    raise ValueError(f"model.attention: unknown backend {backend!r}, expected one of {ATTENTION_BACKENDS}")
