"""Elastic bottleneck ResNet with GroupNorm (paper §4, the authors' ``DynamicResNet``).

One set of parameters, sized for the intact network (ResNet-152 depths [3, 8, 36, 3]
with a 2x wide bottleneck: mid channels = block output / 2), runs intact or as any
elastic sub-network ``(w, (d1, d2, d3, d4))``:

* width: only the bottleneck mid channels are elastic; stage ``s`` (0-based) uses
  ``w * 2**s`` of them (the authors zip the per-stage widths: stage-1 mids 64/96/128 give
  stage mids [64, 128, 256, 512], [96, 192, 384, 768], [128, 256, 512, 1024]).  Per block:
  ``conv1`` keeps its first ``mid`` filters (input: the full block input, scale 1),
  ``conv2`` the leading ``mid x mid`` block, ``conv3`` its first ``mid`` input channels
  (both scaled by ``max_mid / mid``); ``bn1``/``bn2`` their first ``mid`` entries, with 32
  groups at every width.  Block outputs (256/512/1024/2048), ``bn3``, the downsample
  shortcut and the stem never change, so the heads always see 2048 features;
* depth: stage ``s`` keeps the blocks ``floor(linspace(0, L_s - 1, d_s))`` (the first block,
  which holds the downsample, is always kept); stages whose minimum equals their maximum
  (1 and 4 in the paper) keep every block.

Normalisation is GroupNorm, as the authors': no running statistics, so the elastic branch
cannot corrupt them and FSDP needs no buffer synchronisation.  Parameter names follow
timm's ``ResNet`` (``conv1``, ``bn1`` -- a GroupNorm here --, ``layer{1..4}.{j}.conv1 ...
downsample.1``) so a dense extracted sub-network loads into ``timm.models.resnet.ResNet``
with ``norm_layer=GroupNorm`` (``strict=True``).  timm's bottleneck is the same
computation: conv1-norm-relu, conv2 (stride here, as the authors)-norm-relu, conv3-norm,
drop-path, plus the (downsampled) shortcut, relu.

iBOT for a CNN, as the authors: the iBOT mask grid of a ``S``-pixel global crop is
``S // 32 * ibot_scale_factor`` (14 at 224 with the factor 2).  The mask is nearest-upsampled
by ``8 // ibot_scale_factor`` to the map after the stem max-pool (stride 4), where a
``(1, stem_channels, 1, 1)`` mask token replaces the masked positions; the patch tokens are
the final stage-4 map nearest-upsampled by ``ibot_scale_factor`` (every final position
repeated factor**2 times), flattened to ``(B, grid**2, C)``; the image feature is the mean
over positions (no final norm, as the authors).  The authors' ``x_region`` is undefined
for ``ibot_scale_factor == 1`` (a NameError); here factor 1 gives the final map itself.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from poa_hpc.models.elastic import DropPath, ElasticBackbone, ElasticConv2d, ElasticGroupNorm, block_ids

STRIDES = (1, 2, 2, 2)
IBOT_SCALE_FACTORS = (1, 2, 4, 8)


@dataclass
class ResNetArch:
    """The ``model.resnet`` config section: the intact ResNet and its elastic space.

    A dense extracted sub-network is described by the same class (see :meth:`sub`): one width
    and one depth tuple, so its space holds one sub-network, itself.
    """

    img_size: int = 224  # reference image size (``poa subnets`` GFLOPs)
    in_chans: int = 3  # input channels
    stem_channels: int = 64  # channels of the stem convolution
    base_channels: int = 64  # stage s blocks output 4 * base_channels * 2**s channels (256 .. 2048)
    depths: List[int] = field(default_factory=lambda: [3, 8, 36, 3])  # intact blocks per stage
    min_depths: List[int] = field(default_factory=lambda: [3, 4, 6, 3])  # elastic range per stage: min..max
    # Elastic bottleneck widths: stage-1 mid channels (stage s uses width * 2**s); the last is the intact one.
    widths: List[int] = field(default_factory=lambda: [64, 96, 128])
    gn_groups: int = 32  # GroupNorm groups at every width
    zero_init_last: bool = True  # zero-init each block's last GroupNorm scale (timm's; the authors' unapplied flag)
    drop_path_rate: float = 0.0  # uniform over blocks (the authors' ResNet: none)
    sampling_s: float = 2.0  # eq. 14 depth scales linspace(s, 1, #depth tuples); width scale 1
    ibot_scale_factor: int = 2  # iBOT grid = img // 32 * factor; final map upsampled by it, masks by 8 // it

    @property
    def max_width(self) -> int:
        return self.widths[-1]

    def out_channels(self, stage: int) -> int:
        return 4 * self.base_channels * 2 ** stage

    def sub(self, width: int, depth: Sequence[int]) -> ResNetArch:
        """The dense architecture of the ``(width, depth)`` sub-network."""
        return replace(self, widths=[int(width)], depths=[int(d) for d in depth], min_depths=[int(d) for d in depth])

    def depth_tuples(self) -> List[Tuple[int, ...]]:
        """Every per-stage depth tuple, sorted by total depth (stable over the lexicographic product),
        as the authors' ``create_dynamic_networks``."""
        ranges = [range(lo, hi + 1) for lo, hi in zip(self.min_depths, self.depths)]
        return sorted(itertools.product(*ranges), key=sum)


class Bottleneck(nn.Module):
    """Bottleneck block with elastic mid channels; ``forward(x, mid)``."""

    def __init__(self, in_ch: int, mid: int, out: int, stride: int, groups: int, drop_path: float,
                 conv_backend: str = "torch"):
        super().__init__()
        self.conv1 = ElasticConv2d(in_ch, mid, 1, backend=conv_backend)
        self.bn1 = ElasticGroupNorm(groups, mid)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = ElasticConv2d(mid, mid, 3, stride=stride, padding=1, backend=conv_backend)
        self.bn2 = ElasticGroupNorm(groups, mid)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = ElasticConv2d(mid, out, 1, backend=conv_backend)
        self.bn3 = nn.GroupNorm(groups, out)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out:  # timm's rule
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out, 1, stride=stride, bias=False), nn.GroupNorm(groups, out))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, mid: Optional[int] = None) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        # GroupNorm is per sample, so the residual branch can run on a sample subset (DropPath's subset mode).
        return self.act3(self.drop_path.add(shortcut, lambda t: self._branch(t, mid), inp=x))

    def _branch(self, x: torch.Tensor, mid: Optional[int]) -> torch.Tensor:
        y = self.act1(self.bn1(self.conv1(x, mid)))
        y = self.act2(self.bn2(self.conv2(y, mid)))
        return self.bn3(self.conv3(y))


class ElasticResNet(ElasticBackbone):
    family = "resnet"

    def __init__(self, arch: ResNetArch, drop_path_rate: float = 0.0, conv_backend: str = "torch"):
        super().__init__()
        self.arch = arch
        stem, g = arch.stem_channels, arch.gn_groups
        self.conv1 = nn.Conv2d(arch.in_chans, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.GroupNorm(g, stem)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.mask_token = nn.Parameter(torch.zeros(1, stem, 1, 1))
        self.stages: List[str] = []
        in_ch = stem
        for s, (n, stride) in enumerate(zip(arch.depths, STRIDES)):
            out, mid = arch.out_channels(s), arch.max_width * 2 ** s
            blocks = nn.ModuleList(
                Bottleneck(in_ch if j == 0 else out, mid, out, stride if j == 0 else 1, g, drop_path_rate, conv_backend)
                for j in range(n))
            self.add_module(f"layer{s + 1}", blocks)
            self.stages.append(f"layer{s + 1}")
            in_ch = out
        self.num_features = in_ch
        self.init_weights()

    def init_weights(self) -> None:
        """timm's ResNet initialisation: Kaiming-normal (fan-out, ReLU) convolutions, GroupNorm 1 / 0, mask
        token 0, and with ``zero_init_last`` each block's last GroupNorm scale 0 (every block starts as its
        shortcut; the authors' ``zero_init_residual=True``, which their code declares but never applies:
        their runs keep PyTorch's default conv init and no zero-init)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.arch.zero_init_last:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    @property
    def max_depths(self) -> Tuple[int, ...]:
        return tuple(len(getattr(self, name)) for name in self.stages)

    def _check(self, width: int, depth: Sequence[int]) -> None:
        a = self.arch
        if not (0 < width <= a.max_width) or width % a.gn_groups:
            raise ValueError(f"width {width} must be a multiple of {a.gn_groups} in (0, {a.max_width}]")
        if not isinstance(depth, (tuple, list)) or len(depth) != len(self.stages):
            raise ValueError(f"depth {depth} must give one block count per stage ({len(self.stages)})")

    def _stem(self, x: torch.Tensor, masks: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        if masks is not None:
            B, _, h, w = x.shape
            f = 8 // self.arch.ibot_scale_factor
            grid = h // f
            if masks.shape != (B, grid * grid) or h != w or h % f:
                raise ValueError(f"masks of shape {tuple(masks.shape)} do not fit a {h}x{w} stem map "
                                 f"(expected ({B}, {grid * grid}): an image side divisible by 32)")
            m = masks.reshape(B, 1, grid, grid).repeat_interleave(f, 2).repeat_interleave(f, 3)  # nearest upsample
            x = torch.where(m, self.mask_token.to(x.dtype), x)
        return x

    def forward_features(
        self,
        x: torch.Tensor,
        masks: Optional[torch.Tensor] = None,
        width: Optional[int] = None,
        depth: Optional[Sequence[int]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Backbone forward of the intact network or of the ``(width, depth)`` sub-network.

        Args:
            x: (B, C, H, W) images.
            width: stage-1 bottleneck mid channels (default: the intact width).
            depth: blocks per stage (default: all).
            masks: optional (B, grid**2) bool on the iBOT grid (``H // 32 * ibot_scale_factor``).
        Returns:
            dict with ``x_norm_clstoken`` (B, C) (mean over positions) and ``x_norm_patchtokens``
            (B, grid**2, C) (the final map upsampled to the iBOT grid).
        """
        width = width or self.arch.max_width
        depth = self.max_depths if depth is None else depth
        self._check(width, depth)
        x = self._stem(x, masks)
        for s, (name, d) in enumerate(zip(self.stages, depth)):
            blocks = getattr(self, name)
            mid = width * 2 ** s
            x = self.run_blocks(blocks, block_ids(len(blocks), d), x, call=lambda block, t, mid=mid: block(t, mid))
        f = self.arch.ibot_scale_factor
        region = x.repeat_interleave(f, 2).repeat_interleave(f, 3) if f > 1 else x
        return {"x_norm_clstoken": x.mean(dim=(2, 3)), "x_norm_patchtokens": region.flatten(2).transpose(1, 2)}


def build_resnet(arch: ResNetArch, drop_path_rate: float = 0.0, conv_backend: str = "torch") -> ElasticResNet:
    return ElasticResNet(arch, drop_path_rate, conv_backend)


def _conv_out(size: int, stride: int) -> int:
    """Side after a stride-``stride`` conv / pool with 'same'-style padding (k7 p3, k3 p1, k1 p0): ceil."""
    return -(-size // stride)


def count_params(arch: ResNetArch) -> int:
    """Parameters of a dense ResNet of this architecture (one width: its last), without the mask token."""
    a, g = arch, 2  # every GroupNorm: weight and bias per channel
    total = a.in_chans * a.stem_channels * 49 + g * a.stem_channels
    in_ch = a.stem_channels
    for s, (n, stride) in enumerate(zip(a.depths, STRIDES)):
        out, mid = a.out_channels(s), a.max_width * 2 ** s
        for j in range(n):
            cin = in_ch if j == 0 else out
            total += cin * mid + g * mid + mid * mid * 9 + g * mid + mid * out + g * out
            if j == 0 and (stride != 1 or cin != out):
                total += cin * out + g * out
        in_ch = out
    return total


def resnet_gflops(arch: ResNetArch, img_size: Optional[int] = None) -> float:
    """Multiply-accumulates (G) of the convolutions of one forward at ``img_size`` (fvcore/timm "GFLOPs";
    norms, activations and pooling are not counted)."""
    a = arch
    h = _conv_out(img_size or a.img_size, 2)
    macs = h * h * a.in_chans * a.stem_channels * 49
    for branch, shortcut in _block_macs(a, img_size):
        macs += branch + shortcut
    return macs / 1e9


def resnet_block_gflops(arch: ResNetArch, img_size: Optional[int] = None) -> List[float]:
    """Per block, multiply-accumulates (G) of its residual branch (conv1, conv2, conv3; not the shortcut)."""
    return [branch / 1e9 for branch, _ in _block_macs(arch, img_size)]


def _block_macs(a: ResNetArch, img_size: Optional[int]) -> List[Tuple[int, int]]:
    """(residual branch, shortcut) convolution multiply-accumulates of every block, in order."""
    h = _conv_out(_conv_out(img_size or a.img_size, 2), 2)  # stem conv, max-pool
    in_ch = a.stem_channels
    out_macs = []
    for s, (n, stride) in enumerate(zip(a.depths, STRIDES)):
        out, mid = a.out_channels(s), a.max_width * 2 ** s
        for j in range(n):
            st = stride if j == 0 else 1
            cin = in_ch if j == 0 else out
            ho = _conv_out(h, st)
            shortcut = ho * ho * cin * out if j == 0 and (st != 1 or cin != out) else 0
            out_macs.append((h * h * cin * mid + ho * ho * (mid * mid * 9 + mid * out), shortcut))
            h = ho
        in_ch = out
    return out_macs
