"""Elastic Swin Transformer (spec §4): 39 sub-networks from Swin-T (96, 6) to Swin-B (128, 18).

Widths 96, 112, 128 (stage-1 channels, doubled per stage), stage-3 depths 6..18, eq. 14 with
s = 2: a pool of 89 entries with the intact pair (88 without), as the authors'
``create_dynamic_networks``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from poa_hpc.errors import ConfigError
from poa_hpc.kernels.sliced_linear import slice_cols, slice_rows
from poa_hpc.models.elastic import block_ids
from poa_hpc.models.registry import BackboneSpec, TimmExport, register_backbone
from poa_hpc.models.subnets import Subnet, SubnetSpace
from poa_hpc.models.swin.model import (
    ELASTIC_STAGE,
    ElasticSwin,
    SwinArch,
    build_swin,
    count_params,
    swin_block_gflops,
    swin_gflops,
)

__all__ = ["ElasticSwin", "SwinArch", "build_swin", "count_params", "swin_gflops", "SwinSpec"]

_TIMM_NAMES = {(96, (2, 2, 6, 2)): "swin_tiny_patch4_window7_224", (96, (2, 2, 18, 2)): "swin_small_patch4_window7_224",
               (128, (2, 2, 18, 2)): "swin_base_patch4_window7_224"}


class SwinSpec(BackboneSpec):
    name = "swin"
    config_cls = SwinArch
    description = "elastic stage widths (one 16-dim head per step) and stage-3 depth (equal-interval blocks)"
    recipe = "swin_poa.yaml"
    bench_presets = {
        # Swin-B-sized POA as the authors' swin_ee1200 recipe (39 sub-networks, Swin-T .. Swin-B).
        "swin_b": ("swin_poa.yaml", []),
        # CPU smoke size, to check the benchmark itself runs.
        "swin_tiny": ("swin_poa.yaml", [
            "model.swin.img_size=32", "model.swin.patch_size=2", "model.swin.embed_dim=16",
            "model.swin.depths=[1,1,2,1]", "model.swin.head_dim=4", "model.swin.window_size=2",
            "model.swin.min_width=8", "model.swin.width_step=4", "model.swin.min_depth=1",
            "head.prototypes=[64,128]", "head.hidden_dim=64", "head.bottleneck_dim=32", "data.global_size=32",
            "data.local_size=16"]),
    }

    # ------------------------------------------------------------------ config
    def validate(self, a: SwinArch, cfg) -> None:
        k = "model.swin"
        if a.init not in ("timm", "authors"):
            raise ConfigError(f"key '{k}.init': {a.init!r} must be timm or authors")
        if len(a.depths) != 4 or any(d < 1 for d in a.depths):
            raise ConfigError(f"key '{k}.depths': {a.depths} must be 4 positive block counts (stage 3 is elastic)")
        for key in ("patch_size", "in_chans", "window_size", "head_dim", "embed_dim", "width_step"):
            if getattr(a, key) < 1:
                raise ConfigError(f"key '{k}.{key}': {getattr(a, key)} must be >= 1")
        if a.mlp_ratio <= 0:
            raise ConfigError(f"key '{k}.mlp_ratio': {a.mlp_ratio} must be > 0")
        if a.embed_dim % a.head_dim or a.min_width % a.head_dim or a.width_step % a.head_dim:
            raise ConfigError(f"key '{k}.min_width'/'width_step'/'embed_dim': {a.min_width}/{a.width_step}/"
                              f"{a.embed_dim} must be multiples of {k}.head_dim={a.head_dim}")
        if not (0 < a.min_width <= a.embed_dim) or (a.embed_dim - a.min_width) % a.width_step:
            raise ConfigError(f"key '{k}.min_width': {a.min_width} must be in (0, {a.embed_dim}] and reach "
                              f"{k}.embed_dim in steps of {a.width_step}")
        if not (1 <= a.min_depth <= a.depths[ELASTIC_STAGE]):
            raise ConfigError(f"key '{k}.min_depth': {a.min_depth} must be in [1, {k}.depths[2]="
                              f"{a.depths[ELASTIC_STAGE]}]")
        if a.ibot_scale_factor not in (1, 2, 4):
            raise ConfigError(f"key '{k}.ibot_scale_factor': {a.ibot_scale_factor}, expected 1, 2 or 4")
        if not (0.0 <= a.drop_path_rate < 1.0):
            raise ConfigError(f"key '{k}.drop_path_rate': {a.drop_path_rate} must be in [0, 1)")
        if a.sampling_s < 1.0:
            raise ConfigError(f"key '{k}.sampling_s': {a.sampling_s} must be >= 1 (eq. 14)")
        if a.stage3_shift is not None and len(a.stage3_shift) != a.depths[ELASTIC_STAGE]:
            raise ConfigError(f"key '{k}.stage3_shift': {len(a.stage3_shift)} flags for "
                              f"{k}.depths[2]={a.depths[ELASTIC_STAGE]} blocks")
        # Global crops: whole stage-4 tokens, and a mask grid that upsamples to the patch grid.
        unit = a.patch_size * 8
        if cfg.data.global_size % unit:
            raise ConfigError(f"key 'data.global_size': {cfg.data.global_size} is not a multiple of "
                              f"8 * {k}.patch_size={unit} (the iBOT grid and stage 4)")
        if cfg.data.local_size % a.patch_size:
            raise ConfigError(f"key 'data.local_size': {cfg.data.local_size} is not a multiple of "
                              f"{k}.patch_size={a.patch_size}")

    # ------------------------------------------------------------------ model
    def build(self, arch: SwinArch, *, drop_path_rate: float, linear_backend: str = "torch",
              attn_backend: str = "sdpa") -> ElasticSwin:
        return build_swin(arch, drop_path_rate, linear_backend, attn_backend)

    def space(self, a: SwinArch) -> SubnetSpace:
        return SubnetSpace(tuple(range(a.min_width, a.embed_dim + 1, a.width_step)),
                           tuple(range(a.min_depth, a.depths[ELASTIC_STAGE] + 1)), a.sampling_s)

    def named_sizes(self, a: SwinArch) -> Dict[str, Subnet]:
        """Swin-T/S/B (the authors' tiny/small/base, with their head dim) where the space holds them."""
        if (a.patch_size, a.window_size, a.mlp_ratio) != (4, 7, 4.0) or [a.depths[i] for i in (0, 1, 3)] != [2, 2, 2]:
            return {}
        space = self.space(a)
        named = {"Swin-T": Subnet(96, 6), "Swin-S": Subnet(96, 18), "Swin-B": Subnet(128, 18)}
        return {k: s for k, s in named.items() if s in space}

    def feature_dim(self, a: SwinArch, width: int) -> int:
        return width * 2 ** (len(a.depths) - 1)

    # ------------------------------------------------------------------ extraction
    def extract_tensors(self, sd: Dict[str, torch.Tensor], a: SwinArch, sub: Subnet) -> Tuple[SwinArch, Dict[str, torch.Tensor]]:
        """Slices of every tensor with the elastic input scale folded into each projection weight
        (``F.linear(s * x, W) == F.linear(x, s * W)``).  Unlike the authors' extractor, the patch-embed
        LayerNorm here is the one the elastic forward uses (see ``model.py``); the final LayerNorm is kept."""
        width, depth = sub.width, sub.depth
        dense = a.sub(width, depth)
        maxw, subw = a.stage_widths(), a.stage_widths(width)
        out: Dict[str, torch.Tensor] = {
            "patch_embed.proj.weight": sd["patch_embed.proj.weight"][:width],
            "patch_embed.proj.bias": sd["patch_embed.proj.bias"][:width],
            "patch_embed.norm.weight": sd["patch_embed.norm.weight"][:width],
            "patch_embed.norm.bias": sd["patch_embed.norm.bias"][:width],
            "mask_token": sd["mask_token"][..., :width],
            "norm.weight": sd["norm.weight"][:subw[-1]],
            "norm.bias": sd["norm.bias"][:subw[-1]],
        }
        for s, n in enumerate(a.depths):
            C, c = maxw[s], subw[s]
            H, h = int(C * a.mlp_ratio), int(round(c * a.mlp_ratio))
            heads = c // a.head_dim
            pre = f"layers.{s}."
            if s > 0:  # the merge into stage s: 4 groups of the previous stage's channels
                Cin, cin = maxw[s - 1], subw[s - 1]
                out[pre + "downsample.norm.weight"] = slice_cols(sd[pre + "downsample.norm.weight"], 4 * cin, 4)
                out[pre + "downsample.norm.bias"] = slice_cols(sd[pre + "downsample.norm.bias"], 4 * cin, 4)
                out[pre + "downsample.reduction.weight"] = slice_cols(
                    sd[pre + "downsample.reduction.weight"][:2 * cin], 4 * cin, 4) * (Cin / cin)
            ids = block_ids(n, depth) if s == ELASTIC_STAGE else range(n)
            for new, old in enumerate(ids):
                src, dst = f"{pre}blocks.{old}.", f"{pre}blocks.{new}."
                g = lambda name: sd[src + name]  # noqa: E731
                blk = {
                    "norm1.weight": g("norm1.weight")[:c],
                    "norm1.bias": g("norm1.bias")[:c],
                    "attn.relative_position_bias_table": g("attn.relative_position_bias_table")[:, :heads],
                    "attn.qkv.weight": slice_rows(g("attn.qkv.weight"), c, 3)[:, :c] * (C / c),
                    "attn.proj.weight": g("attn.proj.weight")[:c, :c] * (C / c),
                    "attn.proj.bias": g("attn.proj.bias")[:c],
                    "norm2.weight": g("norm2.weight")[:c],
                    "norm2.bias": g("norm2.bias")[:c],
                    "mlp.fc1.weight": g("mlp.fc1.weight")[:h, :c] * (C / c),
                    "mlp.fc1.bias": g("mlp.fc1.bias")[:h],
                    "mlp.fc2.weight": g("mlp.fc2.weight")[:c, :h] * (H / h),
                    "mlp.fc2.bias": g("mlp.fc2.bias")[:c],
                }
                if src + "attn.qkv.bias" in sd:
                    blk["attn.qkv.bias"] = slice_rows(g("attn.qkv.bias"), c, 3)
                out.update({dst + k: v for k, v in blk.items()})
        return dense, out

    def timm_export(self, dense: SwinArch, state: Dict[str, torch.Tensor], img_size: Optional[int] = None):
        """timm's ``SwinTransformer`` with the same names (timm has no mask token).

        The named sizes map to timm's ``swin_tiny/small/base_patch4_window7_224``, whose ``embed_dim`` and
        ``depths`` they match; ``num_heads`` is always passed, since head_dim 16 doubles timm's head
        counts (Swin-T: 6, 12, 24, 48 instead of 3, 6, 12, 24).  Other sub-networks use the tiny entry with
        kwargs overriding its shape.  ``always_partition=True`` keeps full windows and shifts on maps not
        larger than a window, ``strict_img_size=False`` builds the shift masks per input size (both as this
        model).  A sub-network's blocks keep their own shift flags (Swin-T: blocks 0, 3, 6, 10, 13, 17 of
        stage 3 shift F T F F T T), which timm's alternation cannot express: every block's ``shift_size``
        is an attribute set after ``create_model``.  timm pads maps that are not whole windows after the
        shift, this model (as the authors) before it, so sizes whose stage maps are not whole windows
        (96 px local crops) are refused rather than exported with different features."""
        size = img_size or dense.img_size
        maps = [size // dense.patch_size // 2 ** s for s in range(len(dense.depths))]
        if size % (dense.patch_size * 2 ** (len(dense.depths) - 1)) or any(m % dense.window_size for m in maps):
            raise ValueError(f"a Swin exported for {size} px inputs would differ in timm: its stage maps {maps} are "
                             f"not whole windows of {dense.window_size} and timm pads after the window shift, "
                             f"poa_hpc (as the authors) before; export for a size such as {dense.img_size}")
        heads = [c // dense.head_dim for c in dense.stage_widths()]
        kwargs = dict(
            img_size=size, patch_size=dense.patch_size, in_chans=dense.in_chans,
            embed_dim=dense.embed_dim, depths=tuple(dense.depths), num_heads=tuple(heads),
            window_size=dense.window_size, mlp_ratio=dense.mlp_ratio, qkv_bias=dense.qkv_bias,
            always_partition=True, strict_img_size=False, global_pool="avg",
        )
        shift = dense.window_size // 2
        attributes = {f"layers.{s}.blocks.{j}.shift_size": [shift, shift] if flag else [0, 0]
                      for s in range(len(dense.depths)) for j, flag in enumerate(dense.shifts(s))}
        name = _TIMM_NAMES.get((dense.embed_dim, tuple(dense.depths)), "swin_tiny_patch4_window7_224")
        return TimmExport(name, kwargs, {k: v for k, v in state.items() if k != "mask_token"}, attributes)

    # ------------------------------------------------------------------ cost
    def params(self, a: SwinArch, sub: Optional[Subnet] = None) -> int:
        return count_params(a if sub is None else a.sub(sub.width, sub.depth))

    def gflops(self, a: SwinArch, sub: Optional[Subnet] = None, img_size: Optional[int] = None) -> float:
        return swin_gflops(a if sub is None else a.sub(sub.width, sub.depth), img_size)

    def residual_gflops(self, a: SwinArch, sub: Optional[Subnet] = None, img_size: Optional[int] = None):
        """Rates linspace(0, rate, sum(depths)) over the intact blocks; a shallower stage 3 keeps its blocks'."""
        dense = a if sub is None else a.sub(sub.width, sub.depth)
        dpr = np.linspace(0, a.drop_path_rate, sum(a.depths)).tolist()
        out = []
        for s, g in enumerate(swin_block_gflops(dense, img_size)):
            start = sum(a.depths[:s])
            ids = block_ids(a.depths[s], dense.depths[s]) if s == ELASTIC_STAGE else range(a.depths[s])
            out += [(g, dpr[start + i]) for i in ids]
        return out

    # ------------------------------------------------------------------ optimizer
    def num_layers(self, a: SwinArch) -> int:
        return sum(a.depths)

    def layer_id(self, name: str, a: SwinArch) -> int:
        """The authors' ``get_swin_lr_decay_rate`` with num_layers = sum(depths): patch embedding and mask
        token 0; block j of stage s sum(depths[:s]) + j + 1; the merge that starts stage s (the authors':
        the one ending stage s - 1) sum(depths[:s]) + 1; final norm sum(depths) + 1."""
        top = name.split(".", 1)[0]
        if top in ("patch_embed", "mask_token"):
            return 0
        if top == "layers":
            parts = name.split(".")
            s = int(parts[1])
            if not (0 <= s < len(a.depths)):
                raise ValueError(f"parameter {name!r} is in stage {s} but the Swin has {len(a.depths)} stages")
            start = sum(a.depths[:s])
            if parts[2] == "downsample":
                return start + 1
            j = int(parts[3])
            if not (0 <= j < a.depths[s]):
                raise ValueError(f"parameter {name!r} is in block {j} but stage {s} has {a.depths[s]} blocks")
            return start + j + 1
        return sum(a.depths) + 1

    def no_weight_decay(self, name: str) -> bool:
        """LayerNorms (names containing ``norm``; biases never get decay).  The relative position bias
        tables and the mask token keep weight decay, as in the authors' code (timm would exempt the
        tables)."""
        return "norm" in name

    # ------------------------------------------------------------------ distribution, data
    def sharding_units(self, backbone: ElasticSwin) -> List[str]:
        """Every block of every stage and every patch merge.  The merges are units too: the one into
        stage 4 alone holds 2.1M parameters at Swin-B width, which would otherwise stay gathered in the
        root for the whole forward; the root keeps patch embedding, mask token and final norm (~10K)."""
        units = []
        for s, stage in enumerate(backbone.layers):
            if stage.downsample is not None:
                units.append(f"layers.{s}.downsample")
            units += [f"layers.{s}.blocks.{j}" for j in range(len(stage.blocks))]
        return units

    def mask_grid(self, a: SwinArch, img_size: int) -> int:
        """img / patch / 8 * ibot_scale_factor (14 at 224 px, the authors' ``num_patch``)."""
        return img_size // a.patch_size // 8 * a.ibot_scale_factor


register_backbone(SwinSpec())
