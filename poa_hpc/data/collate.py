"""Batch assembly for multi-crop training with iBOT masks.

Port of DINOv2's ``collate_data_and_cast``.  Crops are stacked *view-major*
(all samples' view 0, then all samples' view 1, ...) so the model can split the
batch per view with ``chunk``.  Masks follow DINOv2's recipe over the *global*
batch (all ranks): a plan drawn from ``(seed, step)`` decides which of the
``2 x global batch`` crop slots are masked and with which ratio stratum, and
each slot's mask comes from its own RNG seeded ``(seed, step, slot)``.  A rank
draws only its own slots, and the result depends on nothing else (not on the
worker count, the rank split, or the batches that came before).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from poa_hpc.models.registry import get_backbone

from .masking import MaskingGenerator
from .transforms import derive_seed

if TYPE_CHECKING:  # pragma: no cover
    from poa_hpc.config import POAConfig

__all__ = ["collate_multicrop", "draw_masks", "mask_plan", "MultiCropCollator", "build_collator", "MASK_STREAM"]

MASK_STREAM = 0x4D41534B  # "MASK": keeps the mask RNG stream apart from the others
SLOT_STREAM = 0x534C4F54  # "SLOT": one mask RNG per crop slot


def _stack_view_major(samples: Sequence[Mapping[str, Any]], key: str) -> torch.Tensor:
    n_views = len(samples[0][key])
    if n_views == 0:
        return torch.empty(0)
    return torch.stack([s[key][v] for v in range(n_views) for s in samples])


def mask_plan(
    n_slots: int, mask_probability: float, mask_ratio: Tuple[float, float], rng: random.Random
) -> Dict[int, Tuple[float, float]]:
    """DINOv2's plan: ``int(n_slots * p)`` slots get one ratio stratum each of
    ``linspace(ratio_min, ratio_max, n + 1)``, assigned to random slots; the
    others stay unmasked.  Returns ``{slot: (lo, hi)}``."""
    n_masked = int(n_slots * mask_probability)
    probs = np.linspace(mask_ratio[0], mask_ratio[1], n_masked + 1)
    order = list(range(n_slots))
    rng.shuffle(order)
    return {order[k]: (float(probs[k]), float(probs[k + 1])) for k in range(n_masked)}


def draw_masks(
    gpos: Sequence[int],
    *,
    mask_generator: MaskingGenerator,
    rng: random.Random,
    mask_ratio: Tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    global_batch: Optional[int] = None,
    slot_rng: Optional[Callable[[int], random.Random]] = None,
) -> Dict[str, Any]:
    """iBOT masks of the two global crops of the samples at global positions ``gpos``.

    Of the ``2G`` global crops of the global batch (``G = global_batch``, default
    ``len(gpos)``), ``int(2G * mask_probability)`` are masked with one ratio
    stratum each (see :func:`mask_plan`, drawn with ``rng``); the crops of this
    batch sit at slots ``view * G + gpos[i]`` (view-major, as the stacked crops)
    and each masked slot ``j`` draws its mask with ``slot_rng(j)``.

    Returns ``masks`` bool (2B, N), ``mask_indices``, ``masks_weight``,
    ``n_masked`` and ``upperbound`` as described in :func:`collate_multicrop`.
    """
    B = len(gpos)
    G = int(global_batch or B)
    gpos = [int(g) for g in gpos]
    if any(not 0 <= g < G for g in gpos):
        raise ValueError(f"draw_masks: global positions {gpos} outside a global batch of {G}")
    slots = [v * G + g for v in range(2) for g in gpos]
    if slot_rng is None:
        base = rng.getrandbits(63)
        slot_rng = lambda j: random.Random(base + j)  # noqa: E731
    n_tokens = mask_generator.num_patches
    plan = mask_plan(2 * G, mask_probability, mask_ratio, rng)
    upperbound = 0
    masks_list: List[np.ndarray] = []
    for j in slots:
        stratum = plan.get(j)
        if stratum is None:
            masks_list.append(np.zeros(mask_generator.get_shape(), dtype=bool))
            continue
        lo, hi = stratum
        r = slot_rng(j)
        masks_list.append(mask_generator(int(n_tokens * r.uniform(lo, hi)), rng=r))
        upperbound += int(n_tokens * hi)

    masks = torch.from_numpy(np.stack(masks_list)).flatten(1)
    mask_indices = masks.flatten().nonzero().flatten()
    masks_weight = (1.0 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    return {
        "masks": masks,
        "mask_indices": mask_indices,
        "masks_weight": masks_weight.float(),
        "n_masked": int(mask_indices.numel()),
        "upperbound": upperbound,
    }


def collate_multicrop(
    samples: Sequence[Mapping[str, Any]],
    *,
    mask_generator: MaskingGenerator,
    rng: random.Random,
    mask_ratio: Tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    dtype: Optional[torch.dtype] = None,
    global_batch: Optional[int] = None,
    slot_rng: Optional[Callable[[int], random.Random]] = None,
) -> Dict[str, Any]:
    """Stack multi-crop samples and draw iBOT masks for the global crops.

    ``samples`` are dicts with ``global_crops`` / ``local_crops`` (lists of
    ``(C, H, W)`` tensors) and optionally ``label``, ``n_skipped``, ``index``
    and ``gpos`` (the sample's position in the global batch; masks as in
    :func:`draw_masks`).

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

    masks = draw_masks(
        [int(s.get("gpos", i)) for i, s in enumerate(samples)],
        mask_generator=mask_generator,
        rng=rng,
        mask_ratio=mask_ratio,
        mask_probability=mask_probability,
        global_batch=global_batch,
        slot_rng=slot_rng,
    )
    batch: Dict[str, Any] = {
        "global_crops": global_crops,
        "local_crops": local_crops,
        **masks,
        "n_skipped": int(sum(int(s.get("n_skipped", 0)) for s in samples)),
    }
    if all("label" in s for s in samples):
        batch["labels"] = torch.tensor([int(s["label"]) for s in samples], dtype=torch.long)
    if all("index" in s for s in samples):
        batch["indices"] = torch.tensor([int(s["index"]) for s in samples], dtype=torch.long)
    return batch


class MultiCropCollator:
    """Picklable ``collate_fn``: mask plan from ``(seed, step)``, each slot's mask from ``(seed, step, slot)``.

    The step and the global positions come from the samples (the batch sampler
    stamps them on every sample key), so the collate is correct in any worker.
    """

    def __init__(
        self,
        seed: int,
        grid_size: int,
        global_batch: Optional[int] = None,
        mask_ratio: Tuple[float, float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        self.seed = int(seed)
        self.global_batch = global_batch
        self.mask_ratio = (float(mask_ratio[0]), float(mask_ratio[1]))
        self.mask_probability = float(mask_probability)
        self.dtype = dtype
        self.mask_generator = MaskingGenerator((grid_size, grid_size), max_num_patches=0.5 * grid_size * grid_size)

    def rng_for(self, step: int) -> random.Random:
        return random.Random(derive_seed(self.seed, MASK_STREAM, step))

    def slot_rng(self, step: int) -> Callable[[int], random.Random]:
        return lambda j: random.Random(derive_seed(self.seed, SLOT_STREAM, step, j))

    def masks_for(self, step: int, gpos: Sequence[int]) -> Dict[str, Any]:
        """The mask fields of the batch at ``step`` holding global positions ``gpos``."""
        return draw_masks(
            gpos,
            mask_generator=self.mask_generator,
            rng=self.rng_for(step),
            mask_ratio=self.mask_ratio,
            mask_probability=self.mask_probability,
            global_batch=self.global_batch,
            slot_rng=self.slot_rng(step),
        )

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
            global_batch=self.global_batch,
            slot_rng=self.slot_rng(step),
        )
        batch["step"] = step
        return batch


def build_collator(cfg: POAConfig, global_batch: Optional[int] = None) -> MultiCropCollator:
    """Collator for ``cfg``: the backbone family's iBOT mask grid for a global crop, mask fields from ``cfg.loss``."""
    grid = get_backbone(cfg.model.arch).mask_grid(cfg.model.section, cfg.data.global_size)
    return MultiCropCollator(
        seed=cfg.train.seed,
        grid_size=grid,
        global_batch=global_batch,
        mask_ratio=(cfg.loss.mask_ratio_min, cfg.loss.mask_ratio_max),
        mask_probability=cfg.loss.mask_sample_probability,
    )
