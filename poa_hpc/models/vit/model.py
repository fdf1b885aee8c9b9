"""Elastic Vision Transformer.

One set of parameters, sized for the intact network, runs at full width and
depth or as any elastic sub-network (width ``w``, depth ``d``):

* every projection keeps the leading block of its weight (the qkv projection
  keeps the first ``w / head_dim`` heads of each of q, k, v) and scales its
  input by ``max_in / in`` (spec §0);
* LayerNorm, LayerScale, patch embedding, [CLS], mask token and position
  embedding keep their first ``w`` channels;
* depth ``d`` keeps the blocks ``floor(linspace(0, L - 1, d))``.

The elastic forward calls the same ``nn.Module`` instances as the intact one
(widths are passed as arguments, never by reaching into ``.weight`` from
outside), so sharding wrappers' pre-forward hooks fire for both branches.
Parameter names follow timm's ``VisionTransformer`` so extracted sub-networks
load into timm directly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from poa_hpc.models.elastic import (
    DropPath,
    ElasticBackbone,
    ElasticLayerNorm,
    ElasticLinear,
    ElasticMlp,
    LayerScale,
    block_ids,
)
from poa_hpc.models.ops import attention


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor, width: Optional[int] = None) -> torch.Tensor:
        p = self.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
        # The conv runs as a module call at full width and the first ``width`` channels are kept
        # (the authors' code does the same): wrappers that gather a module's parameters in its
        # pre-forward hook (ZeRO-3) see the weight whole; the conv is a small share of the FLOPs.
        x = self.proj(x)
        if width is not None and width < x.shape[1]:
            x = x[:, :width]
        return x.flatten(2).transpose(1, 2)  # (B, N, w)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, linear_backend: str, attn_backend: str):
        super().__init__()
        self.head_dim = dim // num_heads
        self.qkv = ElasticLinear(dim, dim, bias=qkv_bias, groups=3, backend=linear_backend)
        self.proj = ElasticLinear(dim, dim, backend=linear_backend)
        self.attn_backend = attn_backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, w = x.shape
        heads = w // self.head_dim
        qkv = self.qkv(x, w).reshape(B, N, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2], self.attn_backend)
        return self.proj(out.transpose(1, 2).reshape(B, N, w), w)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, init_values: float,
                 drop_path: float, linear_backend: str, attn_backend: str):
        super().__init__()
        self.norm1 = ElasticLayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, linear_backend, attn_backend)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = ElasticLayerNorm(dim, eps=1e-6)
        self.mlp = ElasticMlp(dim, int(dim * mlp_ratio), linear_backend)
        self.ls2 = LayerScale(dim, init_values)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop_path.add(x, lambda t: self.ls1(self.attn(self.norm1(t))))
        return self.drop_path.add(x, lambda t: self.ls2(self.mlp(self.norm2(t))))


@dataclass
class ViTArch:
    """The ``model.vit`` config section: the intact ViT and its elastic space.

    A dense extracted sub-network is described by the same class (see :meth:`sub`):
    its space holds one sub-network, itself.
    """

    img_size: int = 224  # size the position embedding is built for
    patch_size: int = 16  # patch side (px)
    in_chans: int = 3  # input channels
    embed_dim: int = 1024  # width of the intact network
    depth: int = 24  # blocks of the intact network
    num_heads: int = 16  # attention heads of the intact network
    mlp_ratio: float = 4.0  # MLP hidden width / width
    qkv_bias: bool = True  # bias in the qkv projection
    layerscale_init: float = 1e-5  # initial LayerScale (DINOv2: 1e-5)
    # Position embedding at another input size (local crops, evaluation at other resolutions): the
    # patch grid G x G is resized bicubically with scale_factor (g + offset) / G, as the authors and
    # DINOv2 (interpolate_offset 0.1, no antialias); 0 resizes to size (g, g) instead.
    interpolate_offset: float = 0.1
    drop_path_rate: float = 0.2  # uniform over blocks (the authors' ViT-L drop_path_uniform)
    # Elastic space (spec §1): widths min_width, min_width + width_step, ..., embed_dim (one head
    # per step); depths min_depth..depth; eq. 14 sampling with s = sampling_s.
    min_width: int = 384  # narrowest elastic width
    width_step: int = 64  # width step (one head per step)
    min_depth: int = 12  # shallowest elastic depth
    sampling_s: float = 3.0  # s of the eq. 14 sub-network sampling

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def sub(self, width: int, depth: int) -> ViTArch:
        """The dense architecture of the (width, depth) sub-network."""
        if width % self.head_dim:
            raise ValueError(f"width {width} is not a multiple of the head dim {self.head_dim}")
        return replace(self, embed_dim=width, depth=depth, num_heads=width // self.head_dim, min_width=width,
                       min_depth=depth)


class ElasticViT(ElasticBackbone):
    family = "vit"

    def __init__(self, arch: ViTArch, drop_path_rate: float = 0.0, linear_backend: str = "torch", attn_backend: str = "sdpa"):
        super().__init__()
        self.arch = arch
        D = arch.embed_dim
        self.embed_dim = D
        self.head_dim = arch.head_dim
        self.patch_size = arch.patch_size
        self.patch_embed = PatchEmbed(arch.patch_size, arch.in_chans, D)
        grid = arch.img_size // arch.patch_size
        self.grid = grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, D))
        self.mask_token = nn.Parameter(torch.zeros(1, D))
        # Uniform stochastic depth as the authors' ViT-L config (drop_path_uniform).
        self.blocks = nn.ModuleList(
            Block(D, arch.num_heads, arch.mlp_ratio, arch.qkv_bias, arch.layerscale_init, drop_path_rate,
                  linear_backend, attn_backend)
            for _ in range(arch.depth)
        )
        self.norm = ElasticLayerNorm(D, eps=1e-6)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def _pos_embed(self, h: int, w: int, width: int) -> torch.Tensor:
        pos = self.pos_embed[..., :width]
        if h == self.grid and w == self.grid:
            return pos
        return resize_pos_embed(pos, h, w, self.arch.interpolate_offset)

    def forward_features(
        self,
        x: torch.Tensor,
        masks: Optional[torch.Tensor] = None,
        width: Optional[int] = None,
        depth: Optional[int] = None,
    ) -> Dict[str, torch.Tensor]:
        """Backbone forward of the intact network or of the (width, depth) sub-network.

        Args:
            x: (B, C, H, W) images.
            masks: optional (B, N) bool; masked patches are replaced by the mask token (iBOT).
        Returns:
            dict with ``x_norm_clstoken`` (B, w) and ``x_norm_patchtokens`` (B, N, w).
        """
        width = width or self.embed_dim
        depth = depth or self.depth
        if width % self.head_dim or not (0 < width <= self.embed_dim):
            raise ValueError(f"width {width} must be a multiple of {self.head_dim} in (0, {self.embed_dim}]")
        B, _, H, W = x.shape
        tokens = self.patch_embed(x, width)
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token[:, :width].to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat([self.cls_token[..., :width].expand(B, -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + self._pos_embed(H // self.patch_size, W // self.patch_size, width).to(tokens.dtype)
        tokens = self.run_blocks(self.blocks, block_ids(self.depth, depth), tokens)
        tokens = self.norm(tokens)
        return {"x_norm_clstoken": tokens[:, 0], "x_norm_patchtokens": tokens[:, 1:]}


def resize_pos_embed(pos: torch.Tensor, h: int, w: int, offset: float) -> torch.Tensor:
    """The (1, 1 + G*G, C) position embedding for an h x w patch grid: the [CLS] entry as is, the
    patch grid resized bicubically in float32 (no antialias) with ``scale_factor = (h + offset) / G``
    as the authors and DINOv2 (``interpolate_offset``), or to ``size=(h, w)`` when ``offset`` is 0."""
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    width = pos.shape[-1]
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    patch_pos = patch_pos.reshape(1, grid, grid, width).permute(0, 3, 1, 2).float()
    if offset:
        patch_pos = F.interpolate(patch_pos, scale_factor=((h + offset) / grid, (w + offset) / grid), mode="bicubic",
                                  align_corners=False)
    else:
        patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", align_corners=False)
    if patch_pos.shape[-2:] != (h, w):
        raise ValueError(f"position embedding resized to {tuple(patch_pos.shape[-2:])}, expected {(h, w)} "
                         f"(interpolate_offset {offset})")
    patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, width)
    return torch.cat([cls_pos, patch_pos], dim=1)


def build_vit(arch: ViTArch, drop_path_rate: float = 0.0, linear_backend: str = "torch", attn_backend: str = "sdpa") -> ElasticViT:
    return ElasticViT(arch, drop_path_rate, linear_backend, attn_backend)


def count_params(arch: ViTArch) -> int:
    """Parameters of a dense ViT of this architecture (without the mask token), analytically."""
    D, L, p, C = arch.embed_dim, arch.depth, arch.patch_size, arch.in_chans
    hidden = int(D * arch.mlp_ratio)
    n_tok = 1 + (arch.img_size // p) ** 2
    embed = C * p * p * D + D + D + n_tok * D
    block = (3 * D * D + (3 * D if arch.qkv_bias else 0)) + (D * D + D) + (D * hidden + hidden) + (hidden * D + D) + 4 * D + 2 * D
    return embed + L * block + 2 * D


def vit_gflops(arch: ViTArch, img_size: Optional[int] = None) -> float:
    """Multiply-accumulates (G) of one forward at ``img_size``, counted as fvcore/DeiT report "GFLOPs".

    Counts the matmuls: patch embedding, qkv, attention scores and mixing, proj, MLP.
    """
    s = img_size or arch.img_size
    N = 1 + (s // arch.patch_size) ** 2
    D = arch.embed_dim
    patch = (N - 1) * arch.in_chans * arch.patch_size ** 2 * D
    return (patch + arch.depth * _block_macs(arch, img_size)) / 1e9


def _block_macs(arch: ViTArch, img_size: Optional[int]) -> int:
    N = 1 + ((img_size or arch.img_size) // arch.patch_size) ** 2
    D, hidden = arch.embed_dim, int(arch.embed_dim * arch.mlp_ratio)
    return N * 3 * D * D + 2 * N * N * D + N * D * D + 2 * N * D * hidden


def vit_block_gflops(arch: ViTArch, img_size: Optional[int] = None) -> float:
    """Multiply-accumulates (G) of one block's residual branches (attention, MLP) at ``img_size``."""
    return _block_macs(arch, img_size) / 1e9
