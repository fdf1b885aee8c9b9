"""Image augmentations: DINOv2's multi-crop recipe and the k-NN eval transform.

All randomness inside torchvision's transforms comes from torch's global CPU
generator (and, defensively, Python's ``random``).  :func:`seeded_rng` seeds
both for one sample and restores them afterwards, so a sample's crops are a
pure function of its seed no matter which process or worker draws them.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

if TYPE_CHECKING:  # pragma: no cover
    from poa_hpc.config import POAConfig

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiCropAugmentation",
    "ViewSpec",
    "multicrop_view_specs",
    "torchvision_view",
    "EvalTransform",
    "build_multicrop",
    "build_view_specs",
    "blur_kernel_size",
    "to_rgb",
    "seeded_rng",
    "derive_seed",
]

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, CMYK, RGBA, P, I;16, ...) to RGB.

    16-bit and 32-bit integer or float images are scaled to 8 bits (``I;16``:
    by 255/65535; ``I``/``F``: the same when a value exceeds 255, else as is),
    where Pillow's own conversion would clip them to white.

    Palette images with a transparency entry go through RGBA first; Pillow warns
    when converting them straight to RGB.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":  # 16-bit and float scans: scale to 8 bits, not clip
        a = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.round(a * (255.0 / peak)), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator and Python's ``random`` for one block, then restore both.

    ``torch.default_generator`` is seeded rather than calling ``torch.manual_seed``,
    which would also reseed (and not restore) every CUDA generator.
    """
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed) % (1 << 64))
        random.seed(int(seed))
        try:
            yield
        finally:
            random.setstate(py_state)


def blur_kernel_size(crop_size: int, ref_kernel: int = 9, ref_size: int = 224) -> int:
    """Gaussian-blur kernel for a crop: DINOv2's 9 px at 224 px, scaled, odd, >= 3.

    A fixed 9 px kernel is larger than a 16 px demo crop's useful support, so it
    scales with the crop side (224 -> 9, 96 -> 5, 32 -> 3).
    """
    k = int(round(ref_kernel * crop_size / ref_size))
    if k % 2 == 0:
        k += 1
    return max(3, k)


@dataclass(frozen=True)
class ViewSpec:
    """One multi-crop view's augmentation, shared by the torchvision and DALI loaders.

    In order: random resized crop to ``size`` (area ``scale``, aspect ``ratio``,
    bicubic), horizontal flip, colour jitter with probability ``p_jitter``
    (factors ``1 +- brightness``, ``1 +- contrast``, ``1 +- saturation`` and a
    hue shift of ``+- hue`` turns), grayscale, Gaussian blur (``blur_kernel`` px,
    sigma in ``blur_sigma``), solarisation at ``solarize_threshold``, then
    ImageNet normalisation.
    """

    size: int
    scale: Tuple[float, float]
    p_blur: float
    p_solarize: float = 0.0
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    p_flip: float = 0.5
    p_jitter: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    p_gray: float = 0.2
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    solarize_threshold: int = 128

    @property
    def blur_kernel(self) -> int:
        return blur_kernel_size(self.size)


def multicrop_view_specs(
    global_size: int = 224,
    local_size: int = 96,
    n_local: int = 8,
    global_scale: Tuple[float, float] = (0.32, 1.0),
    local_scale: Tuple[float, float] = (0.05, 0.32),
) -> List[ViewSpec]:
    """DINOv2's views: global 1 (blur p 1.0), global 2 (blur p 0.1, solarize p 0.2), ``n_local`` locals (blur p 0.5).

    The blur probabilities are the ones the papers state (DINO/iBOT: 1.0 / 0.1 / 0.5);
    DINOv2's own ``GaussianBlur`` passes ``1 - p`` to ``RandomApply``, so its
    "p=1.0" global view is never blurred.
    """
    if n_local < 0:
        raise ValueError(f"n_local must be >= 0, got {n_local}")
    g, loc = tuple(map(float, global_scale)), tuple(map(float, local_scale))
    return [
        ViewSpec(global_size, g, p_blur=1.0),  # type: ignore[arg-type]
        ViewSpec(global_size, g, p_blur=0.1, p_solarize=0.2),  # type: ignore[arg-type]
        *[ViewSpec(local_size, loc, p_blur=0.5) for _ in range(n_local)],  # type: ignore[arg-type]
    ]


def _normalize() -> T.Compose:
    return T.Compose([T.ToTensor(), T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])


def torchvision_view(spec: ViewSpec) -> T.Compose:
    """The torchvision pipeline of one view (PIL RGB in, normalised ``(3, size, size)`` out)."""
    ops: List[Any] = [
        T.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio, interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=spec.p_flip),
        T.RandomApply(
            [T.ColorJitter(brightness=spec.brightness, contrast=spec.contrast, saturation=spec.saturation, hue=spec.hue)],
            p=spec.p_jitter,
        ),
        T.RandomGrayscale(p=spec.p_gray),
        T.RandomApply([T.GaussianBlur(kernel_size=spec.blur_kernel, sigma=spec.blur_sigma)], p=spec.p_blur),
    ]
    if spec.p_solarize > 0:
        ops.append(T.RandomSolarize(threshold=spec.solarize_threshold, p=spec.p_solarize))
    return T.Compose([*ops, _normalize()])


class MultiCropAugmentation:
    """DINOv2's ``DataAugmentationDINO``: two global crops and ``n_local`` local crops.

    Global view 1: crop, flip, colour jitter (p 0.8), grayscale (p 0.2), blur (p 1.0).
    Global view 2: same, blur p 0.1, then solarize (threshold 128, p 0.2).
    Local views: smaller crop, flip, jitter, grayscale, blur p 0.5.
    Every view ends with ToTensor + ImageNet normalisation (see :class:`ViewSpec`).

    ``__call__`` takes a PIL image of any mode and returns
    ``{"global_crops": [T, T], "local_crops": [T] * n_local}`` with
    ``T`` float32 tensors of shape ``(3, global_size, global_size)`` /
    ``(3, local_size, local_size)``.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        global_scale: Tuple[float, float] = (0.32, 1.0),
        local_scale: Tuple[float, float] = (0.05, 0.32),
    ) -> None:
        self.specs = multicrop_view_specs(global_size, local_size, n_local, global_scale, local_scale)
        self.global_size = global_size
        self.local_size = local_size
        self.n_local = n_local
        self.global_transform_1 = torchvision_view(self.specs[0])
        self.global_transform_2 = torchvision_view(self.specs[1])
        self.local_transform = torchvision_view(self.specs[2]) if n_local else None

    def __call__(self, image: Image.Image) -> Dict[str, List[torch.Tensor]]:
        image = to_rgb(image)
        return {
            "global_crops": [self.global_transform_1(image), self.global_transform_2(image)],
            "local_crops": [self.local_transform(image) for _ in range(self.n_local)],  # type: ignore[misc]
        }

    def __repr__(self) -> str:
        return (
            f"MultiCropAugmentation(global_size={self.global_size}, local_size={self.local_size}, "
            f"n_local={self.n_local})"
        )


class EvalTransform:
    """Deterministic eval view: ``(3, size, size)`` normalised float tensor.

    Images whose shorter side exceeds ``size`` get the standard ImageNet protocol
    (resize the shorter side to ``size * 256 / 224``, centre crop ``size``).
    Smaller images (the 32 px digits) are resized so the shorter side is
    ``size`` and centre-cropped, i.e. no detail is thrown away by the 87.5 %
    crop, and square tiny images are used whole.
    """

    def __init__(self, size: int, crop_ratio: float = 224 / 256) -> None:
        self.size = int(size)
        bicubic = InterpolationMode.BICUBIC
        self._large = T.Compose(
            [T.Resize(int(round(self.size / crop_ratio)), interpolation=bicubic), T.CenterCrop(self.size)]
        )
        self._small = T.Compose([T.Resize(self.size, interpolation=bicubic), T.CenterCrop(self.size)])
        self._normalize = _normalize()

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        resize = self._large if min(image.size) > self.size else self._small
        return self._normalize(resize(image))

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size})"


def build_view_specs(cfg: POAConfig) -> List[ViewSpec]:
    """The views described by ``cfg.data`` (global 1, global 2, locals)."""
    d = cfg.data
    return multicrop_view_specs(
        d.global_size, d.local_size, d.n_local, (d.global_scale_min, d.global_scale_max), (d.local_scale_min, d.local_scale_max)
    )


def build_multicrop(cfg: POAConfig) -> MultiCropAugmentation:
    """The training augmentation described by ``cfg.data``."""
    d = cfg.data
    return MultiCropAugmentation(
        global_size=d.global_size,
        local_size=d.local_size,
        n_local=d.n_local,
        global_scale=(d.global_scale_min, d.global_scale_max),
        local_scale=(d.local_scale_min, d.local_scale_max),
    )


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure, well-mixed function of the integer ``parts``.

    Built on ``numpy.random.SeedSequence`` so nearby tuples such as
    ``(seed, step, rank, 0)`` and ``(seed, step, rank, 1)`` give unrelated
    streams.  Negative parts are folded into the unsigned 64-bit range.
    """
    entropy = [int(p) % (1 << 64) for p in parts]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])
