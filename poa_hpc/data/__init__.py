"""Data pipeline: multi-crop augmentation, datasets, iBOT masks, deterministic loader.

Names are imported lazily (PEP 562) so that :mod:`poa_hpc.config` can read the
dataset registry (:mod:`poa_hpc.data.registry`) without importing the loaders.
"""

import importlib
from typing import Any

_WHERE = {
    "MultiCropCollator": "collate", "build_collator": "collate", "collate_multicrop": "collate",
    "IMG_EXTENSIONS": "datasets", "DigitsDataset": "datasets", "FileListDataset": "datasets",
    "FolderDataset": "datasets", "ImageFolderDataset": "datasets", "LoadedItem": "datasets",
    "RobustDataset": "datasets", "TransformedDataset": "datasets", "load_image": "datasets",
    "SampleKey": "samplers", "StepBatchSampler": "samplers", "compute_iters_per_epoch": "samplers",
    "TrainLoader": "loader", "build_eval_datasets": "loader", "build_train_dataset": "loader",
    "build_train_loader": "loader", "check_train_data": "loader",
    "ShardsDataset": "shards", "register_dataset": "registry", "dataset_names": "registry",
    "MaskingGenerator": "masking",
    "IMAGENET_MEAN": "transforms", "IMAGENET_STD": "transforms", "EvalTransform": "transforms",
    "MultiCropAugmentation": "transforms", "build_multicrop": "transforms", "derive_seed": "transforms",
    "seeded_rng": "transforms",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'poa_hpc.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_WHERE))
