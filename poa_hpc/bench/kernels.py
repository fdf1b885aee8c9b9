# ruff: noqa: B023  -- the timed closures run inside the loop iteration that builds them
"""Microbenchmarks of the two seams: the sliced projection and attention.

    poa bench kernels     # sliced projection fwd+bwd at ViT-L elastic shapes: torch, Triton, dense cuBLAS
    poa bench attention   # attention fwd+bwd TFLOP/s per backend at ViT-S/B/L shapes (seq 197 and 37)

Both print a table and write JSON under ``benchmarks/results/`` with device,
versions and commit.  ``kernels`` needs CUDA (Triton's interpreter says nothing
about speed); ``attention`` also runs on CPU for the torch backends.
"""

from __future__ import annotations

import argparse
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from poa_hpc.commands import register_command
from poa_hpc.results import write_result


def _time(fn: Callable[[], object], iters: int, warmup: int) -> float:
    """Median seconds per call (CUDA events on GPU, perf_counter on CPU)."""
    import time

    for _ in range(warmup):
        fn()
    times = []
    cuda = torch.cuda.is_available()
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------------------- sliced projection
def add_kernels_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=50 * 197, help="rows M of x (batch x sequence)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--widths", type=int, nargs="+", default=[384, 576, 768, 1024])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results")


def bench_kernels(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("poa bench kernels: needs a CUDA GPU (Triton's interpreter on CPU measures nothing useful)")
        return 2
    from poa_hpc.kernels.sliced_linear import sliced_linear
    from poa_hpc.kernels.sliced_linear_triton import sliced_linear_triton

    dt = getattr(torch, args.dtype)
    D, H = 1024, 4096
    rows = []
    print(f"{'layer':<6}{'shape (M x in -> out)':<26}{'torch ms':>10}{'triton ms':>11}{'dense ms':>10}"
          f"{'triton TF/s':>13}{'% dense':>9}{'x torch':>9}")
    for w in args.widths:
        for layer, (max_in, max_out, groups, i, o) in {
            "qkv": (D, D, 3, w, w), "proj": (D, D, 1, w, w), "fc1": (D, H, 1, w, 4 * w), "fc2": (H, D, 1, 4 * w, w),
        }.items():
            M = args.tokens
            x = torch.randn(M, i, device="cuda", dtype=dt, requires_grad=True)
            W = torch.randn(groups * max_out, max_in, device="cuda", dtype=dt, requires_grad=True)
            b = torch.randn(groups * max_out, device="cuda", dtype=dt, requires_grad=True)
            Wd = torch.randn(groups * o, i, device="cuda", dtype=dt, requires_grad=True)
            bd = torch.randn(groups * o, device="cuda", dtype=dt, requires_grad=True)
            dy = torch.randn(M, groups * o, device="cuda", dtype=dt)
            alpha = max_in / i

            t_torch = _time(lambda: torch.autograd.grad(sliced_linear(x, W, b, o, i, alpha, groups), (x, W, b), dy),
                            args.iters, 5)
            t_tri = _time(lambda: torch.autograd.grad(sliced_linear_triton(x, W, b, o, i, alpha, groups),
                                                      (x, W, b), dy), args.iters, 5)
            t_dense = _time(lambda: torch.autograd.grad(F.linear(x, Wd, bd), (x, Wd, bd), dy), args.iters, 5)
            flops = 3 * 2 * M * i * groups * o  # forward + dx + dW
            row = {"layer": layer, "M": M, "in": i, "out": groups * o, "max_in": max_in, "dtype": args.dtype,
                   "torch_ms": t_torch * 1e3, "triton_ms": t_tri * 1e3, "dense_ms": t_dense * 1e3,
                   "triton_tflops": flops / t_tri / 1e12, "pct_of_dense": 100 * t_dense / t_tri,
                   "speedup_vs_torch": t_torch / t_tri}
            rows.append(row)
            print(f"{layer:<6}{f'{M} x {i} -> {groups * o}':<26}{row['torch_ms']:>10.3f}{row['triton_ms']:>11.3f}"
                  f"{row['dense_ms']:>10.3f}{row['triton_tflops']:>13.1f}{row['pct_of_dense']:>8.0f}%"
                  f"{row['speedup_vs_torch']:>8.2f}x")
    write_result("kernels", rows, args.out, {"dtype": args.dtype, "tokens": args.tokens})
    return 0


# ---------------------------------------------------------------------------- attention
def add_attention_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--backends", nargs="+", default=["xformers", "sdpa", "math"])
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results")


def bench_attention(args: argparse.Namespace) -> int:
    from poa_hpc.models import ops

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = getattr(torch, args.dtype)
    rows: List[Dict] = []
    print(f"{'model':<7}{'heads':>6}{'seq':>5}{'backend':>10}{'ms fwd+bwd':>12}{'TFLOP/s':>10}")
    for model, heads in (("vit_s", 6), ("vit_b", 12), ("vit_l", 16)):
        for seq in (197, 37):
            q, k, v = (torch.randn(args.batch, heads, seq, 64, device=dev, dtype=dt, requires_grad=True)
                       for _ in range(3))
            dy = torch.randn(args.batch, heads, seq, 64, device=dev, dtype=dt)
            for backend in args.backends:
                def step():
                    return torch.autograd.grad(ops.attention(q, k, v, backend), (q, k, v), dy)

                t = _time(step, args.iters, 3)
                flops = 3.5 * 4 * args.batch * heads * seq * seq * 64  # fwd (2 matmuls) + bwd (5 matmuls)
                row = {"model": model, "heads": heads, "seq": seq, "backend": backend, "batch": args.batch,
                       "dtype": args.dtype, "ms": t * 1e3, "tflops": flops / t / 1e12}
                rows.append(row)
                print(f"{model:<7}{heads:>6}{seq:>5}{backend:>10}{row['ms']:>12.3f}{row['tflops']:>10.2f}")
    write_result("attention", rows, args.out, {"batch": args.batch, "dtype": args.dtype})
    return 0


@register_command("bench kernels")
class BenchKernelsCommand:
    """sliced projection fwd+bwd (torch, Triton, dense)"""

    add_arguments = staticmethod(add_kernels_arguments)
    run = staticmethod(bench_kernels)


@register_command("bench attention")
class BenchAttentionCommand:
    """attention fwd+bwd TFLOP/s per backend"""

    add_arguments = staticmethod(add_attention_arguments)
    run = staticmethod(bench_attention)
