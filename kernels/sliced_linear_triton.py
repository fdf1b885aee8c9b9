"""Triton kernels for the sliced projection ``y = alpha * x @ W[rows, :in].T + b[rows]``.

``rows`` are the leading ``out`` rows of each of ``groups`` row blocks of the
full weight (``groups=3``: q, k, v of a fused qkv weight).  The kernels index
the full weight in place (no sliced copy is made, forward or backward):

* forward: tiles of ``x`` times gathered rows of ``W``, fp32 accumulation,
  ``alpha`` and the bias applied in the epilogue;
* backward ``dx = alpha * dy @ W[rows, :in]``;
* backward ``dW``: ``alpha * dy.T @ x`` written straight into the sub-block of a
  full-size gradient (autograd then adds it to ``weight.grad``, so the intact and
  the elastic branch's gradients add up, and sharding wrappers' gradient hooks
  fire as usual).  ``db`` is the column sum of ``dy`` scattered to ``rows``.

On CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``),
which is how CI tests them; on CUDA bf16/fp16 inputs accumulate in fp32 (fp64 inputs in fp64).
This module knows nothing of the model that calls it.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from poa_hpc.kernels.sliced_linear import check_slice

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _rows(n, out_per_group, max_out):
    """Row of the full weight holding output column ``n``."""
    return (n // out_per_group) * max_out + (n % out_per_group)


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, out_per_group, max_out, alpha,
                s_xm, s_xk, s_wr, s_wk, s_ym, s_yn,
                HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, ACC64: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    wrow = _rows(rn, out_per_group, max_out)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC64 else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :] * s_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        b = tl.load(w_ptr + wrow[None, :] * s_wr + rk[:, None] * s_wk,
                    mask=(rn[None, :] < N) & (rk[:, None] < K), other=0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee", out_dtype=acc.dtype)
        else:
            acc += tl.dot(a, b, out_dtype=acc.dtype)
    acc = acc * alpha
    if HAS_BIAS:
        bias = tl.load(b_ptr + wrow, mask=rn < N, other=0.0)
        acc += bias[None, :].to(acc.dtype)
    tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :] * s_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _dx_kernel(dy_ptr, w_ptr, dx_ptr, M, N, K, out_per_group, max_out, alpha,
               s_dm, s_dn, s_wr, s_wk, s_xm, s_xk, IEEE: tl.constexpr, ACC64: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float64 if ACC64 else tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        wrow = _rows(rn, out_per_group, max_out)
        g = tl.load(dy_ptr + rm[:, None] * s_dm + rn[None, :] * s_dn,
                    mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        w = tl.load(w_ptr + wrow[:, None] * s_wr + rk[None, :] * s_wk,
                    mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
        if IEEE:
            acc += tl.dot(g, w, input_precision="ieee", out_dtype=acc.dtype)
        else:
            acc += tl.dot(g, w, out_dtype=acc.dtype)
    tl.store(dx_ptr + rm[:, None] * s_xm + rk[None, :] * s_xk, (acc * alpha).to(dx_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.jit
def _dw_kernel(dy_ptr, x_ptr, gw_ptr, M, N, K, out_per_group, max_out, alpha,
               s_dm, s_dn, s_xm, s_xk, s_gr, s_gk, IEEE: tl.constexpr, ACC64: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float64 if ACC64 else tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        g = tl.load(dy_ptr + rn[:, None] * s_dn + rm[None, :] * s_dm,
                    mask=(rn[:, None] < N) & (rm[None, :] < M), other=0.0)  # dy.T tile (BLOCK_N, BLOCK_M)
        x = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :] * s_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        if IEEE:
            acc += tl.dot(g, x, input_precision="ieee", out_dtype=acc.dtype)
        else:
            acc += tl.dot(g, x, out_dtype=acc.dtype)
    wrow = _rows(rn, out_per_group, max_out)
    tl.store(gw_ptr + wrow[:, None] * s_gr + rk[None, :] * s_gk, (acc * alpha).to(gw_ptr.dtype.element_ty),
             mask=(rn[:, None] < N) & (rk[None, :] < K))


def _configs():
    """Autotuning space on CUDA (tensor-core tiles for bf16/fp16, fp32 accumulation)."""
    out = []
    for bm, bn, bk, warps, stages in ((128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
                                      (64, 64, 64, 4, 3), (128, 128, 64, 8, 3), (64, 256, 32, 8, 3)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages))
    return out


if INTERPRET:
    # Interpreter: one fixed, fairly large tile keeps the Python-level loops short.
    _FIXED = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}
    _fwd, _dx, _dw = _fwd_kernel, _dx_kernel, _dw_kernel
else:
    _FIXED = {}
    _fwd = triton.autotune(configs=_configs(), key=["M", "N", "K"])(_fwd_kernel)
    _dx = triton.autotune(configs=_configs(), key=["M", "N", "K"])(_dx_kernel)
    _dw = triton.autotune(configs=_configs(), key=["M", "N", "K"], reset_to_zero=["gw_ptr"])(_dw_kernel)


def _ieee(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float64)


def _row_index(out_features: int, groups: int, max_out: int, device) -> torch.Tensor:
    return torch.cat([torch.arange(g * max_out, g * max_out + out_features, device=device) for g in range(groups)])


class _SlicedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, out_features: int, alpha: float, groups: int):
        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        M, N = x2.shape[0], groups * out_features
        max_out = weight.shape[0] // groups
        y = torch.empty(M, N, device=x.device, dtype=x.dtype)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
        _fwd[grid](x2, weight, bias if bias is not None else weight, y, M, N, K, out_features, max_out,
                   float(alpha), x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
                   y.stride(0), y.stride(1), HAS_BIAS=bias is not None, IEEE=_ieee(x.dtype),
                   ACC64=x.dtype == torch.float64, **_FIXED)
        ctx.save_for_backward(x2, weight)
        ctx.meta = (x.shape, out_features, alpha, groups, bias is not None)
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        x_shape, out_features, alpha, groups, has_bias = ctx.meta
        K = x2.shape[1]
        dy2 = dy.reshape(-1, dy.shape[-1])
        M, N = dy2.shape
        max_out = weight.shape[0] // groups
        ieee, acc64 = _ieee(dy.dtype), dy.dtype == torch.float64
        dx = gw = gb = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty(M, K, device=dy.device, dtype=x2.dtype)
            _dx[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"]))](
                dy2, weight, dx, M, N, K, out_features, max_out, float(alpha),
                dy2.stride(0), dy2.stride(1), weight.stride(0), weight.stride(1), dx.stride(0), dx.stride(1),
                IEEE=ieee, ACC64=acc64, **_FIXED)
            dx = dx.view(x_shape)
        if ctx.needs_input_grad[1]:
            gw = torch.zeros_like(weight)
            _dw[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(K, meta["BLOCK_K"]))](
                dy2, x2, gw, M, N, K, out_features, max_out, float(alpha),
                dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1), gw.stride(0), gw.stride(1),
                IEEE=ieee, ACC64=acc64, **_FIXED)
        if has_bias and ctx.needs_input_grad[2]:
            gb = torch.zeros(weight.shape[0], device=dy.device, dtype=dy.dtype)
            gb[_row_index(out_features, groups, max_out, dy.device)] = dy2.sum(0)
        return dx, gw, gb, None, None, None


def sliced_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_features: int,
    in_features: int,
    alpha: float = 1.0,
    groups: int = 1,
) -> torch.Tensor:
    """Same contract as :func:`poa_hpc.kernels.sliced_linear.sliced_linear`, computed by Triton kernels."""
    check_slice("sliced_linear_triton", x, weight, out_features, in_features, groups)
    if not (x.is_cuda or INTERPRET):
        raise RuntimeError("sliced_linear_triton needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    return _SlicedLinear.apply(x, weight, bias, out_features, alpha, groups)
