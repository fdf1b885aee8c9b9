"""NVIDIA DALI multi-crop loader: nvJPEG decoding on the GPU, or DALI's CPU backend.

``data.loader=dali`` decodes with nvJPEG (DALI's ``mixed`` backend) and runs
every augmentation on the GPU; ``data.loader=dali_cpu`` runs the same graph on
DALI's CPU backend (no GPU needed, ``device_id=None``).  Both yield the batch
the torchvision loader yields (same keys, view-major crops, the same iBOT masks)
and keep its contract (see :mod:`poa_hpc.data.loader`):

* **which images**: the same :class:`~poa_hpc.data.samplers.StepBatchSampler`, so
  rank ``r`` of ``W`` reads the same files at step ``s`` as the torch loader;
* **how they are augmented**: every random decision (crop box, flip, jitter
  factors, grayscale, blur sigma, solarisation) is drawn on the host by
  :class:`ViewParamSampler` from ``(seed, step, position in the global
  batch)``; DALI only executes them.  A step's crops are therefore a pure
  function of the step, not of the pipeline's history, so a resumed run and a
  W-rank run see the crops a single uninterrupted process sees.  (They are not
  the torch loader's crops: the two draw their parameters differently.)
* **bad files** are skipped and counted as in the torch loader: the host reads
  each file's header (Pillow, no decode) and checks that a JPEG/PNG is complete
  before handing it to DALI; a bad file is replaced by the next index of the
  dataset and counted in ``batch["n_skipped"]``.  Should DALI still fail on a
  file the header check let through, the loader fully decodes that step's files
  on the host to find it, marks it bad, rebuilds the pipeline and redoes the
  step, so training never stops on a corrupt image.

The colour operations follow torchvision's definitions: brightness ``b`` then
contrast ``c`` around the mean luma (``b * (m + c * (x - m))``), saturation and
hue (DALI's ``hsv``, a linear transform in RGB), grayscale as saturation 0 (ITU-R
601 luma, as torchvision).  torchvision applies the four jitter operations in a
random order with a clamp after each; here the order is fixed, so individual
crops differ while the statistics match (a test compares them).
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from poa_hpc.errors import ConfigError

from .datasets import RobustDataset
from .samplers import StepBatchSampler
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ViewSpec, derive_seed

if TYPE_CHECKING:  # pragma: no cover
    from .collate import MultiCropCollator

__all__ = [
    "DaliUnavailable",
    "dali_available",
    "ViewParamSampler",
    "probe_image",
    "DaliMultiCropLoader",
    "EncodedImageFiles",
    "N_PARAMS",
]

logger = logging.getLogger(__name__)

DALI_AUG_STREAM = 0x44414C49  # "DALI": the per-sample parameter stream of the DALI loaders

# Per-view parameter vector (float32), drawn on the host, executed by DALI.
P_Y0, P_X0, P_Y1, P_X1 = 0, 1, 2, 3  # crop box in source pixels (DALI's roi order is (y, x))
P_FLIP = 4
P_BRIGHTNESS, P_CONTRAST, P_SATURATION, P_HUE_DEG = 5, 6, 7, 8  # saturation 0 = grayscale
P_BLUR, P_SIGMA = 9, 10
P_SOLARIZE = 11
N_PARAMS = 12

# Pillow format names DALI's decoders read; anything else is skipped as "not an image".
_DALI_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"}
_JPEG_EOI = b"\xff\xd9"
_PNG_IEND = b"IEND"
_MAX_TRAILER = 1 << 12  # bytes allowed after a JPEG's last end-of-image marker (padding)


class DaliUnavailable(ConfigError):
    """``data.loader`` asks for a DALI backend that cannot run here (a one-line error, like any bad config)."""


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


# --------------------------------------------------------------------------- host-side parameters


class ViewParamSampler:
    """Draws every view's random decisions for one image: a ``(n_views, N_PARAMS)`` float32 array.

    Same distributions as torchvision's transforms for each :class:`ViewSpec`:
    the crop box as ``RandomResizedCrop.get_params`` (ten tries at an area
    fraction ``U(scale)`` and a log-uniform aspect ratio, else the largest
    centred box with an aspect in ``ratio``), flip with ``p_flip``, with
    ``p_jitter`` brightness and contrast ``U(1 - x, 1 + x)``, saturation
    ``U(1 - s, 1 + s)`` and hue ``U(-h, h)`` turns (else identity), grayscale with
    ``p_gray``, blur with ``p_blur`` at sigma ``U(blur_sigma)``, solarisation with
    ``p_solarize``.  All of an image's views come from one draw of uniforms,
    vectorised over the views (a few microseconds per image on the host).
    """

    _U = 32  # uniforms per view: 10 areas, 10 log-ratios, top, left, flip, jitter, b, c, s, h, gray, blur, sigma, sol

    def __init__(self, specs: Sequence[ViewSpec]) -> None:
        self.specs = list(specs)

        def col(f: Any) -> np.ndarray:
            return np.array([f(sp) for sp in self.specs], dtype=np.float64)[:, None]

        self.scale_lo, self.scale_hi = col(lambda sp: sp.scale[0]), col(lambda sp: sp.scale[1])
        self.ratio_lo, self.ratio_hi = col(lambda sp: sp.ratio[0]), col(lambda sp: sp.ratio[1])
        self.p = {k: col(lambda sp, k=k: getattr(sp, k))[:, 0] for k in (
            "p_flip", "p_jitter", "brightness", "contrast", "saturation", "hue", "p_gray", "p_blur", "p_solarize")}
        self.sigma_lo, self.sigma_hi = col(lambda sp: sp.blur_sigma[0])[:, 0], col(lambda sp: sp.blur_sigma[1])[:, 0]

    def __call__(self, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
        return self.batch([(width, height)], [rng])[0]

    def batch(self, sizes: Sequence[Tuple[int, int]], rngs: Sequence[np.random.Generator]) -> np.ndarray:
        """``(B, n_views, N_PARAMS)`` for B images of ``sizes`` (width, height), image ``b`` drawn from ``rngs[b]``.

        Each image's decisions depend on its own generator only; the arithmetic
        is vectorised over the whole batch.
        """
        V = len(self.specs)
        u = np.stack([r.random((V, self._U)) for r in rngs])  # (B, V, U)
        wh = np.asarray(sizes, dtype=np.float64)
        W, H = wh[:, 0:1], wh[:, 1:2]  # (B, 1): broadcast over the views
        # crop box: the first of ten tries that fits, as torchvision
        area = (W * H)[..., None] * (self.scale_lo + (self.scale_hi - self.scale_lo) * u[..., 0:10])
        log_lo, log_hi = np.log(self.ratio_lo), np.log(self.ratio_hi)
        aspect = np.exp(log_lo + (log_hi - log_lo) * u[..., 10:20])
        w = np.round(np.sqrt(area * aspect))
        h = np.round(np.sqrt(area / aspect))
        ok = (w > 0) & (w <= W[..., None]) & (h > 0) & (h <= H[..., None])
        first = ok.argmax(axis=-1)[..., None]
        w, h = np.take_along_axis(w, first, -1)[..., 0], np.take_along_axis(h, first, -1)[..., 0]
        found = ok.any(axis=-1)
        top = np.floor(u[..., 20] * (H - h + 1))
        left = np.floor(u[..., 21] * (W - w + 1))
        if not found.all():  # centred fallback
            rmin, rmax = self.ratio_lo[:, 0], self.ratio_hi[:, 0]
            in_ratio = W / H
            fw = np.where(in_ratio < rmin, W, np.where(in_ratio > rmax, np.round(H * rmax), W))
            fh = np.where(in_ratio < rmin, np.round(W / rmin), H)
            w, h = np.where(found, w, fw), np.where(found, h, fh)
            top = np.where(found, top, np.floor((H - h) / 2))
            left = np.where(found, left, np.floor((W - w) / 2))
        P = np.zeros(u.shape[:2] + (N_PARAMS,), dtype=np.float32)
        P[..., P_Y0], P[..., P_X0], P[..., P_Y1], P[..., P_X1] = top, left, top + h, left + w
        p = self.p
        P[..., P_FLIP] = u[..., 22] < p["p_flip"]
        jitter = u[..., 23] < p["p_jitter"]
        P[..., P_BRIGHTNESS] = np.where(jitter, 1 + p["brightness"] * (2 * u[..., 24] - 1), 1.0)
        P[..., P_CONTRAST] = np.where(jitter, 1 + p["contrast"] * (2 * u[..., 25] - 1), 1.0)
        saturation = np.where(jitter, 1 + p["saturation"] * (2 * u[..., 26] - 1), 1.0)
        P[..., P_HUE_DEG] = np.where(jitter, 360.0 * p["hue"] * (2 * u[..., 27] - 1), 0.0)
        # grayscale after jitter: saturation 0 projects onto the luma axis
        P[..., P_SATURATION] = np.where(u[..., 28] < p["p_gray"], 0.0, saturation)
        blur = u[..., 29] < p["p_blur"]
        P[..., P_BLUR] = blur
        P[..., P_SIGMA] = np.where(blur, self.sigma_lo + (self.sigma_hi - self.sigma_lo) * u[..., 30], 0.0)
        P[..., P_SOLARIZE] = u[..., 31] < p["p_solarize"]
        return P


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> Optional[Tuple[int, int]]:
    """``(width, height)`` from a JPEG's start-of-frame segment, walking the marker segments; ``None``
    if the header is not the plain layout this reads (the caller then asks Pillow)."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF:
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            return (width, height) if width > 0 and height > 0 else None
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _check_jpeg_end(data: bytes) -> None:
    eoi = data.rfind(_JPEG_EOI)
    if eoi < 0 or len(data) - (eoi + 2) > _MAX_TRAILER:
        raise ValueError("truncated JPEG (no end-of-image marker at the end)")


def probe_image(data: bytes) -> Tuple[int, int]:
    """``(width, height)`` of an encoded image, from its header; raises ``ValueError`` if unusable.

    Reads the header only (no pixel decode) and checks that a JPEG ends with
    an end-of-image marker and a PNG has its ``IEND`` chunk, which catches
    truncated files before they reach DALI.
    """
    if not data:
        raise ValueError("empty file")
    size = _jpeg_size(data)  # the common case, without Pillow's overhead
    if size is not None:
        _check_jpeg_end(data)
        return size
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (width, height) = img.format, img.size
    except Exception as exc:
        unknown = isinstance(exc, UnidentifiedImageError)
        reason = "not a recognised image format" if unknown else f"{type(exc).__name__}: {exc}"
        raise ValueError(f"not a readable image ({reason})") from None
    if fmt not in _DALI_FORMATS:
        raise ValueError(f"image format {fmt} is not decoded by DALI")
    if fmt in ("JPEG", "MPO"):
        _check_jpeg_end(data)
    elif fmt == "PNG" and data.rfind(_PNG_IEND, max(0, len(data) - 64)) < 0:
        raise ValueError("truncated PNG (no IEND chunk)")
    if width <= 0 or height <= 0:
        raise ValueError(f"image has size {width}x{height}")
    return int(width), int(height)


# --------------------------------------------------------------------------- the host source


class EncodedImageFiles(Dataset):
    """Image files as ``((encoded bytes, width, height), label)``, header-checked; raises for a bad file.

    A file whose header check fails, or that is in ``bad`` (DALI failed on it),
    raises ``ValueError`` and joins ``bad``; wrapped in
    :class:`~poa_hpc.data.datasets.RobustDataset` it is skipped, replaced and
    counted exactly as the torch loader does.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], bad: Set[int], root: str = "",
                 read: Optional[Callable[[int], bytes]] = None) -> None:
        self.paths, self.labels, self.bad = paths, labels, bad
        self.root = root
        self.read = read if read is not None else self._read_file

    def _read_file(self, index: int) -> bytes:
        with open(self.paths[index], "rb") as f:
            return f.read()

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return self.paths[index]

    def __getitem__(self, index: int) -> Tuple[Tuple[bytes, int, int], int]:
        if index in self.bad:
            raise ValueError("DALI cannot decode it")
        try:
            data = self.read(index)
            width, height = probe_image(data)
        except (OSError, ValueError):
            self.bad.add(index)
            raise
        return (data, width, height), self.labels[index]


class _StepSource:
    """DALI ``external_source`` callback: the encoded files and view parameters of one step.

    Called once per pipeline iteration ``i`` (DALI's ``BatchInfo``) and serves
    step ``start_step + i``; the outputs are ``[encoded, meta, params_view0,
    ...]`` with ``meta = (label, index, n_skipped, gpos, step)`` per sample.
    """

    def __init__(
        self,
        files: RobustDataset,
        sampler: StepBatchSampler,
        specs: Sequence[ViewSpec],
        seed: int,
        start_step: int,
        io_threads: int,
    ) -> None:
        self.files = files
        self.sampler = sampler
        self.specs = list(specs)
        self.draw = ViewParamSampler(self.specs)
        self.seed = int(seed)
        self.start_step = int(start_step)
        self.io_threads = max(1, io_threads)
        self.pool = ThreadPoolExecutor(max_workers=self.io_threads, thread_name_prefix="poa-dali-io")

    def _load(self, index: int) -> Tuple[int, int, bytes, int, int, int]:
        """``(index used, skipped, bytes, width, height, label)``: the next readable file from ``index`` on."""
        item = self.files[index]
        data, width, height = item.image
        return item.index, item.n_skipped, data, width, height, item.label

    def _load_many(self, indices: Sequence[int]) -> List[Tuple[int, int, bytes, int, int, int]]:
        return [self._load(i) for i in indices]

    def batch_for_step(self, step: int) -> List[Any]:
        keys = self.sampler.batch_for_step(step)
        # a few chunks per I/O thread: parallel reads (network file systems) without a future per file
        n_chunks = min(len(keys), 4 * self.io_threads)
        chunks = [[k.index for k in keys[c::n_chunks]] for c in range(n_chunks)]
        loaded: List[Any] = [None] * len(keys)
        for c, items in enumerate(self.pool.map(self._load_many, chunks)):
            loaded[c::n_chunks] = items
        encoded = [np.frombuffer(data, dtype=np.uint8) for _, _, data, _, _, _ in loaded]
        meta = [np.array([label, index, skipped, key.pos, step], dtype=np.int64)
                for key, (index, skipped, _, _, _, label) in zip(keys, loaded)]
        rngs = [np.random.default_rng(derive_seed(self.seed, DALI_AUG_STREAM, step, k.pos)) for k in keys]
        views = self.draw.batch([(w, h) for _, _, _, w, h, _ in loaded], rngs)  # (B, V, N_PARAMS)
        return [encoded, meta, *(list(views[:, v]) for v in range(len(self.specs)))]

    def __call__(self, info: Any) -> List[Any]:
        return self.batch_for_step(self.start_step + int(info.iteration))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- the DALI graph


def _augment_view(images: Any, p: Any, spec: ViewSpec, on_gpu: bool) -> Any:
    """One view: crop+resize, jitter/grayscale, blur, solarize, flip+normalise (CHW float)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    pa = p.gpu() if on_gpu else p  # per-sample factors used in arithmetic live with the data
    v = fn.resize(
        images,
        roi_start=p[P_Y0:P_X0 + 1],
        roi_end=p[P_Y1:P_X1 + 1],
        roi_relative=False,
        size=[spec.size, spec.size],
        interp_type=types.INTERP_CUBIC,
        antialias=True,
    )
    # brightness b, then contrast c around the mean luma m (torchvision's definitions):
    # out = b * (m + c * (x - m)), clamped to uint8
    if on_gpu:  # m lives on the GPU, and operator arguments must come from the CPU: arithmetic
        vf = fn.cast(v, dtype=types.FLOAT)
        luma = types.Constant(np.array([[[0.299, 0.587, 0.114]]], dtype=np.float32))
        m = fn.reductions.mean(vf * luma, axes=[0, 1, 2], keep_dims=True) * 3.0
        vf = pa[P_BRIGHTNESS] * (m + pa[P_CONTRAST] * (vf - m))
        v = fn.cast(dmath.clamp(vf, 0.0, 255.0), dtype=types.UINT8)
    else:  # one fused pass with the per-sample centre as an argument
        mc = fn.reductions.mean(v, axes=[0, 1], dtype=types.FLOAT)
        m = mc[0] * 0.299 + mc[1] * 0.587 + mc[2] * 0.114
        v = fn.brightness_contrast(v, brightness=p[P_BRIGHTNESS], contrast=p[P_CONTRAST], contrast_center=m)
    v = fn.hsv(v, saturation=p[P_SATURATION], hue=p[P_HUE_DEG])
    if p[P_BLUR] > 0.5:
        v = fn.gaussian_blur(v, window_size=spec.blur_kernel, sigma=p[P_SIGMA])
    if spec.p_solarize > 0:
        t = spec.solarize_threshold
        if p[P_SOLARIZE] > 0.5:
            v = fn.cast((v >= t) * (255 - v) + (v < t) * v, dtype=types.UINT8)
    return fn.crop_mirror_normalize(
        v,
        mirror=fn.cast(p[P_FLIP], dtype=types.INT32),
        mean=[255.0 * x for x in IMAGENET_MEAN],
        std=[255.0 * x for x in IMAGENET_STD],
        dtype=types.FLOAT,
        output_layout="CHW",
    )


def _build_pipeline(
    source: _StepSource,
    specs: Sequence[ViewSpec],
    batch_size: int,
    num_threads: int,
    device_id: Optional[int],
    seed: int,
    prefetch: int,
) -> Any:
    from nvidia.dali import fn, pipeline_def, types

    on_gpu = device_id is not None
    n_views = len(specs)

    @pipeline_def(enable_conditionals=True)
    def poa_multicrop():  # type: ignore[no-untyped-def]
        outs = fn.external_source(source=source, num_outputs=2 + n_views, batch=True, batch_info=True, parallel=False)
        encoded, meta, params = outs[0], outs[1], outs[2:]
        images = fn.decoders.image(
            encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB, adjust_orientation=False
        )
        views = [_augment_view(images, params[v], specs[v], on_gpu) for v in range(n_views)]
        return (*views, meta)

    pipe = poa_multicrop(
        batch_size=batch_size,
        num_threads=max(1, num_threads),
        device_id=device_id,
        seed=seed % (1 << 31),  # unused by the graph (all randomness comes from the source)
        prefetch_queue_depth=max(1, prefetch),
    )
    pipe.build()
    return pipe


def _last_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def _decode_one(data: bytes, device_id: Optional[int]) -> np.ndarray:
    """One encoded image decoded by DALI on the loader's backend, as HWC uint8 RGB; raises if DALI cannot."""
    from nvidia.dali import fn, pipeline_def, types

    sample = [np.frombuffer(data, dtype=np.uint8)]

    @pipeline_def
    def one():  # type: ignore[no-untyped-def]
        encoded = fn.external_source(source=lambda: sample, batch=True)
        device = "mixed" if device_id is not None else "cpu"
        return fn.decoders.image(encoded, device=device, output_type=types.RGB, adjust_orientation=False)

    pipe = one(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1)
    pipe.build()
    (out,) = pipe.run()
    return np.array(out.as_cpu()[0] if device_id is not None else out[0])


def _to_torch(tl: Any, out: torch.Tensor) -> None:
    """Copy a dense DALI TensorList (CPU or GPU) into the contiguous torch tensor ``out``."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    stream = torch.cuda.current_stream(out.device) if out.is_cuda else None
    feed_ndarray(tl.as_tensor(), out, cuda_stream=stream)


# --------------------------------------------------------------------------- the loader


class DaliMultiCropLoader:
    """Infinite multi-crop batch iterator backed by a DALI pipeline (see the module docstring).

    Same interface as :class:`poa_hpc.data.loader.TrainLoader`: ``next(loader)``
    returns the batch of step ``start_step``, then the next step's, ...;
    ``iters_per_epoch`` is the epoch length; ``close()`` releases the pipeline.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        sampler: StepBatchSampler,
        specs: Sequence[ViewSpec],
        collator: MultiCropCollator,
        seed: int,
        device: str = "cpu",
        device_id: Optional[int] = None,
        num_threads: int = 4,
        prefetch: int = 2,
        root: str = "",
        max_rebuilds: int = 8,
        read: Optional[Callable[[int], bytes]] = None,
    ) -> None:
        if device not in ("cpu", "gpu"):
            raise ValueError(f"DaliMultiCropLoader: device must be 'cpu' or 'gpu', got {device!r}")
        if device == "gpu":
            if not torch.cuda.is_available():
                raise DaliUnavailable("data.loader=dali decodes on the GPU, but no CUDA device is visible; "
                                      "use data.loader=dali_cpu or data.loader=torch")
            device_id = torch.cuda.current_device() if device_id is None else int(device_id)
        else:
            device_id = None
        if len(specs) < 2:
            raise ValueError("DaliMultiCropLoader: need at least the two global views")
        # paths: each item's name (a file, or a shard and offset); read(i): its encoded bytes (default: the file)
        self.paths, self.labels = paths, list(labels)
        self.sampler = sampler
        self.specs = list(specs)
        self.collator = collator
        self.seed = int(seed)
        self.device = device
        self.device_id = device_id
        self.num_threads = int(num_threads)
        self.prefetch = int(prefetch)
        self.root = root
        self.max_rebuilds = int(max_rebuilds)
        self.bad: Set[int] = set()  # indices of files found unreadable (header check or DALI)
        self.files = RobustDataset(EncodedImageFiles(self.paths, self.labels, self.bad, root, read))
        self.step = sampler.start_step
        self._pipe: Any = None
        self._source: Optional[_StepSource] = None
        self._torch_device = torch.device("cuda", device_id) if device_id is not None else torch.device("cpu")

    @property
    def iters_per_epoch(self) -> int:
        return self.sampler.iters_per_epoch

    def _start(self) -> None:
        self._stop()
        self._source = _StepSource(self.files, self.sampler, self.specs, self.seed, self.step,
                                   io_threads=max(2, self.num_threads))
        self._pipe = _build_pipeline(
            self._source, self.specs, self.sampler.batch_size, self.num_threads, self.device_id, self.seed,
            self.prefetch,
        )

    def _stop(self) -> None:
        if self._source is not None:
            self._source.close()
        self._pipe, self._source = None, None

    def __iter__(self) -> DaliMultiCropLoader:
        return self

    def _find_bad_files(self, step: int) -> List[str]:
        """Decode the files of this step's batch one by one (DALI, same backend); mark the ones that fail."""
        found = []
        for key in self.sampler.batch_for_step(step):
            item = self.files[key.index]  # the file the source used for this sample
            try:
                _decode_one(item.image[0], self.device_id)
            except Exception as exc:
                self.bad.add(item.index)
                found.append(f"{self.paths[item.index]} ({_last_line(exc)})")
        return found

    def _run(self) -> Tuple[Any, ...]:
        for attempt in range(self.max_rebuilds + 1):
            if self._pipe is None:
                self._start()
            try:
                return tuple(self._pipe.run())
            except RuntimeError as exc:
                bad = self._find_bad_files(self.step)
                self._stop()
                if not bad or attempt == self.max_rebuilds:
                    raise RuntimeError(
                        f"DALI pipeline failed at step {self.step} reading '{self.root}' and no file of that batch "
                        f"fails to decode on its own: {_last_line(exc)}"
                    ) from exc
                logger.warning("DALI failed at step %d on %s; skipping and redoing the step", self.step,
                               ", ".join(bad))
        raise AssertionError("unreachable")

    def __next__(self) -> Dict[str, Any]:
        outs = self._run()
        views, meta_tl = outs[:-1], outs[-1]
        meta = torch.from_numpy(np.array(meta_tl.as_tensor()))  # (B, 5) int64
        step = int(meta[0, 4])
        if step != self.step:
            raise RuntimeError(f"DALI loader out of step: got step {step}, expected {self.step}")
        B = self.sampler.batch_size
        n_local = len(views) - 2

        def stack(vs: Sequence[Any], size: int) -> torch.Tensor:
            out = torch.empty((len(vs) * B, 3, size, size), dtype=torch.float32, device=self._torch_device)
            for k, tl in enumerate(vs):
                _to_torch(tl, out[k * B:(k + 1) * B])
            return out

        global_crops = stack(views[:2], self.specs[0].size)
        if n_local:
            local_crops = stack(views[2:], self.specs[2].size)
        else:
            local_crops = torch.empty(0, 3, 0, 0, device=self._torch_device)
        gpos = meta[:, 3].tolist()
        batch: Dict[str, Any] = {
            "global_crops": global_crops,
            "local_crops": local_crops,
            **self.collator.masks_for(step, gpos),
            "n_skipped": int(meta[:, 2].sum()),
            "labels": meta[:, 0].clone(),
            "indices": meta[:, 1].clone(),
            "step": step,
        }
        self.step += 1
        return batch

    def close(self) -> None:
        self._stop()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self._stop()
        except Exception:
            pass
