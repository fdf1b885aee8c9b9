"""Elastic ViT (spec §1): 143 sub-networks from ViT-S (384x12) to ViT-L (1024x24)."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from poa_hpc.errors import ConfigError
from poa_hpc.kernels.sliced_linear import slice_rows
from poa_hpc.models.elastic import block_ids
from poa_hpc.models.registry import BackboneSpec, TimmExport, register_backbone
from poa_hpc.models.subnets import Subnet, SubnetSpace
from poa_hpc.models.vit.model import (
    ElasticViT,
    ViTArch,
    build_vit,
    count_params,
    resize_pos_embed,
    vit_block_gflops,
    vit_gflops,
)

__all__ = ["ElasticViT", "ViTArch", "build_vit", "count_params", "vit_gflops", "ViTSpec"]

_TOKENS = ("patch_embed", "cls_token", "pos_embed", "mask_token")


class ViTSpec(BackboneSpec):
    name = "vit"
    config_cls = ViTArch
    description = "elastic width (one head per step) and depth (equal-interval blocks)"
    recipe = "vit_l_poa.yaml"
    bench_presets = {
        # ViT-L/16 POA as the paper; ViT-B/16 as the same recipe one size down (elastic 384..768, depth 6..12).
        "vit_l": ("vit_l_poa.yaml", []),
        "vit_b": ("vit_l_poa.yaml", ["model.vit.embed_dim=768", "model.vit.depth=12", "model.vit.num_heads=12",
                                     "model.vit.min_depth=6"]),
        # CPU smoke size, to check the benchmark itself runs.
        "vit_tiny": ("vit_l_poa.yaml", [
            "model.vit.img_size=32", "model.vit.patch_size=8", "model.vit.embed_dim=64", "model.vit.depth=4",
            "model.vit.num_heads=4", "model.vit.min_width=32", "model.vit.width_step=16", "model.vit.min_depth=2",
            "head.prototypes=[64,128]", "head.hidden_dim=64", "head.bottleneck_dim=32", "data.global_size=32",
            "data.local_size=16"]),
    }

    def validate(self, a: ViTArch, cfg) -> None:
        k = "model.vit"
        if a.embed_dim % a.num_heads:
            raise ConfigError(f"key '{k}.embed_dim': {a.embed_dim} is not divisible by {k}.num_heads={a.num_heads}")
        hd = a.embed_dim // a.num_heads
        if a.width_step % hd or a.min_width % hd:
            raise ConfigError(f"key '{k}.min_width'/'width_step': {a.min_width}/{a.width_step} must be multiples "
                              f"of the head dim {hd}")
        if not (0 < a.min_width <= a.embed_dim) or (a.embed_dim - a.min_width) % a.width_step:
            raise ConfigError(f"key '{k}.min_width': {a.min_width} must be in (0, {a.embed_dim}] and reach "
                              f"{k}.embed_dim in steps of {a.width_step}")
        if not (1 <= a.min_depth <= a.depth):
            raise ConfigError(f"key '{k}.min_depth': {a.min_depth} must be in [1, {k}.depth={a.depth}]")
        for size_key in ("global_size", "local_size"):
            size = getattr(cfg.data, size_key)
            if size % a.patch_size:
                raise ConfigError(f"key 'data.{size_key}': {size} is not a multiple of {k}.patch_size={a.patch_size}")

    def build(self, arch: ViTArch, *, drop_path_rate: float, linear_backend: str = "torch",
              attn_backend: str = "sdpa") -> ElasticViT:
        return build_vit(arch, drop_path_rate, linear_backend, attn_backend)

    def space(self, a: ViTArch) -> SubnetSpace:
        return SubnetSpace(tuple(range(a.min_width, a.embed_dim + 1, a.width_step)),
                           tuple(range(a.min_depth, a.depth + 1)), a.sampling_s)

    def named_sizes(self, a: ViTArch) -> Dict[str, Subnet]:
        space = self.space(a)
        named = {"ViT-S": Subnet(384, 12), "ViT-B": Subnet(768, 12), "ViT-L": Subnet(1024, 24)}
        return {k: s for k, s in named.items() if s in space and a.head_dim == 64 and a.patch_size == 16}

    def feature_dim(self, a: ViTArch, width: int) -> int:
        return width

    def extract_tensors(self, sd: Dict[str, torch.Tensor], a: ViTArch, sub: Subnet) -> Tuple[ViTArch, Dict[str, torch.Tensor]]:
        """Slices of every tensor with the elastic input scale folded into each projection weight
        (``F.linear(s * x, W) == F.linear(x, s * W)``).  The final LayerNorm is kept (the authors'
        extractor drops it; spec §0)."""
        width, depth = sub.width, sub.depth
        dense = a.sub(width, depth)
        D = a.embed_dim
        H = int(D * a.mlp_ratio)
        h = int(round(width * a.mlp_ratio))
        a_in = D / width  # scale of projections whose input is the embedding
        a_hidden = H / h  # scale of fc2 (its input is the MLP hidden layer)
        out: Dict[str, torch.Tensor] = {
            "patch_embed.proj.weight": sd["patch_embed.proj.weight"][:width],
            "patch_embed.proj.bias": sd["patch_embed.proj.bias"][:width],
            "cls_token": sd["cls_token"][..., :width],
            "pos_embed": sd["pos_embed"][..., :width],
            "mask_token": sd["mask_token"][..., :width],
            "norm.weight": sd["norm.weight"][:width],
            "norm.bias": sd["norm.bias"][:width],
        }
        for new, old in enumerate(block_ids(a.depth, depth)):
            src, dst = f"blocks.{old}.", f"blocks.{new}."
            b = {k[len(src):]: v for k, v in sd.items() if k.startswith(src)}
            g = b.__getitem__
            blk = {
                "norm1.weight": g("norm1.weight")[:width],
                "norm1.bias": g("norm1.bias")[:width],
                "attn.qkv.weight": slice_rows(g("attn.qkv.weight"), width, 3)[:, :width] * a_in,
                "attn.proj.weight": g("attn.proj.weight")[:width, :width] * a_in,
                "attn.proj.bias": g("attn.proj.bias")[:width],
                "ls1.gamma": g("ls1.gamma")[:width],
                "norm2.weight": g("norm2.weight")[:width],
                "norm2.bias": g("norm2.bias")[:width],
                "mlp.fc1.weight": g("mlp.fc1.weight")[:h, :width] * a_in,
                "mlp.fc1.bias": g("mlp.fc1.bias")[:h],
                "mlp.fc2.weight": g("mlp.fc2.weight")[:width, :h] * a_hidden,
                "mlp.fc2.bias": g("mlp.fc2.bias")[:width],
                "ls2.gamma": g("ls2.gamma")[:width],
            }
            if "attn.qkv.bias" in b:
                blk["attn.qkv.bias"] = slice_rows(g("attn.qkv.bias"), width, 3)
            out.update({dst + k: v for k, v in blk.items()})
        return dense, out

    def timm_export(self, dense: ViTArch, state: Dict[str, torch.Tensor], img_size: Optional[int] = None):
        """timm's ``VisionTransformer`` with the same names (timm has no mask token); the named sizes
        map to timm's registered models, any other sub-network to ``vit_small_patch16_224`` with
        kwargs overriding its shape.

        timm resizes the position embedding itself (``dynamic_img_size``) with an antialiased bicubic
        to ``size=(g, g)``, not with the authors' ``scale_factor=(g + 0.1) / G``: at another input
        size its features would differ (17 % at 96 px).  So the embedding is exported already resized
        for ``img_size`` and timm's model is built for that size, where it resizes nothing."""
        size = img_size or dense.img_size
        if size % dense.patch_size:
            raise ValueError(f"img_size {size} is not a multiple of the patch size {dense.patch_size}")
        g = size // dense.patch_size
        out = {k: v for k, v in state.items() if k != "mask_token"}
        if size != dense.img_size:
            out["pos_embed"] = resize_pos_embed(state["pos_embed"], g, g, dense.interpolate_offset)
        kwargs = dict(
            img_size=size, patch_size=dense.patch_size, in_chans=dense.in_chans,
            embed_dim=dense.embed_dim, depth=dense.depth, num_heads=dense.num_heads, mlp_ratio=dense.mlp_ratio,
            qkv_bias=dense.qkv_bias, init_values=dense.layerscale_init, global_pool="token", class_token=True,
        )
        names = {(384, 12): "vit_small_patch16_224", (768, 12): "vit_base_patch16_224",
                 (1024, 24): "vit_large_patch16_224"}
        return TimmExport(names.get((dense.embed_dim, dense.depth), "vit_small_patch16_224"), kwargs, out)

    def params(self, a: ViTArch, sub: Optional[Subnet] = None) -> int:
        return count_params(a if sub is None else a.sub(sub.width, sub.depth))

    def gflops(self, a: ViTArch, sub: Optional[Subnet] = None, img_size: Optional[int] = None) -> float:
        return vit_gflops(a if sub is None else a.sub(sub.width, sub.depth), img_size)

    def residual_gflops(self, a: ViTArch, sub: Optional[Subnet] = None, img_size: Optional[int] = None):
        dense = a if sub is None else a.sub(sub.width, sub.depth)
        return [(vit_block_gflops(dense, img_size), a.drop_path_rate)] * dense.depth  # uniform rate

    def num_layers(self, a: ViTArch) -> int:
        return a.depth

    def layer_id(self, name: str, a: ViTArch) -> int:
        """DINOv2's rule: tokens and patch embedding 0, block i i + 1, the final norm depth + 1."""
        top = name.split(".", 1)[0]
        if top in _TOKENS:
            return 0
        if top == "blocks":
            i = int(name.split(".")[1])
            if not (0 <= i < a.depth):
                raise ValueError(f"parameter {name!r} is in block {i} but the ViT has {a.depth} blocks")
            return i + 1
        return a.depth + 1

    def no_weight_decay(self, name: str) -> bool:
        """LayerNorms and LayerScales (DINOv2: names containing ``norm`` or ``gamma``); [CLS], position
        embedding and mask token keep weight decay as in DINOv2."""
        return "norm" in name or "gamma" in name

    def sharding_units(self, backbone: ElasticViT) -> List[str]:
        return [f"blocks.{i}" for i in range(len(backbone.blocks))]

    def mask_grid(self, a: ViTArch, img_size: int) -> int:
        return img_size // a.patch_size


register_backbone(ViTSpec())
