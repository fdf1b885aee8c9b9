"""DINO losses: Sinkhorn-Knopp teacher targets, cross-view and same-view distillation.

Conventions (DINOv2 / authors' code): a "term" is the mean over samples of the
cross-entropy ``-sum_k p_t log softmax(s / tau_s)``; the cross-view loss sums
the 2 swapped global terms and the 2 x n_local local terms and divides by their
count; the same-view loss is a plain mean over samples.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 logits are upcast; fp64 is kept for references)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, n_iters: int = 3, n_rows: int | None = None) -> torch.Tensor:
    """Sinkhorn-Knopp centred teacher probabilities (DINOv2's ``sinkhorn_knopp_teacher``).

    Args:
        logits: (B, K) local teacher logits; rows are samples (or masked patches).
            B may be 0 on some ranks (e.g. no masked patch there): such a rank still
            takes part in every all-reduce.
        temp: teacher temperature.
        n_iters: normalisation rounds.
        n_rows: global number of rows over all ranks (default: all-reduced B).

    Overflow guard (spec §0): the authors' ``exp(logits / temp)`` overflows once
    logits / temp exceeds ~88 in fp32.  Before ``exp``, each *prototype's* max
    score over all samples of all ranks (an all-reduce MAX of K values) is
    subtracted.  That multiplies row k of Q (K x B) by one constant c_k, which the
    first per-prototype normalisation divides out exactly, so any n_iters >= 1
    gives the unshifted formula's result, up to rounding, not just its limit.
    (A per-*sample* shift would not: the first normalisation is per prototype, so
    the per-sample factors survive every finite number of rounds.)  Every
    prototype keeps an entry equal to 1, so none underflows to zero mass.  With
    n_iters = 0 only the total is normalised, so the single global max is
    subtracted instead.  A prototype or sample whose mass still underflows to
    zero keeps zero mass instead of turning into 0/0 (with weight-normalised
    prototypes on L2-normalised features the scores of one prototype span about
    2 / temp = 50 at temp 0.04, far from fp32's exp underflow near -87).
    """
    scores = upcast(logits) / temp
    B, K = scores.shape
    if n_rows is None:
        n_rows = int(_all_reduce(torch.tensor(float(B), device=scores.device)).item())
    if n_rows == 0:  # no rank holds a row: nothing to normalise (every rank returns here)
        return scores.clone()
    if B:
        shift = scores.amax(dim=0)
    else:  # no row here: contribute nothing to the MAX
        shift = torch.full((K,), -torch.inf, dtype=scores.dtype, device=scores.device)
    shift = _all_reduce(shift, dist.ReduceOp.MAX)
    if n_iters == 0:  # only the total is normalised: one global shift is what cancels there
        shift = shift.amax().expand(K)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))  # no exp(-inf - -inf)
    Q = torch.exp(scores - shift).t()  # K x B; each prototype's largest entry over all ranks is 1
    tiny = torch.finfo(Q.dtype).tiny
    Q /= _all_reduce(Q.sum()).clamp_min(tiny)
    for _ in range(n_iters):
        Q /= _all_reduce(Q.sum(dim=1, keepdim=True)).clamp_min(tiny)  # each prototype gets mass 1/K
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True).clamp_min(tiny)  # each sample gets mass 1/B
        Q /= n_rows
    Q *= n_rows
    return Q.t()


@torch.no_grad()
def softmax_target(logits: torch.Tensor, temp: float) -> torch.Tensor:
    """Plain softmax target (same-view distillation: intact -> elastic, no centring)."""
    return F.softmax(upcast(logits) / temp, dim=-1)


def cross_entropy(target: torch.Tensor, student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Per-row ``-sum_k target_k * log softmax(student / tau)_k`` (computed in fp32)."""
    return -(target * F.log_softmax(upcast(student_logits) / student_temp, dim=-1)).sum(dim=-1)


def dino_cross_view_loss(
    student_global: torch.Tensor,
    student_local: torch.Tensor | None,
    teacher_global_probs: torch.Tensor,
    student_temp: float,
) -> torch.Tensor:
    """Teacher (global views) -> student (other global view and every local view).

    Args:
        student_global: (2B, K) student logits, view-major (view A rows, then view B).
        student_local: (n_local * B, K) view-major, or None.
        teacher_global_probs: (2B, K) teacher targets, view-major.
    """
    two_b, K = teacher_global_probs.shape
    B = two_b // 2
    t = teacher_global_probs.view(2, B, K)
    # Cross-view: teacher A supervises student B and vice versa.
    swapped = torch.cat([t[1], t[0]], dim=0)
    total = cross_entropy(swapped, student_global, student_temp).mean() * 2
    n_terms = 2
    if student_local is not None and student_local.numel():
        for s in student_local.view(-1, B, K):
            for tj in t:
                total = total + cross_entropy(tj, s, student_temp).mean()
                n_terms += 1
    return total / n_terms


def same_view_loss(intact_logits: torch.Tensor, elastic_logits: torch.Tensor, temp: float) -> torch.Tensor:
    """Intact (target, no gradient) -> elastic on the same view, mean over samples."""
    target = softmax_target(intact_logits.detach(), temp)
    return cross_entropy(target, elastic_logits, temp).mean()
