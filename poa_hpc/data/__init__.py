"""Data pipeline: multi-crop augmentation, datasets, iBOT masks, deterministic loader."""

from .collate import MultiCropCollator, build_collator, collate_multicrop
from .datasets import (
    IMG_EXTENSIONS,
    DigitsDataset,
    FileListDataset,
    ImageFolderDataset,
    LoadedItem,
    RobustDataset,
    TransformedDataset,
    load_image,
)
from .loader import (
    SampleKey,
    StepBatchSampler,
    TrainLoader,
    build_eval_datasets,
    build_train_dataset,
    build_train_loader,
    compute_iters_per_epoch,
)
from .masking import MaskingGenerator
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    MultiCropAugmentation,
    build_multicrop,
    derive_seed,
    seeded_rng,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "DigitsDataset",
    "EvalTransform",
    "FileListDataset",
    "ImageFolderDataset",
    "LoadedItem",
    "MaskingGenerator",
    "MultiCropAugmentation",
    "MultiCropCollator",
    "RobustDataset",
    "SampleKey",
    "StepBatchSampler",
    "TrainLoader",
    "TransformedDataset",
    "build_collator",
    "build_eval_datasets",
    "build_multicrop",
    "build_train_dataset",
    "build_train_loader",
    "collate_multicrop",
    "compute_iters_per_epoch",
    "derive_seed",
    "load_image",
    "seeded_rng",
]
