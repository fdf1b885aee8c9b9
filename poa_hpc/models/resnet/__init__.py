"""Elastic ResNet (spec §4): 3 bottleneck widths x 155 depth tuples = 465 sub-networks, ResNet-50 to a
2x wide ResNet-152."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from poa_hpc.errors import ConfigError
from poa_hpc.models.elastic import block_ids
from poa_hpc.models.registry import BackboneSpec, TimmExport, register_backbone
from poa_hpc.models.resnet.model import (
    IBOT_SCALE_FACTORS,
    STRIDES,
    Bottleneck,
    ElasticResNet,
    ResNetArch,
    build_resnet,
    count_params,
    resnet_block_gflops,
    resnet_gflops,
)
from poa_hpc.models.subnets import Subnet, SubnetSpace

__all__ = ["ElasticResNet", "ResNetArch", "Bottleneck", "build_resnet", "count_params", "resnet_gflops", "ResNetSpec"]

_STEM = ("conv1", "bn1", "mask_token")
_TINY = [
    "model.resnet.img_size=32", "model.resnet.stem_channels=16", "model.resnet.base_channels=16",
    "model.resnet.depths=[2,3,4,2]", "model.resnet.min_depths=[2,2,2,2]", "model.resnet.widths=[8,16]",
    "model.resnet.gn_groups=4", "model.resnet.ibot_scale_factor=4", "head.prototypes=[64,128]", "head.hidden_dim=64",
    "head.bottleneck_dim=32", "data.global_size=32", "data.local_size=16",
]


class ResNetSpec(BackboneSpec):
    name = "resnet"
    config_cls = ResNetArch
    description = "elastic bottleneck mid channels (zipped over stages) and per-stage depth (equal-interval blocks)"
    recipe = "resnet_poa.yaml"  # the paper's run (packaged config)
    bench_presets = {
        # The paper's run: 2x wide ResNet-152 intact, ResNet-50 smallest.
        "resnet_152w": ("resnet_poa.yaml", []),
        # CPU smoke size, to check the benchmark itself runs.
        "resnet_tiny": ("resnet_poa.yaml", _TINY),
    }

    def validate(self, a: ResNetArch, cfg) -> None:
        k = "model.resnet"
        n = len(STRIDES)
        for key in ("in_chans", "stem_channels", "base_channels", "gn_groups"):
            if getattr(a, key) <= 0:
                raise ConfigError(f"key '{k}.{key}': {getattr(a, key)} must be positive")
        if len(a.depths) != n or any(d < 1 for d in a.depths):
            raise ConfigError(f"key '{k}.depths': {a.depths} must be {n} positive block counts (one per stage)")
        if len(a.min_depths) != n or any(not (1 <= lo <= hi) for lo, hi in zip(a.min_depths, a.depths)):
            raise ConfigError(f"key '{k}.min_depths': {a.min_depths} must be {n} counts with 1 <= min_depths[i] "
                              f"<= {k}.depths[i] = {a.depths}")
        if not a.widths or any(w <= 0 for w in a.widths) or list(a.widths) != sorted(set(a.widths)):
            raise ConfigError(f"key '{k}.widths': {a.widths} must be increasing positive stage-1 mid channel counts")
        g = a.gn_groups
        bad = [w for w in a.widths if w % g]
        if bad:
            raise ConfigError(f"key '{k}.widths': {bad} not divisible by {k}.gn_groups={g} (GroupNorm over the mid "
                              f"channels)")
        if a.stem_channels % g or (4 * a.base_channels) % g:
            raise ConfigError(f"key '{k}.gn_groups': {g} must divide {k}.stem_channels={a.stem_channels} and the "
                              f"block outputs 4 * {k}.base_channels = {4 * a.base_channels}")
        if a.ibot_scale_factor not in IBOT_SCALE_FACTORS:
            raise ConfigError(f"key '{k}.ibot_scale_factor': {a.ibot_scale_factor}, expected one of "
                              f"{list(IBOT_SCALE_FACTORS)}")
        if not (0.0 <= a.drop_path_rate < 1.0):
            raise ConfigError(f"key '{k}.drop_path_rate': {a.drop_path_rate} must be in [0, 1)")
        if a.sampling_s < 1.0:
            raise ConfigError(f"key '{k}.sampling_s': {a.sampling_s} must be >= 1 (1: uniform)")
        if cfg is not None and cfg.data.global_size % 32:
            raise ConfigError(f"key 'data.global_size': {cfg.data.global_size} is not a multiple of 32, the ResNet's "
                              f"total stride (the iBOT mask grid must tile the stem and final maps)")

    def build(self, arch: ResNetArch, *, drop_path_rate: float, linear_backend: str = "torch",
              attn_backend: str = "sdpa") -> ElasticResNet:
        # The convolutions go through ``elastic_conv2d`` (torch reference only for now); the sliced-projection
        # backend (model.elastic_linear) applies to the heads, not to the convolutions.
        return build_resnet(arch, drop_path_rate)

    def space(self, a: ResNetArch) -> SubnetSpace:
        """Widths x depth tuples sorted by total depth; eq. 14 as the authors' ``create_dynamic_networks``:
        every depth tuple gets ``round(linspace(s, 1, #tuples))`` copies, every width the same (scale 1)."""
        depths = tuple(a.depth_tuples())
        return SubnetSpace(tuple(a.widths), depths, a.sampling_s, width_scales=(1.0,) * len(a.widths),
                           depth_scales=tuple(float(v) for v in np.linspace(a.sampling_s, 1, len(depths))))

    def named_sizes(self, a: ResNetArch) -> Dict[str, Subnet]:
        """ResNet-50/101/152 as the authors' ``get_by_type``: stage mids [64, 128, 256, 512] (the narrowest
        width, bottleneck = output / 4) at depths [3, 4, 6, 3], [3, 4, 23, 3], [3, 8, 36, 3]."""
        if (a.stem_channels, a.base_channels, a.gn_groups, a.in_chans) != (64, 64, 32, 3):
            return {}
        space = self.space(a)
        named = {"R50": Subnet(64, (3, 4, 6, 3)), "R101": Subnet(64, (3, 4, 23, 3)), "R152": Subnet(64, (3, 8, 36, 3))}
        return {k: s for k, s in named.items() if s in space}

    def feature_dim(self, a: ResNetArch, width: int) -> int:
        return a.out_channels(len(a.depths) - 1)

    def extract_tensors(self, sd: Dict[str, torch.Tensor], a: ResNetArch, sub: Subnet) -> Tuple[ResNetArch, Dict[str, torch.Tensor]]:
        """Slices of the bottleneck tensors with the elastic input scale folded into conv2 and conv3
        (``conv(s * x, W) == conv(x, s * W)``); stem, mask token, bn3 and the downsample are whole."""
        width, depth = sub.width, tuple(sub.depth)
        dense = a.sub(width, depth)
        alpha = a.max_width / width
        out = {k: sd[k] for k in ("conv1.weight", "bn1.weight", "bn1.bias", "mask_token")}
        for s, (L, d) in enumerate(zip(a.depths, depth)):
            mid = width * 2 ** s
            for new, old in enumerate(block_ids(L, d)):
                src, dst = f"layer{s + 1}.{old}.", f"layer{s + 1}.{new}."
                g = {k[len(src):]: v for k, v in sd.items() if k.startswith(src)}
                blk = {
                    "conv1.weight": g["conv1.weight"][:mid],
                    "bn1.weight": g["bn1.weight"][:mid], "bn1.bias": g["bn1.bias"][:mid],
                    "conv2.weight": g["conv2.weight"][:mid, :mid] * alpha,
                    "bn2.weight": g["bn2.weight"][:mid], "bn2.bias": g["bn2.bias"][:mid],
                    "conv3.weight": g["conv3.weight"][:, :mid] * alpha,
                    "bn3.weight": g["bn3.weight"], "bn3.bias": g["bn3.bias"],
                }
                blk.update({k: v for k, v in g.items() if k.startswith("downsample.")})
                out.update({dst + k: v for k, v in blk.items()})
        return dense, out

    def build_dense(self, dense_arch: ResNetArch, attn_backend: str = "sdpa") -> ElasticResNet:
        return build_resnet(dense_arch)

    def timm_export(self, dense: ResNetArch, state: Dict[str, torch.Tensor], img_size: Optional[int] = None):
        """timm's ``ResNet`` (Bottleneck blocks) with ``norm_layer`` = timm's GroupNorm of ``gn_groups`` groups,
        ``layers`` = the depths, ``channels`` = the block outputs / 4 and ``base_width`` = 64 * mid / (output / 4)
        (timm's mid = planes * base_width / 64).  Any registered bottleneck ResNet name takes these kwargs
        (they override the name's own); the closest one is returned: ``resnet50_gn`` (R50), ``resnet101``,
        ``resnet152``, ``wide_resnet50_2`` / ``wide_resnet101_2`` (bottleneck = output / 2), else ``resnet50``.
        timm's plain stem has 64 channels (``stem_width`` only applies to its deep stems).  ``norm_layer`` is the
        string ``"groupnorm"`` (timm's GroupNorm, 32 groups) when ``gn_groups`` is 32; otherwise ``"groupnorm1"``
        with every GroupNorm's ``num_groups`` set after ``create_model`` (``attributes``), so the export stays
        JSON.  A ResNet takes any input size, so ``img_size`` changes nothing."""
        if dense.stem_channels != 64:
            raise ValueError(f"timm's ResNet stem has 64 channels; this network has {dense.stem_channels}")
        width = dense.widths[-1]
        if (64 * width) % dense.base_channels:
            raise ValueError(f"mid width {width} is not base_channels * base_width / 64 for an integer base_width")
        base_width = 64 * width // dense.base_channels
        out = {k: v for k, v in state.items() if k != "mask_token"}
        attributes = {}
        if dense.gn_groups != 32:  # every GroupNorm (1-D weights: the convolutions' are 4-D)
            attributes = {k[: -len(".weight")] + ".num_groups": dense.gn_groups
                          for k, v in out.items() if k.endswith(".weight") and v.ndim == 1}
        kwargs = dict(layers=list(dense.depths), channels=[dense.base_channels * 2 ** s for s in range(len(STRIDES))],
                      base_width=base_width, norm_layer="groupnorm" if dense.gn_groups == 32 else "groupnorm1",
                      in_chans=dense.in_chans)
        names = {(64, (3, 4, 6, 3)): "resnet50_gn", (64, (3, 4, 23, 3)): "resnet101",
                 (64, (3, 8, 36, 3)): "resnet152", (128, (3, 4, 6, 3)): "wide_resnet50_2",
                 (128, (3, 4, 23, 3)): "wide_resnet101_2"}
        name = names.get((base_width, tuple(dense.depths)), "resnet50") if dense.base_channels == 64 else "resnet50"
        return TimmExport(name, kwargs, out, attributes)

    def params(self, a: ResNetArch, sub: Optional[Subnet] = None) -> int:
        return count_params(a if sub is None else a.sub(sub.width, sub.depth))

    def gflops(self, a: ResNetArch, sub: Optional[Subnet] = None, img_size: Optional[int] = None) -> float:
        return resnet_gflops(a if sub is None else a.sub(sub.width, sub.depth), img_size)

    def residual_gflops(self, a: ResNetArch, sub: Optional[Subnet] = None, img_size: Optional[int] = None):
        dense = a if sub is None else a.sub(sub.width, sub.depth)
        return [(g, a.drop_path_rate) for g in resnet_block_gflops(dense, img_size)]  # uniform rate

    def num_layers(self, a: ResNetArch) -> int:
        """``sum(depths) - 1``: with ids 0 (stem, mask token) .. ``sum(depths)`` (last block and heads) and the
        multiplier ``decay ** (num_layers + 1 - id)``, this is the authors' ``get_resnet_lr_decay_rate``:
        ``decay ** (sum(depths) - id)``, whose heads (a module of their own there, 0 blocks) get ``decay ** 0``
        like the last block."""
        return sum(a.depths) - 1

    def layer_id(self, name: str, a: ResNetArch) -> int:
        """The authors' rule: stem conv / norm and mask token 0; block j of stage s (0-based)
        ``sum(depths[:s]) + j + 1``, its downsample included."""
        parts = name.split(".")
        if parts[0] in _STEM:
            return 0
        if parts[0].startswith("layer") and parts[0][5:].isdigit() and len(parts) > 2 and parts[1].isdigit():
            s, j = int(parts[0][5:]) - 1, int(parts[1])
            if 0 <= s < len(a.depths) and 0 <= j < a.depths[s]:
                return sum(a.depths[:s]) + j + 1
        raise ValueError(f"parameter {name!r} is not a parameter of the ResNet {a.depths}")

    def no_weight_decay(self, name: str) -> bool:
        """Every GroupNorm parameter: the stem's and blocks' ``bn*`` and the shortcut's ``downsample.1``.
        (The authors exempt names containing ``norm``, which misses their downsample GroupNorm,
        named ``downsample.1``: an accident of naming, not a choice; a norm is exempt wherever it
        sits.)  The mask token keeps weight decay, as the authors' and DINOv2's."""
        module = name.rsplit(".", 1)[0]
        return module.split(".")[-1].startswith("bn") or module.endswith("downsample.1")

    def is_patch_embed(self, name: str) -> bool:
        """None: the authors' ``patch_embed`` lr multiplier matches no ResNet parameter (the stem gets layer 0's)."""
        return False

    def sharding_units(self, backbone: ElasticResNet) -> List[str]:
        """Every bottleneck block; the root keeps the stem and the mask token."""
        return [f"{name}.{j}" for name in backbone.stages for j in range(len(getattr(backbone, name)))]

    def mask_grid(self, a: ResNetArch, img_size: int) -> int:
        return img_size // 32 * a.ibot_scale_factor


register_backbone(ResNetSpec())
