"""Batch assembly for multi-crop training with iBOT masks.

Port of DINOv2's ``collate_data_and_cast``.  Crops are stacked *view-major*
(all samples' view 0, then all samples' view 1, ...) so the model can split the
batch per view with ``chunk``.  Masks are drawn with an explicit
``random.Random`` seeded from ``(seed, step, rank)``: a batch's masks depend on
nothing else (not on worker count, not on how many batches came before).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .masking import MaskingGenerator
from .transforms import derive_seed

if TYPE_CHECKING:  # pragma: no cover
    from poa_hpc.config import POAConfig

__all__ = ["collate_multicrop", "MultiCropCollator", "build_collator", "MASK_STREAM"]

MASK_STREAM = 0x4D41534B  # "MASK": keeps the mask RNG stream apart from the others


def _stack_view_major(samples: Sequence[Mapping[str, Any]], key: str) -> torch.Tensor:
    n_views = len(samples[0][key])
    if n_views == 0:
        return torch.empty(0)
    return torch.stack([s[key][v] for v in range(n_views) for s in samples])


def collate_multicrop(
    samples: Sequence[Mapping[str, Any]],
    *,
    mask_generator: MaskingGenerator,
    rng: random.Random,
    mask_ratio: Tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    dtype: Optional[torch.dtype] = None,
) -> Dict[str, Any]:
    """Stack multi-crop samples and draw iBOT masks for the global crops.

    ``samples`` are dicts with ``global_crops`` / ``local_crops`` (lists of
    ``(C, H, W)`` tensors) and optionally ``label``, ``n_skipped``, ``index``.

    Masking (DINOv2): of the ``2B`` global crops, ``int(2B * mask_probability)``
    are masked; their ratios are drawn one per stratum of
    ``linspace(ratio_min, ratio_max, n_masked + 1)`` so the batch spans the whole
    range; the rest get empty masks; then the order is shuffled.

    Returns:
        ``global_crops`` (2B, C, H, W); ``local_crops`` (n_local*B, C, h, w) (an
        empty tensor when n_local == 0); ``masks`` bool (2B, N); ``mask_indices``
        long (M,) = indices of True in ``masks.flatten()``; ``masks_weight`` float
        (M,) = 1 / (masked patches of that crop) per masked token; ``n_masked``
        int M; ``upperbound`` int (sum of the per-crop maxima, a static bound on
        M); ``n_skipped`` int; ``labels`` long (B,) and ``indices`` long (B,)
        when the samples carry them.
    """
    if not samples:
        raise ValueError("collate_multicrop: empty batch")
    global_crops = _stack_view_major(samples, "global_crops")
    local_crops = _stack_view_major(samples, "local_crops")
    if local_crops.numel() == 0 and local_crops.dim() == 1:
        c = global_crops.shape[1]
        local_crops = torch.empty(0, c, 0, 0, dtype=global_crops.dtype)
    if dtype is not None:
        global_crops = global_crops.to(dtype)
        local_crops = local_crops.to(dtype)

    n_crops = global_crops.shape[0]
    n_tokens = mask_generator.num_patches
    n_samples_masked = int(n_crops * mask_probability)
    probs = np.linspace(mask_ratio[0], mask_ratio[1], n_samples_masked + 1)
    upperbound = 0
    masks_list: List[np.ndarray] = []
    for i in range(n_samples_masked):
        lo, hi = float(probs[i]), float(probs[i + 1])
        masks_list.append(mask_generator(int(n_tokens * rng.uniform(lo, hi)), rng=rng))
        upperbound += int(n_tokens * hi)
    for _ in range(n_samples_masked, n_crops):
        masks_list.append(np.zeros(mask_generator.get_shape(), dtype=bool))
    rng.shuffle(masks_list)

    masks = torch.from_numpy(np.stack(masks_list)).flatten(1)
    mask_indices = masks.flatten().nonzero().flatten()
    masks_weight = (1.0 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]

    batch: Dict[str, Any] = {
        "global_crops": global_crops,
        "local_crops": local_crops,
        "masks": masks,
        "mask_indices": mask_indices,
        "masks_weight": masks_weight.float(),
        "n_masked": int(mask_indices.numel()),
        "upperbound": upperbound,
        "n_skipped": int(sum(int(s.get("n_skipped", 0)) for s in samples)),
    }
    if all("label" in s for s in samples):
        batch["labels"] = torch.tensor([int(s["label"]) for s in samples], dtype=torch.long)
    if all("index" in s for s in samples):
        batch["indices"] = torch.tensor([int(s["index"]) for s in samples], dtype=torch.long)
    return batch


class MultiCropCollator:
    """Picklable ``collate_fn``: seeds the mask RNG from ``(seed, step, rank)``.

    The step comes from the samples (the batch sampler stamps it on every
    sample key), so the collate is correct in any worker process.
    """

    def __init__(
        self,
        seed: int,
        rank: int,
        grid_size: int,
        mask_ratio: Tuple[float, float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        self.seed = int(seed)
        self.rank = int(rank)
        self.mask_ratio = (float(mask_ratio[0]), float(mask_ratio[1]))
        self.mask_probability = float(mask_probability)
        self.dtype = dtype
        self.mask_generator = MaskingGenerator((grid_size, grid_size), max_num_patches=0.5 * grid_size * grid_size)

    def rng_for(self, step: int) -> random.Random:
        return random.Random(derive_seed(self.seed, MASK_STREAM, step, self.rank))

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
        steps = {int(s["step"]) for s in samples}
        if len(steps) != 1:
            raise ValueError(f"MultiCropCollator: a batch must come from one step, got steps {sorted(steps)}")
        step = steps.pop()
        batch = collate_multicrop(
            samples,
            mask_generator=self.mask_generator,
            rng=self.rng_for(step),
            mask_ratio=self.mask_ratio,
            mask_probability=self.mask_probability,
            dtype=self.dtype,
        )
        batch["step"] = step
        return batch


def build_collator(cfg: "POAConfig", rank: int = 0) -> MultiCropCollator:
    """Collator for ``cfg``: grid = global_size // patch_size, mask fields from ``cfg.loss``."""
    grid = cfg.data.global_size // cfg.model.patch_size
    return MultiCropCollator(
        seed=cfg.train.seed,
        rank=rank,
        grid_size=grid,
        mask_ratio=(cfg.loss.mask_ratio_min, cfg.loss.mask_ratio_max),
        mask_probability=cfg.loss.mask_sample_probability,
    )
