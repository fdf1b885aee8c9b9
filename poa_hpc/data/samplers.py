"""Batch samplers: which dataset indices each rank reads at each step.

:class:`StepBatchSampler` is the one both loaders (``poa_hpc.data.loader`` for
torchvision, ``poa_hpc.data.dali`` for DALI) share, so they read the same
images at the same step and rank; it knows nothing of files, shards or
augmentation (see the determinism contract in :mod:`poa_hpc.data.loader`).
"""

from __future__ import annotations

from typing import Dict, Iterator, List, NamedTuple, Tuple

import numpy as np

from poa_hpc.errors import DataError

from .transforms import derive_seed

__all__ = ["PERM_STREAM", "SampleKey", "StepBatchSampler", "compute_iters_per_epoch"]

PERM_STREAM = 0x5045524D  # "PERM"


class SampleKey(NamedTuple):
    """What the batch sampler hands the dataset: enough to make the sample pure."""

    step: int
    rank: int
    pos: int  # position within the global batch (rank * batch_size + position on this rank)
    index: int  # dataset index requested (a skip may substitute the next one)


def compute_iters_per_epoch(dataset_len: int, global_batch: int, override: int = 0) -> int:
    """``override`` if > 0, else ``dataset_len // global_batch`` (drop_last); never 0."""
    if override > 0:
        return int(override)
    iters = dataset_len // global_batch
    if iters == 0:
        raise DataError(
            f"key 'data.root': the dataset has {dataset_len} image(s), fewer than one global batch of "
            f"{global_batch} (optim.batch_size x world size); add images, lower optim.batch_size or set "
            "optim.iters_per_epoch"
        )
    return iters


class StepBatchSampler:
    """Infinite batch sampler yielding ``List[SampleKey]`` for steps ``start_step, start_step + 1, ...``.

    Epoch ``e`` reads positions ``0 .. iters_per_epoch * B * W - 1`` of an
    endless concatenation of permutations seeded ``(seed, e, 0)``,
    ``(seed, e, 1)``, ...; with the default ``iters_per_epoch = n // (B * W)``
    only the first is used and the tail is dropped (drop_last).
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        seed: int,
        iters_per_epoch: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ) -> None:
        if not (0 <= rank < world_size):
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if dataset_len <= 0 or batch_size <= 0 or iters_per_epoch <= 0:
            raise ValueError(
                f"StepBatchSampler: need positive dataset_len/batch_size/iters_per_epoch, "
                f"got {dataset_len}/{batch_size}/{iters_per_epoch}"
            )
        self.n = int(dataset_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.iters_per_epoch = int(iters_per_epoch)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start_step = int(start_step)
        self._perm_cache: Dict[Tuple[int, int], np.ndarray] = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def _perm(self, epoch: int, pass_: int) -> np.ndarray:
        key = (epoch, pass_)
        perm = self._perm_cache.get(key)
        if perm is None:
            if len(self._perm_cache) >= 4:  # steps advance monotonically; keep a small window
                self._perm_cache.pop(next(iter(self._perm_cache)))
            rng = np.random.default_rng(derive_seed(self.seed, PERM_STREAM, epoch, pass_))
            perm = rng.permutation(self.n)
            self._perm_cache[key] = perm
        return perm

    def indices_for_step(self, step: int) -> List[int]:
        """Dataset indices of this rank's batch at ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, it = divmod(int(step), self.iters_per_epoch)
        start = it * self.global_batch + self.rank * self.batch_size
        out: List[int] = []
        for k in range(start, start + self.batch_size):
            pass_, offset = divmod(k, self.n)
            out.append(int(self._perm(epoch, pass_)[offset]))
        return out

    def batch_for_step(self, step: int) -> List[SampleKey]:
        first = self.rank * self.batch_size
        return [SampleKey(step, self.rank, first + j, i) for j, i in enumerate(self.indices_for_step(step))]

    def __iter__(self) -> Iterator[List[SampleKey]]:
        step = self.start_step
        while True:
            yield self.batch_for_step(step)
            step += 1
