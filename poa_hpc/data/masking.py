"""Block-wise patch masking for the iBOT masked-image-modelling loss.

Port of the BEiT / DINOv2 ``MaskingGenerator`` with one change: randomness
comes from an explicit :class:`random.Random` instead of Python's global
``random`` module, so a batch's masks are a pure function of the seed the
collate function derives from ``(seed, step, rank)`` (exact resume after a kill).
"""

from __future__ import annotations

import math
import random
from typing import Optional, Tuple, Union

import numpy as np

__all__ = ["MaskingGenerator"]


class MaskingGenerator:
    """Mask random rectangular blocks of patches until a target count is reached.

    Blocks have an area in ``[min_num_patches, max_num_patches]`` (clipped to what
    is still needed) and a log-uniform aspect ratio in ``[min_aspect, max_aspect]``.
    A block is only accepted if it adds at least one and at most the remaining
    number of patches, so the result never exceeds the request; when no block
    fits in 10 tries the generator stops early (DINOv2 semantics), which can
    leave a few patches short of the request on tiny grids.

    Args:
        input_size: patch grid ``(h, w)`` (an int means square).
        num_masking_patches: default count for ``__call__`` when none is given.
        min_num_patches: smallest block area tried.
        max_num_patches: largest block area; DINOv2 uses ``0.5 * h * w``
            (the default here).
        min_aspect: smallest block aspect ratio; ``max_aspect`` defaults to its
            inverse.
        rng: default random source when ``__call__`` gets none.
    """

    def __init__(
        self,
        input_size: Union[int, Tuple[int, int]],
        num_masking_patches: int = 0,
        min_num_patches: int = 4,
        max_num_patches: Optional[float] = None,
        min_aspect: float = 0.3,
        max_aspect: Optional[float] = None,
        rng: Optional[random.Random] = None,
    ) -> None:
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = int(input_size[0]), int(input_size[1])
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"MaskingGenerator: input_size must be positive, got {input_size}")
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.rng = rng if rng is not None else random.Random(0)

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}, {self.width} -> [{self.min_num_patches} ~ "
            f"{self.max_num_patches}], aspect {tuple(round(math.exp(a), 3) for a in self.log_aspect_ratio)})"
        )

    def get_shape(self) -> Tuple[int, int]:
        return self.height, self.width

    def _mask(self, mask: np.ndarray, max_mask_patches: float, rng: random.Random) -> int:
        """Try (10 times) to add one block; return how many new patches it masked."""
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:
                    block[...] = True
                    delta += new
            if delta > 0:
                break
        return delta

    def __call__(self, num_masking_patches: Optional[int] = None, rng: Optional[random.Random] = None) -> np.ndarray:
        """Return a bool ``(h, w)`` mask with at most ``num_masking_patches`` True."""
        if num_masking_patches is None:
            num_masking_patches = self.num_masking_patches
        rng = self.rng if rng is None else rng
        mask = np.zeros(self.get_shape(), dtype=bool)
        count = 0
        while count < num_masking_patches:
            remaining = min(num_masking_patches - count, self.max_num_patches)
            delta = self._mask(mask, remaining, rng)
            if delta == 0:
                break
            count += delta
        return mask
