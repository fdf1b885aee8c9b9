"""Deterministic, resumable, rank-sharded infinite training loader.

The batch at global step ``s`` is a pure function of
``(cfg.train.seed, s, rank, world_size)``:

* **which images**: epoch ``e = s // iters_per_epoch`` walks a permutation of
  the dataset seeded by ``(seed, e)`` (further passes ``(seed, e, 1)``, ... when
  ``optim.iters_per_epoch`` asks for more samples than one pass holds); step
  ``s`` takes the global batch at offset ``(s % iters_per_epoch) * B * W`` and
  rank ``r`` takes its slice ``[r * B, (r + 1) * B)`` of it;
* **how they are augmented**: each sample seeds torch's and Python's RNGs from
  ``(seed, s, position in the global batch)`` (see :func:`seeded_rng`);
* **which patches are masked**: the mask plan is drawn for the whole global
  batch from ``(seed, s)`` and each crop's mask from ``(seed, s, its slot)``.

Nothing depends on ``num_workers`` or on the batches drawn before, so starting
fresh at ``start_step=s`` reproduces exactly the batches a run that got to ``s``
would have seen (exact resume after a kill).  Nothing depends on how the
global batch is split either: the concatenation of the ranks' batches is the
batch a single process with the same global batch sees, crops and masks
included, so a W-process run computes the same step as one process.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from poa_hpc.config import POAConfig
from poa_hpc.errors import ConfigError

from .collate import MultiCropCollator, build_collator
from .datasets import DigitsDataset, FileListDataset, ImageFolderDataset, RobustDataset, TransformedDataset
from .transforms import EvalTransform, build_multicrop, build_view_specs, derive_seed, seeded_rng

__all__ = [
    "SampleKey",
    "StepBatchSampler",
    "MultiCropTrainDataset",
    "TrainLoader",
    "compute_iters_per_epoch",
    "build_train_dataset",
    "build_train_loader",
    "build_eval_datasets",
]

logger = logging.getLogger(__name__)

PERM_STREAM = 0x5045524D  # "PERM"
AUG_STREAM = 0x41554721  # "AUG!"
LOADER_STREAM = 0x4C4F4144  # "LOAD": DataLoader's own base seed (unused by our samples)


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
        raise ValueError(
            f"dataset has {dataset_len} images, fewer than one global batch of {global_batch} "
            "(optim.batch_size x world size); lower optim.batch_size or set optim.iters_per_epoch"
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


class MultiCropTrainDataset(Dataset):
    """Maps a :class:`SampleKey` to a multi-crop sample, seeded per sample.

    The augmentation runs under :func:`seeded_rng` (torch + Python RNGs seeded
    from ``(seed, step, global position)`` and restored afterwards), so the crops
    depend neither on the process, nor on the rank split, nor on what ran
    before, and the caller's RNG state is left untouched when ``num_workers=0``.
    """

    def __init__(self, source: Dataset, transform: Callable[[Any], Dict[str, Any]], seed: int) -> None:
        self.source = source if isinstance(source, RobustDataset) else RobustDataset(source)
        self.transform = transform
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.source)

    def sample_seed(self, key: SampleKey) -> int:
        return derive_seed(self.seed, AUG_STREAM, key.step, key.pos)

    def __getitem__(self, key: SampleKey) -> Dict[str, Any]:
        step, rank, pos, index = key
        item = self.source[index]
        with seeded_rng(self.sample_seed(SampleKey(step, rank, pos, index))):
            sample = dict(self.transform(item.image))
        sample.update(label=item.label, index=item.index, n_skipped=item.n_skipped, step=int(step), gpos=int(pos))
        return sample


class TrainLoader:
    """The infinite batch iterator returned by :func:`build_train_loader`.

    Supports both ``next(loader)`` and ``for batch in loader``; the worker
    processes start on the first batch.  ``batch["step"]`` is the global step
    the batch belongs to (the trainer can assert it matches its counter).
    """

    def __init__(self, dataloader: DataLoader, sampler: StepBatchSampler) -> None:
        self.dataloader = dataloader
        self.sampler = sampler
        self._it: Optional[Iterator[Dict[str, Any]]] = None

    @property
    def dataset(self) -> MultiCropTrainDataset:
        return self.dataloader.dataset  # type: ignore[return-value]

    @property
    def iters_per_epoch(self) -> int:
        return self.sampler.iters_per_epoch

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> Dict[str, Any]:
        if self._it is None:
            self._it = iter(self.dataloader)
        return next(self._it)

    def close(self) -> None:
        """Shut the worker processes down now (they also stop when garbage-collected)."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _require_root(cfg: POAConfig, kind: str) -> Path:
    root = cfg.data.root
    if not root:
        raise ConfigError(f"key 'data.root': empty, but data.dataset={cfg.data.dataset!r} needs a {kind}")
    path = Path(root).expanduser()
    if not path.exists():
        raise ConfigError(f"key 'data.root': '{root}' does not exist (data.dataset={cfg.data.dataset!r} needs a {kind})")
    return path


def build_train_dataset(cfg: POAConfig) -> Dataset:
    """The raw ``(PIL image, label)`` training source chosen by ``cfg.data.dataset``."""
    kind = cfg.data.dataset
    if kind == "digits":
        return DigitsDataset("train", cfg.data.digits_size)
    if kind == "imagefolder":
        root = _require_root(cfg, "folder in ImageNet layout")
        if not root.is_dir():
            raise ConfigError(f"key 'data.root': '{root}' is not a directory")
        return ImageFolderDataset(root / "train" if (root / "train").is_dir() else root)
    if kind == "filelist":
        root = _require_root(cfg, "text file listing one image per line")
        if not root.is_file():
            raise ConfigError(f"key 'data.root': '{root}' is not a file (data.dataset='filelist')")
        return FileListDataset(root)
    raise ConfigError(f"key 'data.dataset': unknown dataset {kind!r}")


def _build_dali_loader(
    cfg: POAConfig, dataset: Dataset, sampler: StepBatchSampler, global_batch: int
) -> Any:
    from .dali import DaliMultiCropLoader, dali_available

    kind = cfg.data.loader
    if not dali_available():
        raise ConfigError(
            f"key 'data.loader': {kind!r} needs NVIDIA DALI, which is not installed "
            "(pip install nvidia-dali-cuda120; its CPU backend also runs without a GPU)"
        )
    samples = getattr(dataset, "samples", None)
    if samples is None:
        raise ConfigError(
            f"key 'data.loader': {kind!r} decodes image files, but data.dataset={cfg.data.dataset!r} "
            "holds its images in memory; use data.loader=torch for it"
        )
    loader = DaliMultiCropLoader(
        [p for p, _ in samples],
        [int(t) for _, t in samples],
        sampler,
        build_view_specs(cfg),
        build_collator(cfg, global_batch=global_batch),
        seed=cfg.train.seed,
        device="gpu" if kind == "dali" else "cpu",
        num_threads=max(1, int(cfg.data.num_workers)),
        root=str(getattr(dataset, "root", "")),
    )
    logger.info(
        "train data (DALI %s): %s, %d images, global batch %d, %d iters/epoch, start step %d, %d threads",
        "GPU" if kind == "dali" else "CPU", getattr(dataset, "root", "?"), len(samples), global_batch,
        sampler.iters_per_epoch, sampler.start_step, loader.num_threads,
    )
    return loader


def build_train_loader(
    cfg: POAConfig,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    dataset: Optional[Dataset] = None,
) -> Tuple[Any, int]:
    """Infinite loader of this rank's batches from ``start_step`` on, and iters per epoch.

    ``dataset`` overrides the ``(PIL image, label)`` source chosen by
    ``cfg.data.dataset`` (for tests and custom data).  See the module docstring
    for the determinism contract and :func:`collate_multicrop` for the batch keys.
    ``data.loader`` picks the torchvision loader (:class:`TrainLoader`) or the
    DALI one (:class:`poa_hpc.data.dali.DaliMultiCropLoader`, GPU or CPU backend);
    both yield the same batch keys.
    """
    raw = dataset if dataset is not None else build_train_dataset(cfg)
    global_batch = cfg.optim.batch_size * world_size
    iters = compute_iters_per_epoch(len(raw), global_batch, cfg.optim.iters_per_epoch)  # type: ignore[arg-type]
    sampler = StepBatchSampler(
        len(raw),  # type: ignore[arg-type]
        cfg.optim.batch_size,
        seed=cfg.train.seed,
        iters_per_epoch=iters,
        rank=rank,
        world_size=world_size,
        start_step=start_step,
    )
    if cfg.data.loader != "torch":
        return _build_dali_loader(cfg, raw, sampler, global_batch), iters
    source = RobustDataset(raw)
    train_ds = MultiCropTrainDataset(source, build_multicrop(cfg), seed=cfg.train.seed)
    collator: MultiCropCollator = build_collator(cfg, global_batch=global_batch)
    num_workers = max(0, int(cfg.data.num_workers))
    loader = DataLoader(
        train_ds,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collator,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # DataLoader draws a base seed for its workers from this generator; giving it
        # its own keeps the caller's global torch RNG untouched (our samples never use it).
        generator=torch.Generator().manual_seed(derive_seed(cfg.train.seed, LOADER_STREAM, rank)),
    )
    logger.info(
        "train data: %s, %d images, global batch %d (%d x %d ranks), %d iters/epoch, start step %d, %d workers",
        source.root, len(source), global_batch, cfg.optim.batch_size, world_size, iters, start_step, num_workers,
    )
    return TrainLoader(loader, sampler), iters


def build_eval_datasets(cfg: POAConfig) -> Tuple[Dataset, Dataset, int]:
    """``(train, val, num_classes)`` of ``(tensor, label)`` for k-NN evaluation.

    digits: the fixed 80/20 split at ``data.digits_size`` (eval size = digits
    size); imagefolder: ``root/train`` and ``root/val`` at ``eval.image_size``.
    """
    kind = cfg.data.dataset
    if kind == "digits":
        size = cfg.data.digits_size
        tf = EvalTransform(size)
        return (
            TransformedDataset(DigitsDataset("train", size), tf),
            TransformedDataset(DigitsDataset("val", size), tf),
            10,
        )
    if kind == "imagefolder":
        root = _require_root(cfg, "folder with train/ and val/ subfolders")
        missing = [s for s in ("train", "val") if not (root / s).is_dir()]
        if missing:
            raise ConfigError(
                f"key 'data.root': k-NN evaluation needs '{root}/train' and '{root}/val'; missing {missing}"
            )
        train, val = ImageFolderDataset(root / "train"), ImageFolderDataset(root / "val")
        if val.classes != train.classes:
            extra = sorted(set(val.classes) - set(train.classes))
            if extra:
                raise ValueError(f"'{root}/val' has classes absent from '{root}/train': {extra[:5]}")
            # val lacks some classes: re-index its labels onto the train class list
            val.samples = [(p, train.class_to_idx[val.classes[t]]) for p, t in val.samples]
            val.targets = [t for _, t in val.samples]
            val.classes, val.class_to_idx = train.classes, train.class_to_idx
        tf = EvalTransform(cfg.eval.image_size)
        return TransformedDataset(train, tf), TransformedDataset(val, tf), len(train.classes)
    raise ConfigError(
        f"key 'data.dataset': k-NN evaluation needs labelled train/val splits, which {kind!r} does not provide "
        "(use 'imagefolder' with root/train and root/val, or 'digits')"
    )
