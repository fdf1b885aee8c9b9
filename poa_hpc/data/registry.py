"""Datasets as plug-ins: ``data.dataset`` names one registered :class:`DatasetSpec`.

    from poa_hpc.data.registry import register_dataset

    @register_dataset("folder")
    class FolderSpec:
        '''Every image under data.root, recursively; no labels needed.'''  # first line: docs/--help
        config_cls = None          # or a dataclass: its fields become the ``data.<name>`` section

        @staticmethod
        def build(cfg): ...        # the training source: (PIL RGB image, label) items, len()

        @staticmethod
        def eval_split(cfg, root, split): ...   # optional: a labelled split for k-NN evaluation

The allowed values of ``data.dataset``, the ``data.<name>`` config sections,
:func:`poa_hpc.data.loader.build_train_dataset`, the evaluation loaders and the
dataset table of the docs all come from this registry (like
:func:`poa_hpc.models.registry.register_backbone` for ``model.arch``).  A
dataset module registers itself when imported; :func:`load_datasets` imports the
built-in ones.  Dataset modules must not import :mod:`poa_hpc.config` at module
level (the config schema is built from this registry).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["DatasetSpec", "register_dataset", "get_dataset", "dataset_names", "load_datasets", "dataset_table"]

# The modules that register the built-in datasets.
BUILTIN_MODULES = ("poa_hpc.data.datasets", "poa_hpc.data.shards")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    build: Callable[[Any], Any]
    #: the ``data.<name>`` section (a dataclass) or None
    config_cls: Optional[type] = None
    #: ``(cfg, root, split) -> dataset`` of labelled items for k-NN evaluation, or None (then
    #: evaluation needs ``data.eval_root``, a folder in ImageNet layout)
    eval_split: Optional[Callable[[Any, Any, str], Any]] = None


_REGISTRY: Dict[str, DatasetSpec] = {}
_LOADED = False


def register_dataset(name: str) -> Callable[[type], type]:
    """Class decorator: register ``cls.build`` (and optional ``config_cls``, ``eval_split``) as ``name``."""

    def wrap(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"dataset '{name}' is registered twice")
        doc = (cls.__doc__ or "").strip()
        _REGISTRY[name] = DatasetSpec(
            name=name, description=" ".join(ln.strip() for ln in doc.split("\n\n")[0].splitlines()) if doc else "", build=cls.build,
            config_cls=getattr(cls, "config_cls", None), eval_split=getattr(cls, "eval_split", None))
        return cls

    return wrap


def load_datasets() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def dataset_names() -> Tuple[str, ...]:
    load_datasets()
    return tuple(_REGISTRY)


def get_dataset(name: str) -> DatasetSpec:
    load_datasets()
    try:
        return _REGISTRY[name]
    except KeyError:
        from poa_hpc.errors import ConfigError

        raise ConfigError(f"key 'data.dataset': unknown dataset {name!r}; registered: {list(_REGISTRY)}") from None


def dataset_table() -> str:
    """The registered datasets as a Markdown table (for the docs)."""
    load_datasets()
    rows = ["| `data.dataset` | what it reads | config section | k-NN eval without `data.eval_root` |",
            "|---|---|---|---|"]
    for spec in _REGISTRY.values():
        section = f"`data.{spec.name}`" if spec.config_cls else "-"
        rows.append(f"| `{spec.name}` | {spec.description} | {section} | {'yes' if spec.eval_split else 'no'} |")
    return "\n".join(rows)
