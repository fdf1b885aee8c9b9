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
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from poa_hpc.errors import ConfigError, DataError

from .collate import MultiCropCollator, build_collator
from .datasets import RobustDataset, TransformedDataset, require_root
from .registry import get_dataset
from .samplers import SampleKey, StepBatchSampler, compute_iters_per_epoch
from .transforms import EvalTransform, build_multicrop, build_view_specs, derive_seed, seeded_rng

if TYPE_CHECKING:  # pragma: no cover
    from poa_hpc.config import POAConfig

__all__ = [
    "SampleKey",
    "StepBatchSampler",
    "MultiCropTrainDataset",
    "TrainLoader",
    "compute_iters_per_epoch",
    "build_train_dataset",
    "build_train_loader",
    "build_eval_datasets",
    "check_train_data",
]

logger = logging.getLogger(__name__)

AUG_STREAM = 0x41554721  # "AUG!"
LOADER_STREAM = 0x4C4F4144  # "LOAD": DataLoader's own base seed (unused by our samples)


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

    def __iter__(self) -> TrainLoader:
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


def build_train_dataset(cfg: POAConfig) -> Dataset:
    """The raw ``(PIL image, label)`` training source of the registered dataset ``cfg.data.dataset``."""
    return get_dataset(cfg.data.dataset).build(cfg)


def check_train_data(cfg: POAConfig, world_size: int = 1, dataset: Optional[Dataset] = None) -> Dataset:
    """Every check on the user's data that can fail before training, as one-line :class:`DataError` s.

    Builds the dataset (root exists, has images, the shard index is readable and
    every shard has the size and hash it was packed with) and checks that one
    global batch fits in it; returns the dataset for :func:`build_train_loader`.
    Call it before the process group exists: a data problem then ends every rank
    at once with exit code 2 (not requeued) instead of one rank crashing.
    """
    _check_data_keys(cfg)
    raw = dataset if dataset is not None else build_train_dataset(cfg)
    compute_iters_per_epoch(len(raw), cfg.optim.batch_size * world_size, cfg.optim.iters_per_epoch)  # type: ignore[arg-type]
    if cfg.data.loader != "torch" and not hasattr(raw, "read_bytes"):
        raise ConfigError(
            f"key 'data.loader': {cfg.data.loader!r} decodes encoded images, but data.dataset={cfg.data.dataset!r} "
            "holds its images in memory; use data.loader=torch for it"
        )
    _check_decodable(raw)
    return raw


def _check_data_keys(cfg: POAConfig) -> None:
    d = cfg.data
    for key in ("global_size", "local_size"):
        if getattr(d, key) < 1:
            raise ConfigError(f"key 'data.{key}': {getattr(d, key)} must be >= 1 pixel")
    for key in ("n_local", "num_workers"):
        if getattr(d, key) < 0:
            raise ConfigError(f"key 'data.{key}': {getattr(d, key)} must be >= 0")
    for kind in ("global", "local"):
        lo, hi = getattr(d, f"{kind}_scale_min"), getattr(d, f"{kind}_scale_max")
        if not (0 < lo <= hi <= 1):
            raise ConfigError(f"key 'data.{kind}_scale_min': the crop scales ({lo}, {hi}) must satisfy "
                              f"0 < data.{kind}_scale_min <= data.{kind}_scale_max <= 1")


def _check_decodable(raw: Dataset, n: int = 16) -> None:
    """At least one of ``n`` images spread over the dataset decodes (stops at the first that does).

    Single unreadable images are skipped during training; a dataset of which none
    decodes (files with image extensions that are not images, a wrong format)
    would only skip until :class:`RobustDataset` gives up mid-run, so it is an
    error here, before training.
    """
    describe = getattr(raw, "describe", None)
    if describe is None:  # in-memory datasets (digits)
        return
    size = len(raw)  # type: ignore[arg-type]
    picks = sorted({int(i) for i in torch.linspace(0, size - 1, min(n, size)).round().tolist()})
    failures = []
    for i in picks:
        try:
            raw[i]
            return
        except Exception as exc:  # any decode/IO failure
            failures.append((describe(i), f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
    name, why = failures[0]
    raise DataError(
        f"key 'data.root': none of {len(picks)} images sampled across '{getattr(raw, 'root', '?')}' could be decoded "
        f"(e.g. {name}: {why}); point data.root at readable images (`poa data pack` lists and skips unreadable ones)"
    )


class _Described:
    """The names of a dataset's items, as a sequence (what the DALI loader reports a bad file by)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> str:
        return self.dataset.describe(index)


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
    loader = DaliMultiCropLoader(
        _Described(dataset),
        dataset.labels,  # type: ignore[attr-defined]
        sampler,
        build_view_specs(cfg),
        build_collator(cfg, global_batch=global_batch),
        seed=cfg.train.seed,
        device="gpu" if kind == "dali" else "cpu",
        num_threads=max(1, int(cfg.data.num_workers)),
        root=str(getattr(dataset, "root", "")),
        read=dataset.read_bytes,  # type: ignore[attr-defined]
    )
    logger.info(
        "train data (DALI %s): %s, %d images, global batch %d, %d iters/epoch, start step %d, %d threads",
        "GPU" if kind == "dali" else "CPU", getattr(dataset, "root", "?"), len(dataset), global_batch,  # type: ignore[arg-type]
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
    raw = check_train_data(cfg, world_size, dataset)
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

    With ``data.eval_root``: ``eval_root/train`` and ``eval_root/val`` with class
    subfolders (ImageNet layout), whatever ``data.dataset`` trains on.  Without:
    the registered dataset's own labelled splits (digits: the fixed 80/20 split at
    ``data.digits_size``; imagefolder and folder: ``root/train`` and ``root/val``),
    at ``eval.image_size``.
    """
    kind = cfg.data.dataset
    spec = get_dataset(kind)
    if cfg.data.eval_root:
        root = require_root(cfg, "labelled folder with train/ and val/ class subfolders", cfg.data.eval_root,
                            key="data.eval_root")
        split, key = get_dataset("folder").eval_split, "data.eval_root"
    elif spec.eval_split is not None:
        root, split, key = (None if kind == "digits" else require_root(cfg, "folder with train/ and val/ subfolders"),
                            spec.eval_split, "data.root")
    else:
        raise ConfigError(
            f"key 'data.eval_root': k-NN evaluation needs labelled train/val splits, which data.dataset={kind!r} "
            "does not provide; set data.eval_root to a folder with train/<class>/ and val/<class>/ images"
        )
    if root is None:  # digits
        size = cfg.data.digits_size
        train, val = split(cfg, None, "train"), split(cfg, None, "val")
        tf = EvalTransform(size)
        return TransformedDataset(train, tf), TransformedDataset(val, tf), 10
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise DataError(f"key '{key}': k-NN evaluation needs '{root}/train' and '{root}/val'; missing {missing}")
    train, val = split(cfg, root, "train"), split(cfg, root, "val")
    if val.classes != train.classes:
        extra = sorted(set(val.classes) - set(train.classes))
        if extra:
            raise DataError(f"key '{key}': '{root}/val' has classes absent from '{root}/train': {extra[:5]}")
        # val lacks some classes: re-index its labels onto the train class list
        val.samples = [(p, train.class_to_idx[val.classes[t]]) for p, t in val.samples]
        val.targets = [t for _, t in val.samples]
        val.classes, val.class_to_idx = train.classes, train.class_to_idx
    tf = EvalTransform(cfg.eval.image_size)
    return TransformedDataset(train, tf), TransformedDataset(val, tf), len(train.classes)
