"""Packed shards: tar files in WebDataset layout plus an index, read one sample with one ``pread``.

``poa data pack SRC -o DIR`` (:mod:`poa_hpc.data.pack`) writes::

    DIR/shard-000000.tar   members 000000000.jpg [000000000.cls] 000000001.png ...  (WebDataset layout:
    DIR/shard-000001.tar   one sample = the members sharing a key; other tools read these tars as they are)
    DIR/index.npy          int64 (n, 4): shard number, byte offset of the image's data, its size, label
    DIR/index.json         format, classes, per shard (name, size, samples, check), the pack summary

Sample ``i`` of the ``shards`` dataset is image ``i`` of the sorted listing of
``SRC`` the ``folder`` dataset makes (minus the files the pack skipped as
unreadable), read with one ``os.pread(fd, size, offset)`` on a shard kept open
per process: so the loaders' determinism contract (which images at which step
and rank; see :mod:`poa_hpc.data.loader`) is the same as for files, and a step
reads the same bytes from shards as from the folder they were packed from.

Before training, every shard's size and a hash of four 16 KiB blocks of it are
compared with the index (:func:`verify_shards`), so a shard truncated or
rewritten since packing is a one-line :class:`~poa_hpc.errors.DataError`, not a
crash in the middle of an epoch.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from poa_hpc.errors import ConfigError, DataError

from .registry import register_dataset
from .transforms import derive_seed, to_rgb

__all__ = ["ShardsConfig", "ShardsDataset", "MixedDataset", "shard_check", "verify_shards", "read_index",
           "INDEX_JSON", "INDEX_NPY", "FORMAT"]

logger = logging.getLogger(__name__)

FORMAT = "poa_hpc.shards"
VERSION = 1
INDEX_JSON = "index.json"
INDEX_NPY = "index.npy"
MIX_STREAM = 0x4D495821  # "MIX!": the fixed subset a down-weighted shard root contributes
_CHECK_BLOCK = 1 << 14


@dataclass
class ShardsConfig:
    # Shard folders written by `poa data pack` mixed in one dataset; empty: data.root alone.
    roots: List[str] = field(default_factory=list)
    # Relative weight of each root (same length as roots; empty: each root's size, i.e. every image once).
    weights: List[float] = field(default_factory=list)
    # Compare every shard's size and sampled-block hash with the index before training.
    verify: bool = True


def shard_check(path: str | os.PathLike, size: int) -> str:
    """Hash (blake2b, 16 hex digits) of the size and four 16 KiB blocks spread over the file."""
    h = hashlib.blake2b(str(size).encode(), digest_size=8)
    fd = os.open(path, os.O_RDONLY)
    try:
        starts = sorted({0, max(0, size // 3), max(0, 2 * size // 3), max(0, size - _CHECK_BLOCK)})
        for start in starts:
            h.update(os.pread(fd, _CHECK_BLOCK, start))
    finally:
        os.close(fd)
    return h.hexdigest()


def read_index(root: str | os.PathLike, key: str = "data.root") -> Tuple[Dict[str, Any], np.ndarray]:
    """``(index.json, index.npy as a read-only memory map)`` of a shard folder; a one-line error if unreadable."""
    root = Path(root)
    meta_path, arr_path = root / INDEX_JSON, root / INDEX_NPY
    if not root.is_dir():
        raise DataError(f"key '{key}': '{root}' does not exist or is not a directory (data.dataset=shards needs a "
                        "folder written by `poa data pack`)")
    if not meta_path.is_file():
        partial = " (an interrupted pack: run the same `poa data pack` again to finish it)" if any(
            root.glob("shard-*.json")) else ""
        raise DataError(f"key '{key}': '{root}' has no {INDEX_JSON}{partial}; data.dataset=shards reads a folder "
                        "written by `poa data pack SRC -o DIR` (or use data.dataset=folder for images)")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        arr = np.load(arr_path, mmap_mode="r")
        if arr.ndim != 2 or arr.shape[1] != 4 or arr.shape[0] != int(meta["n_samples"]):
            raise ValueError(f"{INDEX_NPY} has shape {arr.shape}, expected ({meta['n_samples']}, 4)")
        if arr.shape[0] and int(arr[:, 0].max()) >= len(meta["shards"]):
            raise ValueError("it names a shard the index does not list")
    except Exception as exc:  # JSON, numpy and key errors alike: the index is unusable
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"key '{key}': the shard index in '{root}' is unreadable ({msg}); pack the images again "
                        "with `poa data pack`") from None
    return meta, arr


def verify_shards(root: str | os.PathLike, meta: Dict[str, Any], key: str = "data.root") -> None:
    """Every shard exists with the size and sampled-block hash the index recorded; else a one-line DataError."""
    root = Path(root)
    for sh in meta["shards"]:
        path = root / sh["name"]
        try:
            size = path.stat().st_size
        except OSError:
            raise DataError(f"key '{key}': shard '{path}' listed in the index is missing; restore it or pack the "
                            "images again with `poa data pack`") from None
        if size != int(sh["size"]):
            raise DataError(f"key '{key}': shard '{path}' is {size} bytes, the index recorded {sh['size']} (truncated "
                            "or changed since packing); restore it or pack the images again with `poa data pack`")
        if shard_check(path, size) != sh["check"]:
            raise DataError(f"key '{key}': shard '{path}' changed since packing (its content hash differs from the "
                            "index); restore it or pack the images again with `poa data pack`")


class ShardsDataset(Dataset):
    """The samples of one packed shard folder: ``(PIL RGB image, label)``; unreadable ones raise.

    ``read_bytes(i)`` is one ``os.pread`` on the shard's file descriptor (opened
    once per process, so an epoch opens each shard once instead of every image).
    """

    def __init__(self, root: str | os.PathLike, verify: bool = True, key: str = "data.root") -> None:
        self.root = str(root)
        self.meta, self.index = read_index(root, key)
        if verify:
            verify_shards(root, self.meta, key)
        self.shard_paths = [os.path.join(self.root, sh["name"]) for sh in self.meta["shards"]]
        self.classes: List[str] = list(self.meta.get("classes") or [])
        self._fds: Dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def labels(self) -> List[int]:
        return self.index[:, 3].tolist()

    targets = labels

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker: its own descriptors (cheap, and no shared state)
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shard_paths[shard], os.O_RDONLY)
        return fd

    def read_bytes(self, index: int) -> bytes:
        shard, offset, size, _ = (int(x) for x in self.index[index])
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes (shard truncated?)")
        return data

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        data = self.read_bytes(index)
        img = Image.open(io.BytesIO(data))
        img.load()
        return to_rgb(img), int(self.index[index, 3])

    def describe(self, index: int) -> str:
        shard, offset = int(self.index[index, 0]), int(self.index[index, 1])
        return f"{self.shard_paths[shard]}@{offset}"

    def __getstate__(self) -> Dict[str, Any]:  # spawned workers reopen their own shards
        state = dict(self.__dict__)
        state["_fds"], state["_pid"] = {}, -1
        return state

    def __del__(self) -> None:  # pragma: no cover - best effort
        if getattr(self, "_pid", None) == os.getpid():
            for fd in getattr(self, "_fds", {}).values():
                try:
                    os.close(fd)
                except OSError:
                    pass


class MixedDataset(Dataset):
    """Several shard folders as one dataset, each taking a share of the index space by weight.

    The length is the total number of samples; root ``r`` gets
    ``round(n * w_r / sum(w))`` slots.  Slot ``k`` of root ``r`` reads its sample
    ``k mod n_r`` (an up-weighted root repeats whole passes), through a fixed
    seeded permutation of the root when it gets fewer slots than it has samples
    (a down-weighted root contributes a fixed random subset).  The mapping is a
    pure function of the index, so the sampler's contract holds unchanged.
    Labels are ``-1`` (the roots' classes are unrelated).
    """

    def __init__(self, parts: Sequence[ShardsDataset], weights: Sequence[float]) -> None:
        self.parts = list(parts)
        sizes = np.array([len(p) for p in self.parts], dtype=np.int64)
        w = np.asarray(weights, dtype=np.float64)
        total = int(sizes.sum())
        slots = np.floor(total * w / w.sum()).astype(np.int64)
        slots[np.argmax(w)] += total - int(slots.sum())  # rounding: the largest weight takes the remainder
        self.slots = slots
        self.starts = np.concatenate([[0], np.cumsum(slots)])
        self._perms = [np.random.default_rng(derive_seed(0, MIX_STREAM, r)).permutation(int(n))
                       if slots[r] < n else None for r, n in enumerate(sizes)]
        self.root = "+".join(p.root for p in self.parts)
        self.classes: List[str] = []

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, index: int) -> Tuple[ShardsDataset, int]:
        r = int(np.searchsorted(self.starts, index, side="right") - 1)
        part, k = self.parts[r], int(index - self.starts[r])
        j = k % len(part)
        perm = self._perms[r]
        return part, int(perm[j]) if perm is not None else j

    @property
    def labels(self) -> List[int]:
        return [-1] * len(self)

    targets = labels

    def read_bytes(self, index: int) -> bytes:
        part, j = self.locate(index)
        return part.read_bytes(j)

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        part, j = self.locate(index)
        return part[j][0], -1

    def describe(self, index: int) -> str:
        part, j = self.locate(index)
        return part.describe(j)


@register_dataset("shards")
class _Shards:
    """Tar shards written by `poa data pack` (WebDataset layout + an index), one `pread` per image;
    `data.shards.roots`/`weights` mix several packs."""

    config_cls = ShardsConfig

    @staticmethod
    def build(cfg: Any) -> Dataset:
        sc = cfg.data.shards
        if not sc.roots:
            if not cfg.data.root:
                raise ConfigError("key 'data.root': empty, but data.dataset='shards' needs a folder written by "
                                  "`poa data pack` (or list several in data.shards.roots)")
            return ShardsDataset(Path(cfg.data.root).expanduser(), verify=sc.verify)
        if sc.weights and len(sc.weights) != len(sc.roots):
            raise ConfigError(f"key 'data.shards.weights': {len(sc.weights)} weight(s) for {len(sc.roots)} root(s) "
                              "in data.shards.roots; give one per root (or none)")
        if any(not (w > 0) for w in sc.weights):
            raise ConfigError(f"key 'data.shards.weights': {list(sc.weights)} must all be > 0")
        parts = [ShardsDataset(Path(r).expanduser(), verify=sc.verify, key=f"data.shards.roots[{i}]")
                 for i, r in enumerate(sc.roots)]
        if len(parts) == 1 and not sc.weights:
            return parts[0]
        return MixedDataset(parts, sc.weights or [len(p) for p in parts])
