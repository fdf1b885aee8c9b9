"""Measured latency and throughput of a dense network on one device and runtime.

``time_runs(fn, warmup, runs, cuda)`` calls ``fn`` ``warmup`` times untimed, then ``runs`` times,
each timed on its own (``time.perf_counter`` around the call on a CPU; CUDA events around it and a
synchronisation on a GPU), and returns the timed runs' seconds.  ``summarize`` gives their median
and 90th percentile (linear interpolation, as ``numpy.percentile``).  ``measure_latency`` builds the
runtime (``eager``: the module under ``torch.inference_mode``; ``compile``: ``torch.compile`` of
it; ``onnxruntime``: the ONNX export run by an onnxruntime CPU session) and reports batch-1
latency (median and p90, ms) and batch-N throughput (images/s from the median time of a batch).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch

__all__ = ["RUNTIMES", "time_runs", "summarize", "measure_latency"]

RUNTIMES = ("eager", "compile", "onnxruntime")


def time_runs(fn: Callable[[], object], warmup: int, runs: int, cuda: bool = False) -> List[float]:
    """Seconds of each of ``runs`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    if warmup < 0 or runs < 1:
        raise ValueError(f"latency: need warmup >= 0 and runs >= 1 (got {warmup}, {runs})")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def summarize(times: Sequence[float]) -> Dict[str, float]:
    """Median and 90th percentile (seconds) of the timed runs."""
    return {"median": float(statistics.median(times)), "p90": float(np.percentile(np.asarray(times), 90))}


def _runner(model: torch.nn.Module, runtime: str, img_size: int, device: torch.device, threads: int, tmp: Path):
    """``x -> output`` of ``model`` in ``runtime`` (inputs are CPU tensors for onnxruntime)."""
    if runtime == "onnxruntime":
        if device.type != "cpu":
            raise ValueError("latency: --runtime onnxruntime runs on the CPU (use --device cpu)")
        from poa_hpc.models.onnx_export import export_onnx, onnx_session

        path = tmp / "model.onnx"
        export_onnx(model, img_size, path)
        sess = onnx_session(path, threads=threads)
        return lambda x: sess.run(None, {"images": x.numpy()})
    model = model.to(device).eval()
    fn = torch.compile(model) if runtime == "compile" else model

    def run(x):
        with torch.inference_mode():
            return fn(x)

    return run


def measure_latency(model: torch.nn.Module, img_size: int, *, runtime: str = "eager", device: str = "cpu",
                    threads: int = 0, batch: int = 32, warmup: int = 5, runs: int = 20) -> Dict[str, float]:
    """``{"latency_ms", "latency_p90_ms", "throughput"}`` of ``model`` on ``(1|batch, 3, img_size, img_size)``
    random inputs.  ``threads`` > 0 sets torch's (and onnxruntime's) intra-op threads for the measurement."""
    if runtime not in RUNTIMES:
        raise ValueError(f"latency: runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    old_threads = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="poa-latency-") as tmp:
            run = _runner(model, runtime, img_size, dev, threads, Path(tmp))
            x1 = torch.randn(1, 3, img_size, img_size, device=dev if runtime != "onnxruntime" else "cpu")
            xb = torch.randn(batch, 3, img_size, img_size, device=x1.device)
            one = summarize(time_runs(lambda: run(x1), warmup, runs, cuda))
            many = summarize(time_runs(lambda: run(xb), max(1, warmup // 2), max(3, runs // 4), cuda))
    finally:
        torch.set_num_threads(old_threads)
    return {"latency_ms": one["median"] * 1e3, "latency_p90_ms": one["p90"] * 1e3,
            "throughput": batch / many["median"]}
