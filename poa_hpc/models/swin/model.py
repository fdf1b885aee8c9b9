"""Elastic Swin Transformer (paper §3.3 / Appendix B, the authors' ``DynamicSwinTransformer``).

One set of parameters, sized for the intact network (stage-1 width ``C``,
stages of ``C, 2C, 4C, 8C`` channels, ``depths`` blocks), runs intact or as the
sub-network ``(w, d)``: stage-1 width ``w`` (stage ``s`` has ``w * 2**s``
channels) and ``d`` blocks in stage 3, the only elastic stage.

* every projection keeps the leading block of its weight and scales its input by
  ``max_in / in`` (spec §0): qkv per q/k/v group (the first ``c / head_dim`` heads),
  proj, fc1, fc2; the patch merge's reduction keeps, of each of its 4 concatenated
  input groups ``[g * C_s, (g + 1) * C_s)``, the leading ``c`` columns (eq. 11: the
  merge and the last MLP of a stage follow the stage widths);
* LayerNorms keep their first ``c`` entries (the merge norm: the same 4 groups);
  the relative position bias table keeps its first ``c / head_dim`` heads;
* stage-3 depth ``d`` keeps the blocks ``floor(linspace(0, L3 - 1, d))``; a kept
  block keeps its own shifted-window flag (odd blocks of the intact stage shift)
  and its own drop-path rate, as the authors' code (the flags are not re-alternated).

Layout and names follow timm's ``SwinTransformer`` (``layers.{s}.downsample`` at the
start of stage ``s >= 1``, timm's 2x2 concatenation order), so an extracted
sub-network loads into timm as is.  The authors (mmcv layout) put the merge at the
end of stage ``s - 1`` and concatenate the 2x2 neighbours in another order: a
relabelling and a fixed permutation of the reduction's input columns, which trains
the same.

Where this departs from the authors, and why:

* **patch-embed LayerNorm**: the authors normalise the full ``C``-channel conv output
  and then keep ``w`` channels, while their extractor slices that norm to ``w``
  channels, so their extracted network differs from their elastic forward.  Here the
  conv output is sliced to ``w`` channels first and normalised over those, which is
  what a dense Swin of width ``w`` (and timm's) computes: elastic == extracted == timm.
* windows follow the authors (mmcv): every stage is partitioned into full
  ``window_size`` windows, padding the map with zeros to a multiple of the window
  (before the cyclic shift) and shifting by ``window_size // 2`` on shifted blocks
  even where the map is not larger than a window (timm shrinks the window and drops
  the shift there unless ``always_partition=True``; with it, timm equals this model
  wherever no padding is needed, e.g. every stage at 224 px; timm pads after the
  shift, so padded maps such as 96 px local crops differ).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from poa_hpc.models.elastic import DropPath, ElasticBackbone, ElasticLayerNorm, ElasticLinear, ElasticMlp, block_ids
from poa_hpc.models.ops import attention

#: index of the stage whose depth is elastic (stage 3 of 4)
ELASTIC_STAGE = 2


@dataclass
class SwinArch:
    """The ``model.swin`` config section: the intact Swin and its elastic space.

    A dense extracted sub-network is described by the same class (see :meth:`sub`): its space
    holds one sub-network, itself, and ``stage3_shift`` records which of its stage-3 blocks shift.
    """

    img_size: int = 224  # reference input size (GFLOPs); Swin has no position embedding
    patch_size: int = 4  # patch side (px)
    in_chans: int = 3  # input channels
    embed_dim: int = 128  # stage-1 channels of the intact network (stage s: embed_dim * 2**s)
    depths: List[int] = field(default_factory=lambda: [2, 2, 18, 2])  # blocks per stage of the intact network
    head_dim: int = 16  # the authors' choice (twice the standard Swin head count)
    window_size: int = 7  # attention window side (patches)
    mlp_ratio: float = 4.0  # MLP hidden width / width
    qkv_bias: bool = True  # bias in the qkv projection
    drop_path_rate: float = 0.2  # linspace(0, rate, sum(depths)) over the intact blocks (authors)
    # Elastic space: stage-1 widths min_width, min_width + width_step, ..., embed_dim (multiples of
    # head_dim); stage-3 depths min_depth..depths[2]; eq. 14 sampling with s = sampling_s.
    min_width: int = 96  # narrowest elastic stage-1 width
    width_step: int = 16  # stage-1 width step
    min_depth: int = 6  # fewest stage-3 blocks
    sampling_s: float = 2.0  # s of the eq. 14 sub-network sampling
    # iBOT: masks are drawn on a grid of img / patch / 8 * ibot_scale_factor per side (14 at 224) and
    # upsampled to the patch grid; stage-4 tokens are upsampled by this factor to that grid.
    ibot_scale_factor: int = 2
    # Shifted-window flag of each stage-3 block; null: the odd blocks (the intact Swin).  Extraction
    # sets it: a sub-network's blocks keep the flags they had in the intact network.
    stage3_shift: Optional[List[bool]] = None
    # Initialisation: timm (trunc_normal 0.02 weights, zero biases, trunc_normal 0.02 relative-position
    # tables, as timm's Swin) | authors (their DynamicSwinTransformer calls no init: PyTorch's default
    # Linear / Conv2d init, zero relative-position tables).  See docs/init_from.md.
    init: str = "timm"

    def stage_widths(self, width: Optional[int] = None) -> List[int]:
        w = width or self.embed_dim
        return [w * 2 ** s for s in range(len(self.depths))]

    def shifts(self, stage: int) -> List[bool]:
        """Shifted-window flag of every block of ``stage`` (intact numbering)."""
        if stage == ELASTIC_STAGE and self.stage3_shift is not None:
            return [bool(v) for v in self.stage3_shift]
        return [j % 2 == 1 for j in range(self.depths[stage])]

    def sub(self, width: int, depth: int) -> SwinArch:
        """The dense architecture of the (width, stage-3 depth) sub-network."""
        if width % self.head_dim:
            raise ValueError(f"width {width} is not a multiple of the head dim {self.head_dim}")
        ids = block_ids(self.depths[ELASTIC_STAGE], depth)
        shift3 = self.shifts(ELASTIC_STAGE)
        depths = list(self.depths)
        depths[ELASTIC_STAGE] = depth
        return replace(self, embed_dim=width, depths=depths, min_width=width, min_depth=depth,
                       stage3_shift=[shift3[i] for i in ids])


# ---------------------------------------------------------------------------- windows
def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) index into the (2W-1)^2-row bias table of the offset between in-window tokens i and j."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


@functools.lru_cache(maxsize=64)
def shift_mask(hp: int, wp: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """(nW, N, N) additive mask of shifted windows on an (hp, wp) map padded to whole windows: tokens
    that the cyclic shift brought together from different regions get -100 (authors and timm)."""
    def labels(n: int) -> torch.Tensor:
        lab = torch.zeros(n, dtype=torch.long, device=device)
        lab[n - window: n - shift] = 1
        lab[n - shift:] = 2
        return lab

    region = (labels(hp)[:, None] * 3 + labels(wp)[None, :]).view(1, hp, wp, 1)
    win = window_partition(region, window).squeeze(-1)  # (nW, N)
    diff = win[:, None, :] - win[:, :, None]
    return torch.zeros(diff.shape, device=device).masked_fill(diff != 0, -100.0)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of ``window`` -> (B * nW, window * window, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B * (H // window) * (W // window), window * window, C)  # explicit sizes: B may be 0


def window_reverse(windows: torch.Tensor, window: int, B: int, H: int, W: int) -> torch.Tensor:
    C = windows.shape[-1]
    x = windows.view(B, H // window, W // window, window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


# ---------------------------------------------------------------------------- layers
class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = ElasticLayerNorm(embed_dim)

    def forward(self, x: torch.Tensor, width: int) -> torch.Tensor:
        p = self.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
        # The conv runs as a module call at full width (wrappers that gather parameters in a module's
        # pre-forward hook see the weight whole) and its first ``width`` channels are kept.
        x = self.proj(x)[:, :width].permute(0, 2, 3, 1)  # (B, H, W, w)
        # Departure from the authors: normalise the kept channels, not all of them (see the module doc).
        return self.norm(x)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a relative position bias per head."""

    def __init__(self, dim: int, head_dim: int, window: int, qkv_bias: bool, linear_backend: str, attn_backend: str):
        super().__init__()
        self.head_dim = head_dim
        self.window = window
        self.qkv = ElasticLinear(dim, dim, bias=qkv_bias, groups=3, backend=linear_backend)
        self.proj = ElasticLinear(dim, dim, backend=linear_backend)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, dim // head_dim))
        # A buffer as timm's (not saved: it is a function of the window size).
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.attn_backend = attn_backend

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x``: (B * nW, N, c) windows; ``mask``: (nW, N, N) or None."""
        Bw, N, c = x.shape
        heads = c // self.head_dim
        qkv = self.qkv(x, c).reshape(Bw, N, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # Only the active heads' columns of the table are gathered (their gradient lands there alone).
        bias = self.relative_position_bias_table[:, :heads][self.relative_position_index.view(-1)]
        bias = bias.view(N, N, heads).permute(2, 0, 1).unsqueeze(0)  # (1, h, N, N)
        q, k, v = qkv.unbind(0)
        if mask is not None:
            # Windows and heads share one attention "head" axis, so the (window, head) bias broadcasts
            # over the images instead of being materialised per image: (B, nW * h, N, d).
            nW = mask.shape[0]
            bias = (bias + mask.to(bias.dtype).view(nW, 1, N, N)).reshape(1, nW * heads, N, N)
            q, k, v = (t.reshape(Bw // nW, nW * heads, N, self.head_dim) for t in (q, k, v))
        out = attention(q, k, v, self.attn_backend, bias=bias.to(q.dtype)).reshape(Bw, heads, N, self.head_dim)
        return self.proj(out.transpose(1, 2).reshape(Bw, N, c), c)


class SwinBlock(nn.Module):
    def __init__(self, dim: int, head_dim: int, window: int, shift: bool, mlp_ratio: float, qkv_bias: bool,
                 drop_path: float, linear_backend: str, attn_backend: str):
        super().__init__()
        self.window = window
        self.shift = window // 2 if shift else 0
        self.norm1 = ElasticLayerNorm(dim)
        self.attn = WindowAttention(dim, head_dim, window, qkv_bias, linear_backend, attn_backend)
        self.norm2 = ElasticLayerNorm(dim)
        self.mlp = ElasticMlp(dim, int(dim * mlp_ratio), linear_backend)
        self.drop_path = DropPath(drop_path)

    def extra_repr(self) -> str:
        return f"window={self.window}, shift={self.shift}"

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, c = x.shape
        ws, s = self.window, self.shift
        hp, wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
        # As the authors (mmcv): pad to whole windows first, then shift the padded map.
        if (hp, wp) != (H, W):
            x = F.pad(x, (0, 0, 0, wp - W, 0, hp - H))
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        mask = shift_mask(hp, wp, ws, s, x.device) if s else None
        out = window_reverse(self.attn(window_partition(x, ws), mask), ws, B, hp, wp)
        if s:
            out = torch.roll(out, shifts=(s, s), dims=(1, 2))
        return out[:, :H, :W]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Windows and shifts are per sample, so a sample subset (DropPath's subset mode) is exact.
        x = self.drop_path.add(x, lambda t: self._attn(self.norm1(t)))
        return self.drop_path.add(x, lambda t: self.mlp(self.norm2(t)))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (timm's order: (0,0), (1,0), (0,1), (1,1) as (row, col)), LayerNorm,
    bias-free reduction to twice the channels.  Elastic: each of the 4 groups keeps its first ``c``
    channels (norm entries and reduction columns alike), the reduction its first ``2c`` rows."""

    def __init__(self, dim: int, linear_backend: str):
        super().__init__()
        self.norm = ElasticLayerNorm(4 * dim, groups=4)
        self.reduction = ElasticLinear(4 * dim, 2 * dim, bias=False, backend=linear_backend, in_groups=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, c = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))  # odd maps: zeros at the bottom/right (authors, timm)
        H, W = x.shape[1], x.shape[2]
        x = x.reshape(B, H // 2, 2, W // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * c)
        return self.reduction(self.norm(x), 2 * c)


class SwinStage(nn.Module):
    """A container (never called itself): ``downsample`` (stages >= 1) then ``blocks``."""

    def __init__(self, dim: int, depth: int, downsample: bool, shifts: Sequence[bool], drop_paths: Sequence[float],
                 arch: SwinArch, linear_backend: str, attn_backend: str):
        super().__init__()
        self.downsample = PatchMerging(dim // 2, linear_backend) if downsample else None
        self.blocks = nn.ModuleList(
            SwinBlock(dim, arch.head_dim, arch.window_size, shifts[j], arch.mlp_ratio, arch.qkv_bias, drop_paths[j],
                      linear_backend, attn_backend)
            for j in range(depth)
        )


class ElasticSwin(ElasticBackbone):
    family = "swin"

    def __init__(self, arch: SwinArch, drop_path_rate: float = 0.0, linear_backend: str = "torch",
                 attn_backend: str = "sdpa"):
        super().__init__()
        self.arch = arch
        C = arch.embed_dim
        self.embed_dim = C
        self.head_dim = arch.head_dim
        self.patch_size = arch.patch_size
        self.patch_embed = PatchEmbed(arch.patch_size, arch.in_chans, C)
        self.mask_token = nn.Parameter(torch.zeros(1, C))
        dpr = np.linspace(0, drop_path_rate, sum(arch.depths)).tolist()
        widths = arch.stage_widths()
        self.layers = nn.ModuleList()
        for s, depth in enumerate(arch.depths):
            start = sum(arch.depths[:s])
            self.layers.append(SwinStage(widths[s], depth, s > 0, arch.shifts(s), dpr[start:start + depth], arch,
                                         linear_backend, attn_backend))
        self.num_features = widths[-1]
        self.norm = ElasticLayerNorm(widths[-1])
        self.init_weights()

    def init_weights(self) -> None:
        if self.arch.init == "authors":  # PyTorch's defaults (set by the layers' constructors), zero tables
            for m in self.modules():
                if isinstance(m, WindowAttention):
                    nn.init.zeros_(m.relative_position_bias_table)
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    @property
    def depth(self) -> int:
        """Blocks of the elastic stage (stage 3)."""
        return self.arch.depths[ELASTIC_STAGE]

    def _mask(self, tokens: torch.Tensor, masks: torch.Tensor, width: int) -> torch.Tensor:
        """iBOT masks (B, G*G) on the mask grid, nearest-upsampled to the patch grid (authors' ``F.interpolate``
        by ``8 // ibot_scale_factor``); masked patches become the mask token."""
        B, H, W, _ = tokens.shape
        up = 8 // self.arch.ibot_scale_factor
        G = int(round(masks.shape[1] ** 0.5))
        if G * G != masks.shape[1] or G * up != H or G * up != W:
            raise ValueError(f"masks of {masks.shape[1]} patches do not upsample x{up} to the {H}x{W} patch grid")
        m = masks.view(B, G, G).repeat_interleave(up, 1).repeat_interleave(up, 2).unsqueeze(-1)
        return torch.where(m, self.mask_token[:, :width].to(tokens.dtype), tokens)

    def forward_features(
        self,
        x: torch.Tensor,
        masks: Optional[torch.Tensor] = None,
        width: Optional[int] = None,
        depth: Optional[int] = None,
    ) -> Dict[str, torch.Tensor]:
        """Backbone forward of the intact network or of the (width, stage-3 depth) sub-network.

        Returns ``x_norm_clstoken`` (B, 8w): the mean of the final-normed stage-4 tokens (authors; the
        heads and k-NN read it), and ``x_norm_patchtokens`` (B, G*G, 8w): the final-normed stage-4 tokens
        nearest-upsampled by ``ibot_scale_factor`` to the iBOT mask grid.
        """
        width = width or self.embed_dim
        depth = depth or self.depth
        if width % self.head_dim or not (0 < width <= self.embed_dim):
            raise ValueError(f"width {width} must be a multiple of {self.head_dim} in (0, {self.embed_dim}]")
        x = self.patch_embed(x, width)
        if masks is not None:
            x = self._mask(x, masks, width)
        for s, stage in enumerate(self.layers):
            if stage.downsample is not None:
                x = stage.downsample(x)
            n = len(stage.blocks)
            ids = block_ids(n, depth) if s == ELASTIC_STAGE else range(n)
            x = self.run_blocks(stage.blocks, ids, x)
        x = self.norm(x)  # (B, h, w, 8w)
        f = self.arch.ibot_scale_factor
        patches = x.repeat_interleave(f, 1).repeat_interleave(f, 2).flatten(1, 2) if f > 1 else x.flatten(1, 2)
        return {"x_norm_clstoken": x.mean(dim=(1, 2)), "x_norm_patchtokens": patches}


def build_swin(arch: SwinArch, drop_path_rate: float = 0.0, linear_backend: str = "torch",
               attn_backend: str = "sdpa") -> ElasticSwin:
    return ElasticSwin(arch, drop_path_rate, linear_backend, attn_backend)


# ---------------------------------------------------------------------------- cost
def count_params(arch: SwinArch) -> int:
    """Parameters of a dense Swin of this architecture (without the mask token), analytically."""
    widths = arch.stage_widths()
    p, table = arch.patch_size, (2 * arch.window_size - 1) ** 2
    total = arch.in_chans * p * p * widths[0] + widths[0] + 2 * widths[0]  # conv + its LayerNorm
    for s, (c, depth) in enumerate(zip(widths, arch.depths)):
        if s > 0:
            cin = widths[s - 1]
            total += 2 * 4 * cin + 4 * cin * c  # merge: norm over 4 cin, bias-free reduction
        h = int(c * arch.mlp_ratio)
        block = (2 * c + 3 * c * c + (3 * c if arch.qkv_bias else 0) + table * (c // arch.head_dim) + c * c + c
                 + 2 * c + c * h + h + h * c + c)
        total += depth * block
    return total + 2 * widths[-1]


def swin_gflops(arch: SwinArch, img_size: Optional[int] = None) -> float:
    """Multiply-accumulates (G) of one forward at ``img_size`` (fvcore/timm "GFLOPs"): patch embedding,
    qkv, attention scores and mixing, proj (on the map padded to whole windows, as computed), MLP and
    patch merges."""
    size = img_size or arch.img_size
    H = W = size // arch.patch_size
    widths = arch.stage_widths()
    total = H * W * arch.in_chans * arch.patch_size ** 2 * widths[0]
    for s in range(1, len(widths)):
        H, W = (H + 1) // 2, (W + 1) // 2
        total += H * W * 4 * widths[s - 1] * widths[s]
    return (total + sum(d * m for d, m in zip(arch.depths, _block_macs(arch, img_size)))) / 1e9


def swin_block_gflops(arch: SwinArch, img_size: Optional[int] = None) -> List[float]:
    """Per stage, multiply-accumulates (G) of one block's residual branches (window attention on the map
    padded to whole windows, MLP) at ``img_size``."""
    return [m / 1e9 for m in _block_macs(arch, img_size)]


def _block_macs(arch: SwinArch, img_size: Optional[int]) -> List[int]:
    H = W = (img_size or arch.img_size) // arch.patch_size
    ws = arch.window_size
    out = []
    for s, c in enumerate(arch.stage_widths()):
        if s > 0:
            H, W = (H + 1) // 2, (W + 1) // 2
        padded = math.ceil(H / ws) * ws * math.ceil(W / ws) * ws
        h = int(c * arch.mlp_ratio)
        out.append(padded * (4 * c * c + 2 * ws * ws * c) + H * W * 2 * c * h)
    return out
