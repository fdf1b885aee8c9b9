"""Elastic building blocks shared by every backbone family.

A POA backbone holds one set of parameters sized for the intact network and
runs either intact or as an elastic sub-network.  The pieces here implement the
width rules of spec §0/§1 once for all families:

* :class:`ElasticLinear` keeps the leading rows/columns of its weight (per row
  group for a fused qkv) and scales its input by ``max_in / in``;
* :class:`ElasticConv2d` keeps the leading filters and input channels of its
  weight and scales its input by ``max_in / in`` (the convolution's version of
  :class:`ElasticLinear`);
* :class:`ElasticLayerNorm` and :class:`LayerScale` keep their first ``w``
  entries; :class:`ElasticGroupNorm` keeps its first ``c`` affine entries and its
  number of groups;
* :func:`block_ids` is the equal-interval depth rule ``floor(linspace(0, L-1, d))``;
* :class:`ElasticBackbone` runs a stage's blocks for a depth, and (when a
  sharding engine asks for it) runs the blocks a sub-network skips on an empty
  batch so that every rank issues the same per-block collectives.

Widths are passed as arguments or read from the input; modules are always
called as modules (never by reaching into ``.weight`` from outside) so that
wrappers' pre-forward hooks (FSDP2 unshard, ZeRO-3 gather) fire for every
branch.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from poa_hpc.kernels.sliced_linear import slice_cols
from poa_hpc.models.ops import elastic_conv2d, elastic_linear

__all__ = ["ElasticLinear", "ElasticConv2d", "ElasticLayerNorm", "ElasticGroupNorm", "ElasticMlp", "LayerScale",
           "DropPath", "DROP_PATH_MODES", "subset_size", "uses_subset", "block_ids", "ElasticBackbone"]


def block_ids(total_depth: int, depth: int) -> List[int]:
    """Equal-interval block selection: floor(linspace(0, L-1, d)) (authors' code)."""
    if not (1 <= depth <= total_depth):
        raise ValueError(f"depth {depth} must be in [1, {total_depth}]")
    return np.linspace(0, total_depth - 1, depth).astype(np.int64).tolist()


class ElasticLinear(nn.Linear):
    """nn.Linear whose forward can run on a leading sub-block of its weight.

    The input width is read from ``x``; ``out_features`` (per group) is given.
    ``groups`` > 1 treats the weight as that many stacked row blocks (fused qkv);
    ``in_groups`` > 1 treats its columns as that many concatenated blocks, of which
    each keeps its leading ``in / in_groups`` columns (Swin's patch merge).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, groups: int = 1, backend: str = "torch",
                 in_groups: int = 1):
        super().__init__(in_features, out_features * groups, bias=bias)
        self.groups = groups
        self.in_groups = in_groups
        self.max_out = out_features
        self.backend = backend

    def forward(self, x: torch.Tensor, out_features: Optional[int] = None) -> torch.Tensor:
        return elastic_linear(x, self.weight, self.bias, out_features or self.max_out, self.groups, self.backend,
                              self.in_groups)

    def extra_repr(self) -> str:
        return (super().extra_repr() + (f", groups={self.groups}" if self.groups > 1 else "")
                + (f", in_groups={self.in_groups}" if self.in_groups > 1 else ""))


class ElasticConv2d(nn.Conv2d):
    """nn.Conv2d whose forward can run on the leading ``out x in`` block of its weight.

    The input channels are read from ``x``; ``out_channels`` is given (default: all).  The
    input is scaled by ``max_in / in`` as :class:`ElasticLinear` does (spec §0; the authors'
    ``DynamicConv2d`` ``offset_scale``).  No channel groups, zero padding only.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = False, backend: str = "torch"):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.backend = backend

    def forward(self, x: torch.Tensor, out_channels: Optional[int] = None) -> torch.Tensor:
        return elastic_conv2d(x, self.weight, self.bias, out_channels or self.out_channels, self.stride,
                              self.padding, self.dilation, self.backend)


class ElasticGroupNorm(nn.GroupNorm):
    """GroupNorm over the input's channels ``c``, using the first ``c`` affine entries.

    The number of groups stays ``num_groups`` at every width, so the channels per group
    change with the width (``c / num_groups``: 64 mid channels in 32 groups are 2 per group,
    128 are 4), as the authors' ``DynamicGroupNorm``.  A dense extracted network has a plain
    GroupNorm with the same number of groups over its ``c`` channels, hence the same output.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c % self.num_groups:
            raise ValueError(f"ElasticGroupNorm: {c} channels do not split into {self.num_groups} groups")
        return F.group_norm(x, self.num_groups, self.weight[:c], self.bias[:c], self.eps)


class ElasticLayerNorm(nn.LayerNorm):
    """LayerNorm over the input's width, using the first ``width`` affine entries (with ``groups`` > 1:
    the first ``width / groups`` entries of each of ``groups`` equal blocks, for concatenated features
    such as Swin's patch merge)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, *, groups: int = 1, **kwargs):
        super().__init__(normalized_shape, eps=eps, **kwargs)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1]
        return F.layer_norm(x, (w,), slice_cols(self.weight, w, self.groups), slice_cols(self.bias, w, self.groups),
                            self.eps)


class ElasticMlp(nn.Module):
    """The transformer MLP (fc1, GELU, fc2) at the input's width: the hidden width follows it at the same ratio
    (timm's ``Mlp`` at every sub-network; ViT and Swin blocks share it)."""

    def __init__(self, dim: int, hidden: int, linear_backend: str):
        super().__init__()
        self.ratio = hidden / dim
        self.fc1 = ElasticLinear(dim, hidden, backend=linear_backend)
        self.act = nn.GELU()
        self.fc2 = ElasticLinear(hidden, dim, backend=linear_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1]
        return self.fc2(self.act(self.fc1(x, int(round(self.ratio * w)))), w)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma[: x.shape[-1]]


DROP_PATH_MODES = ("auto", "mask", "subset")

# ``auto`` runs a residual branch on a sample subset above this rate, as DINOv2 and the authors' ViT block
# ("the overhead is compensated only for a drop path rate larger than 0.1").
SUBSET_ABOVE = 0.1


def uses_subset(mode: str, rate: float) -> bool:
    """Whether stochastic depth of ``mode`` at ``rate`` runs residual branches on a sample subset in training."""
    return rate > 0.0 and (mode == "subset" or (mode == "auto" and rate > SUBSET_ABOVE))


def subset_size(batch: int, rate: float) -> int:
    """Samples a residual branch runs on in subset mode: ``max(int(b (1 - rate)), 1)`` (DINOv2), at most ``b``."""
    return min(max(int(batch * (1 - rate)), 1), batch)


class DropPath(nn.Module):
    """Per-sample stochastic depth of a residual branch, in one of two forms with the same expectation.

    * ``mask``: the branch runs on the whole batch; each sample's branch output is kept with probability
      ``1 - p`` and rescaled by ``1 / (1 - p)`` (timm's ``DropPath``).  ``drop_path(y)`` applies it to a
      computed branch output ``y``.
    * ``subset``: the branch runs only on ``k = max(int(b (1 - p)), 1)`` samples drawn without replacement
      and is index-added back scaled by ``b / k`` (DINOv2's ``drop_add_residual_stochastic_depth``, the
      authors' ViT block): the dropped samples' branch is never computed, so the branch costs ``k / b``.
    * ``auto``: ``subset`` when ``p > 0.1``, else ``mask``, as DINOv2 (``model.drop_path_mode``; the schema's
      default is ``mask``).

    Use :meth:`add` (``base + branch(inp)`` with the drop applied) in blocks.  Both forms draw from
    PyTorch's default generator of the input's device, which the trainer seeds from (seed, rank, step) at
    the start of every step; the draws happen in a fixed order (block, then branch), so the kept samples
    are a function of (seed, rank, step, block, branch) and resumed runs repeat them.  A batch of zero
    samples (the blocks a sharded sub-network skips) draws nothing.  Activation checkpointing's recompute
    restores the generator state (``preserve_rng_state``) and so draws the same subset.  In eval mode, or
    at ``p = 0``, the branch is added whole.
    """

    def __init__(self, p: float = 0.0, mode: str = "mask"):
        super().__init__()
        self.p = p
        self.mode = mode

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in DROP_PATH_MODES:
            raise ValueError(f"drop path mode {mode!r} is not one of {list(DROP_PATH_MODES)}")
        self._mode = mode

    @property
    def uses_subset(self) -> bool:
        """Whether :meth:`add` runs the branch on a sample subset in training."""
        return uses_subset(self.mode, self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def add(self, base: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor],
            inp: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``base + drop(branch(inp))`` (``inp`` defaults to ``base``; ``branch`` maps a batch of samples of
        ``inp`` to the same samples of ``base``'s shape and keeps samples independent of each other)."""
        inp = base if inp is None else inp
        b = inp.shape[0]
        if self.p == 0.0 or not self.training or not self.uses_subset:
            return base + self(branch(inp))
        if b == 0:  # a skipped block's empty batch (sync_skipped_blocks): nothing to draw
            return base + branch(inp)
        k = subset_size(b, self.p)
        keep = torch.randperm(b, device=inp.device)[:k]
        residual = branch(inp[keep])
        out = torch.index_add(base.flatten(1), 0, keep, residual.flatten(1).to(base.dtype), alpha=b / k)
        return out.view_as(base)

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}"


class ElasticBackbone(nn.Module):
    """Base class of every elastic backbone.

    Subclasses implement ``forward_features(x, masks, width, depth)`` returning a
    dict with ``x_norm_clstoken`` (B, C) — the image feature the heads and k-NN
    use — and ``x_norm_patchtokens`` (B, N, C) on the family's iBOT mask grid.
    ``family`` names the registered backbone spec (``poa_hpc.models.registry``).
    """

    family: str = ""

    def __init__(self) -> None:
        super().__init__()
        # Set by sharding engines whose collectives run per block (FSDP2, ZeRO-3): a block this
        # sub-network skips still runs, on an empty batch, so every rank issues the same
        # all-gathers and reduce-scatters even when ranks train sub-networks of different depth.
        self.sync_skipped_blocks = False

    def set_drop_path_mode(self, mode: str) -> None:
        """Stochastic depth form of every block (:class:`DropPath`): ``auto`` | ``mask`` | ``subset``."""
        for m in self.modules():
            if isinstance(m, DropPath):
                m.mode = mode

    def run_blocks(self, blocks: Sequence[nn.Module], ids: Iterable[int], x: torch.Tensor,
                   call: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """Apply ``blocks[i]`` for ``i`` in ``ids`` (in order); skipped blocks run on ``x[:0]`` when
        :attr:`sync_skipped_blocks` is set (a skipped block takes and returns the shape of the
        block before it).  ``call(block, x)`` runs one block (default ``block(x)``), e.g. to pass
        a width the block cannot read from its input."""
        call = call or (lambda block, t: block(t))
        ids = set(ids)
        for i, block in enumerate(blocks):
            if i in ids:
                x = call(block, x)
            elif self.sync_skipped_blocks:
                empty = call(block, x[:0])
                if torch.is_grad_enabled():  # keep it in the graph so its backward hooks run too
                    x = x + 0.0 * empty.sum()
        return x

    def forward(self, x: torch.Tensor, width: Optional[int] = None, depth=None, masks: Optional[torch.Tensor] = None,
                features: bool = False):
        """[CLS] features (B, C), or with ``features=True`` the dict of ``forward_features``.

        Training code calls the module (not ``forward_features``) so that wrappers'
        pre-forward hooks (FSDP2 unshard, ZeRO-3 gather) fire on the backbone's own
        parameters for every branch.
        """
        out = self.forward_features(x, masks=masks, width=width, depth=depth)
        return out if features else out["x_norm_clstoken"]

    def forward_features(self, x: torch.Tensor, masks=None, width=None, depth=None):  # pragma: no cover - abstract
        raise NotImplementedError
