"""Image sources and robust loading.

Base datasets return ``(PIL RGB image, int label)`` and *raise* on an unreadable
file.  :class:`RobustDataset` turns a failure into "skip and count": it logs a
warning naming the file, substitutes the next index so batch shapes stay fixed,
and reports how many items it skipped so the collate can sum them into
``batch["n_skipped"]``.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from poa_hpc.errors import ConfigError, DataError

from .registry import register_dataset
from .transforms import to_rgb

__all__ = [
    "IMG_EXTENSIONS",
    "load_image",
    "FolderDataset",
    "ImageFolderDataset",
    "pillow_extensions",
    "FileListDataset",
    "DigitsDataset",
    "LoadedItem",
    "RobustDataset",
    "TransformedDataset",
]

logger = logging.getLogger(__name__)

IMG_EXTENSIONS: Tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

PathLike = Union[str, os.PathLike]


def load_image(path: PathLike) -> Image.Image:
    """Open and *fully decode* an image as RGB.

    ``Image.open`` is lazy; the explicit ``load()`` makes truncated or corrupt
    files raise here, inside the caller's ``try``, rather than later inside a
    transform.  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is deliberately left off.
    """
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
        return to_rgb(img)


class _PathSamples(Dataset):
    """A list of ``(path, label)`` decoded on access; bad files raise (the robust wrapper skips them)."""

    samples: List[Tuple[str, int]]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        path, target = self.samples[index]
        return load_image(path), target

    def describe(self, index: int) -> str:
        return self.samples[index][0]

    def read_bytes(self, index: int) -> bytes:
        """The encoded file of item ``index`` (what the DALI loaders decode)."""
        with open(self.samples[index][0], "rb") as f:
            return f.read()

    @property
    def labels(self) -> List[int]:
        return [t for _, t in self.samples]


class ImageFolderDataset(_PathSamples):
    """ImageNet layout: ``root/<class>/**/<image>``; classes sorted by name.

    Extensions (case-insensitive): .jpg .jpeg .png .bmp .webp.  Hidden entries
    are ignored.  Items are ``(PIL RGB image, class index)``; unreadable files
    raise (wrap in :class:`RobustDataset` to skip them).
    """

    def __init__(self, root: PathLike, extensions: Sequence[str] = IMG_EXTENSIONS) -> None:
        self.root = str(root)
        base = Path(root)
        if not base.is_dir():
            raise FileNotFoundError(f"key 'data.root': '{self.root}' does not exist or is not a directory")
        exts = tuple(e.lower() for e in extensions)
        self.classes: List[str] = sorted(
            d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        if not self.classes:
            raise DataError(
                f"key 'data.root': '{self.root}' has no class subfolders, which data.dataset=imagefolder needs "
                "(root/<class>/<image>); for a folder of unlabelled images use data.dataset=folder"
            )
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: List[Tuple[str, int]] = []
        for cls in self.classes:
            for dirpath, dirnames, filenames in os.walk(base / cls, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if not name.startswith(".") and name.lower().endswith(exts):
                        self.samples.append((os.path.join(dirpath, name), self.class_to_idx[cls]))
        if not self.samples:
            raise DataError(
                f"key 'data.root': '{self.root}' contains no images with extensions {list(exts)} in its class "
                "subfolders; point data.root at a folder of images"
            )
        self.targets: List[int] = [t for _, t in self.samples]



# Pillow formats whose files need an external program or plugin to decode (not photos anyway).
_NOT_PHOTOS = {"EPS", "HDF5", "FITS", "GRIB", "BUFR", "WMF", "MPEG", "PDF", "XVTHUMB"}


@functools.lru_cache(maxsize=1)
def pillow_extensions() -> Tuple[str, ...]:
    """Lower-case extensions of every raster format Pillow can open (``.jpg``, ``.png``, ``.webp``, ``.tif``, ...)."""
    Image.init()
    return tuple(sorted(ext.lower() for ext, fmt in Image.registered_extensions().items()
                        if fmt in Image.OPEN and fmt not in _NOT_PHOTOS))


def scan_images(root: PathLike, extensions: Sequence[str]) -> Tuple[List[str], int]:
    """Every file under ``root`` (recursively, sorted, following links, hidden entries skipped) whose
    extension is in ``extensions``; and how many other files were passed over."""
    exts = tuple(e.lower() for e in extensions)
    found: List[str] = []
    others = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if name.lower().endswith(exts):
                found.append(os.path.join(dirpath, name))
            else:
                others += 1
    return found, others


class FolderDataset(_PathSamples):
    """Every image under ``root``, recursively (any extension Pillow opens); no labels needed.

    When every image lies in a subfolder of ``root`` (``root/<class>/**/<image>``),
    the subfolders' names, sorted, are the classes and each image's label is its
    class index (used by evaluation); otherwise every label is ``-1``.  Items are
    ``(PIL RGB image, label)`` in sorted path order (the order ``poa data pack``
    writes them); unreadable files raise (:class:`RobustDataset` skips them).
    """

    def __init__(self, root: PathLike, extensions: Optional[Sequence[str]] = None) -> None:
        self.root = str(root)
        base = Path(root)
        if not base.is_dir():
            raise DataError(f"key 'data.root': '{self.root}' does not exist or is not a directory")
        exts = tuple(extensions) if extensions is not None else pillow_extensions()
        paths, others = scan_images(base, exts)
        if not paths:
            what = f" ({others} file(s) of other types)" if others else " (it is empty)"
            raise DataError(
                f"key 'data.root': no image files under '{self.root}'{what}; point data.root at a folder of "
                "images (.jpg, .png, .webp, ... in any subfolder)")
        prefix = len(str(base).rstrip(os.sep)) + 1
        tops = [p[prefix:].split(os.sep, 1) for p in paths]
        labelled = all(len(t) == 2 for t in tops)
        self.classes: List[str] = sorted({t[0] for t in tops}) if labelled else []
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: List[Tuple[str, int]] = [
            (p, self.class_to_idx[t[0]] if labelled else -1) for p, t in zip(paths, tops)]
        self.targets: List[int] = [t for _, t in self.samples]
        self.n_other_files = others


class FileListDataset(_PathSamples):
    """A text file with one image per line: ``path`` or ``path label``.

    Relative paths are resolved against the list file's folder; blank lines and
    lines starting with ``#`` are ignored.  Unlabelled items get label ``-1``.
    Paths may contain spaces: the last token is a label only if it is an int.
    Files are not checked up front (a listing may hold millions of entries on a
    network file system); missing ones fail at load time and get skipped.
    """

    def __init__(self, list_file: PathLike) -> None:
        self.root = str(list_file)
        path = Path(list_file)
        if not path.is_file():
            raise FileNotFoundError(f"key 'data.root': list file '{self.root}' does not exist")
        base = path.resolve().parent
        self.samples: List[Tuple[str, int]] = []
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"key 'data.root': list file '{self.root}' cannot be read as text ({exc}); "
                            "data.dataset=filelist needs one image path per line") from None
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            item, label = line, -1
            parts = line.rsplit(None, 1)
            if len(parts) == 2:
                try:
                    label = int(parts[1])
                    item = parts[0]
                except ValueError:
                    pass
            p = Path(item).expanduser()
            self.samples.append((str(p if p.is_absolute() else base / p), label))
        if not self.samples:
            raise DataError(f"key 'data.root': list file '{self.root}' lists no images (one path per line)")
        self.targets: List[int] = [t for _, t in self.samples]



@functools.lru_cache(maxsize=1)
def _digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as uint8 (0..16 mapped to 0..255)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


def digits_split_indices(split: str, seed: int = 0, train_fraction: float = 0.8) -> np.ndarray:
    """Deterministic stratified split: per class, a seeded permutation, first 80 % train."""
    if split not in ("train", "val", "all"):
        raise ValueError(f"DigitsDataset: split must be 'train', 'val' or 'all', got {split!r}")
    _, targets = _digits_arrays()
    if split == "all":
        return np.arange(len(targets))
    rng = np.random.default_rng(seed)
    chosen: List[np.ndarray] = []
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        n_train = int(round(train_fraction * len(idx)))
        chosen.append(idx[:n_train] if split == "train" else idx[n_train:])
    return np.sort(np.concatenate(chosen))


class DigitsDataset(Dataset):
    """The demo's real data: 1797 8x8 handwritten digits (10 classes), no download.

    Each image is upscaled (bicubic) to ``size x size`` and returned as an RGB
    PIL image with its digit label.  ``split`` is 'train' (~80 %, 1438 images),
    'val' (~20 %, 359) or 'all'; the split is stratified and fixed by ``seed``.
    """

    def __init__(self, split: str = "train", size: int = 32, seed: int = 0) -> None:
        self.split = split
        self.size = int(size)
        self.root = f"sklearn.datasets.load_digits[{split}]"
        self.indices = digits_split_indices(split, seed)
        images, targets = _digits_arrays()
        self._images = images[self.indices]
        self.targets: List[int] = targets[self.indices].tolist()
        self.classes: List[str] = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        img = Image.fromarray(self._images[index])  # 2-D uint8 -> mode "L"
        if self.size != img.width:
            img = img.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return img.convert("RGB"), self.targets[index]

    def describe(self, index: int) -> str:
        return f"{self.root}#{index}"


class LoadedItem(NamedTuple):
    image: Image.Image
    label: int
    index: int  # the index actually loaded (differs from the request after a skip)
    n_skipped: int  # unreadable items skipped to get here


class RobustDataset(Dataset):
    """Skip-and-count wrapper: an unreadable item never crashes training.

    On failure it logs one warning naming the file (once per file per process,
    so a bad file does not spam every epoch), then tries ``(i + 1) % n``; after
    ``max_tries`` consecutive failures it raises a ``RuntimeError`` naming the
    dataset root (something systemic, e.g. an unmounted file system).
    Substituting keeps every batch full so shapes stay fixed.
    """

    def __init__(self, dataset: Dataset, max_tries: int = 32) -> None:
        self.dataset = dataset
        self.max_tries = max(1, int(max_tries))
        self.root = str(getattr(dataset, "root", type(dataset).__name__))
        self.n_skipped_total = 0  # per process; the per-batch count travels in the samples
        self._warned: Set[str] = set()

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def describe(self, index: int) -> str:
        describe = getattr(self.dataset, "describe", None)
        return describe(index) if describe is not None else f"{self.root}[{index}]"

    def __getitem__(self, index: int) -> LoadedItem:
        n = len(self)
        tries = min(self.max_tries, n)
        last_exc: Optional[BaseException] = None
        for k in range(tries):
            i = (index + k) % n
            try:
                image, label = self.dataset[i]
            except Exception as exc:  # any decode/IO failure: skip, count, move on
                last_exc = exc
                self.n_skipped_total += 1
                name = self.describe(i)
                if name not in self._warned:
                    self._warned.add(name)
                    logger.warning("skipping unreadable image %s (%s: %s)", name, type(exc).__name__, exc)
                continue
            return LoadedItem(image, int(label), i, k)
        raise RuntimeError(
            f"dataset '{self.root}': {tries} consecutive items starting at index {index} could not be "
            f"loaded; last error: {type(last_exc).__name__}: {last_exc}"
        ) from last_exc


class TransformedDataset(Dataset):
    """``(transform(image), label)`` over a robust source; used for k-NN evaluation."""

    def __init__(self, dataset: Dataset, transform: Callable[[Image.Image], Any]) -> None:
        self.source = dataset if isinstance(dataset, RobustDataset) else RobustDataset(dataset)
        self.transform = transform
        self.root = self.source.root

    @property
    def targets(self) -> Optional[List[int]]:
        return getattr(self.source.dataset, "targets", None)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        item = self.source[index]
        return self.transform(item.image), item.label


# --------------------------------------------------------------------------- the registered datasets


def require_root(cfg: Any, kind: str, root: Optional[str] = None, key: str = "data.root") -> Path:
    """``data.root`` (or ``root``) as an existing path, else a one-line error naming ``key``."""
    root = cfg.data.root if root is None else root
    if not root:
        raise ConfigError(f"key '{key}': empty, but data.dataset={cfg.data.dataset!r} needs a {kind}")
    path = Path(root).expanduser()
    if not path.exists():
        raise ConfigError(f"key '{key}': '{root}' does not exist (data.dataset={cfg.data.dataset!r} needs a {kind})")
    return path


def _train_dir(cfg: Any, kind: str) -> Path:
    root = require_root(cfg, kind)
    if not root.is_dir():
        raise DataError(f"key 'data.root': '{root}' is not a directory (data.dataset={cfg.data.dataset!r})")
    return root / "train" if (root / "train").is_dir() else root


def _labelled_split(cfg: Any, root: Path, split: str) -> _PathSamples:
    ds = FolderDataset(root / split)
    if not ds.classes:
        raise DataError(f"key 'data.eval_root': '{root / split}' has images outside class subfolders; "
                        "evaluation needs labelled images as <root>/{train,val}/<class>/<image>")
    return ds


@register_dataset("folder")
class _Folder:
    """Every image under `data.root`, recursively (any format Pillow opens); unlabelled is fine. With class
    subfolders their names are the labels (evaluation); a `train/` subfolder, if any, is what trains."""

    @staticmethod
    def build(cfg: Any) -> Dataset:
        return FolderDataset(_train_dir(cfg, "folder of images"))

    eval_split = staticmethod(_labelled_split)


@register_dataset("imagefolder")
class _ImageFolder:
    """ImageNet layout: `data.root/<class>/**/<image>` (or `data.root/train/<class>/...`); a root without class
    subfolders is an error naming `data.dataset=folder`."""

    @staticmethod
    def build(cfg: Any) -> Dataset:
        return ImageFolderDataset(_train_dir(cfg, "folder in ImageNet layout"))

    @staticmethod
    def eval_split(cfg: Any, root: Path, split: str) -> Dataset:
        return ImageFolderDataset(root / split)


@register_dataset("filelist")
class _FileList:
    """A text file at `data.root` listing one image per line (`path` or `path label`); relative paths are read from the file's folder."""

    @staticmethod
    def build(cfg: Any) -> Dataset:
        root = require_root(cfg, "text file listing one image per line")
        if not root.is_file():
            raise DataError(f"key 'data.root': '{root}' is not a file (data.dataset='filelist' needs a text file "
                            "listing one image per line)")
        return FileListDataset(root)


@register_dataset("digits")
class _Digits:
    """scikit-learn's 1,797 handwritten digits, upscaled to `data.digits_size` (the demo; no download, no `data.root`)."""

    @staticmethod
    def build(cfg: Any) -> Dataset:
        return DigitsDataset("train", cfg.data.digits_size)

    @staticmethod
    def eval_split(cfg: Any, root: Any, split: str) -> Dataset:
        return DigitsDataset(split, cfg.data.digits_size)
