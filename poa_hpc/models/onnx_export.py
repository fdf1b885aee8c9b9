"""ONNX export of a dense (extracted) sub-network, checked against PyTorch with onnxruntime.

``export_onnx(model, img_size, path)`` writes ``path`` (opset >= 17, a dynamic batch axis, inputs
``(batch, 3, img_size, img_size)``, output: the network's features, e.g. the final-norm [CLS]),
runs it with onnxruntime on a random batch of 2 and returns the largest absolute difference to
the PyTorch model's output; a difference above ``atol + rtol * max|reference|`` is an error
(:class:`poa_hpc.errors.ExportError`), not a warning.  ``onnx`` and ``onnxruntime`` are the extra
``poa_hpc[onnx]``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Optional

import torch

from poa_hpc.errors import ExportError, UsageError

__all__ = ["export_onnx", "onnx_session", "require_onnx", "OPSET"]

#: The ONNX opset written (18: the dynamo exporter's own; >= 17 keeps LayerNormalization one op).
OPSET = 18


def require_onnx() -> None:
    """One-line error naming the extra when onnx or onnxruntime is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"ONNX export needs onnx and onnxruntime ({exc.name} is missing): "
                         "pip install 'poa_hpc[onnx]'") from None


def onnx_session(path: str | Path, threads: int = 0):
    """An onnxruntime CPU inference session of ``path`` (``threads`` > 0 sets the intra-op threads)."""
    require_onnx()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def export_onnx(model: torch.nn.Module, img_size: int, path: str | Path, *, opset: int = OPSET,
                rtol: float = 1e-4, atol: float = 1e-5, in_chans: int = 3, seed: int = 0,
                check: bool = True) -> Optional[float]:
    """Write ``model`` (a dense network mapping ``(B, C, H, W)`` to features) as ONNX at ``path`` and
    return the max abs difference of onnxruntime's output to PyTorch's on a batch of 2 random
    images (``None`` with ``check=False``)."""
    require_onnx()
    import logging

    import onnx

    for name in ("onnx_ir", "onnxscript", "torch.onnx"):  # their INFO lines (one per initializer) are noise here
        logging.getLogger(name).setLevel(logging.WARNING)
    if opset < 17:
        raise UsageError(f"ONNX opset {opset}: poa_hpc writes opset >= 17")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().float().cpu()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, in_chans, img_size, img_size, generator=gen)
    ref = model(x).float()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        # A copy is traced: tracing can leave fake tensors in a module's caches (Swin's attention masks).
        traced = copy.deepcopy(model)
        # torch.export (the dynamo exporter): the dense networks read widths from tensor shapes, which
        # stay Python ints there (the TorchScript tracer would make them tensors); only the batch is dynamic.
        batch = torch.export.Dim("batch", min=1, max=4096)
        prog = torch.onnx.export(traced, (x,), input_names=["images"], output_names=["features"],
                                 dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True,
                                 external_data=False, verbose=False)
        prog.save(str(tmp))
        onnx.checker.check_model(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if not check:
        return None
    got = torch.from_numpy(onnx_session(path).run(None, {"images": x.numpy()})[0])
    if got.shape != ref.shape:
        raise ExportError(f"ONNX export {path}: onnxruntime output shape {tuple(got.shape)} != PyTorch's "
                          f"{tuple(ref.shape)}")
    diff = float((got - ref).abs().max())
    bound = atol + rtol * float(ref.abs().max())
    if not diff <= bound:
        raise ExportError(f"ONNX export {path}: onnxruntime differs from PyTorch by {diff:.3g} (max abs) > "
                          f"tolerance {bound:.3g} (atol {atol:g} + rtol {rtol:g} x max|output|)")
    return diff
