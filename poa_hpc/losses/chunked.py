"""Head logits and losses head by head and in chunks of rows: no (rows x prototypes) matrix of every head at once.

A POA step scores [CLS] tokens and masked patch tokens against 4 heads of up to
65,536 prototypes.  At ViT-L batch 50 the masked patches alone are ~3,000-6,000
rows x 122,880 prototypes: every fp32 copy of those logits (teacher scores,
Sinkhorn-Knopp targets, the student's log-softmax, its gradient) is 1.5-2.9 GB.
Here a head's logits are never materialised: each head keeps the pair
``(z, W)`` its module returned (L2-normalised bottleneck features ``z`` (R, d)
and the prototype matrix ``W`` (K, d), ``logits = F.linear(z, W)``), and logits
are formed for one chunk of rows at a time, used and dropped:

* :class:`SinkhornTargets`: Sinkhorn-Knopp keeps only each prototype's shift and
  scale (K values) and forms targets chunk by chunk.  With ``Q = exp(s - shift)``
  (K x B, ``s = logits / temp``) every round multiplies Q by one factor per
  prototype and one per sample, so after the last round the target of sample b is
  ``E_b * r / sum_k(E_bk r_k)`` with ``r_k = 1 / sum_b(E_bk c_b)`` and
  ``c_b = 1 / sum_k(E_bk r'_k)`` (r' the previous round's r).  Each round is one
  pass over the row chunks and one all-reduce of K values, as the matrix form
  (the per-sample factors are taken in log space, so a sample far below every
  prototype's max does not underflow, and the per-prototype log-scales are
  re-centred every round, so they stay bounded at any number of rounds);
  the total normalisation (and the ``/ K``, ``/ B``, ``* B`` constants) cancel in
  the next normalisation and are skipped, so no global row count (a host sync) is
  needed.  The targets equal :func:`poa_hpc.losses.dino.sinkhorn_knopp`'s up to
  rounding (tests: 1e-6 relative, and 1 and 3 rounds equal the unshifted formula).
* :func:`head_loss` (``_HeadLoss``): a fused prototype layer + cross-entropy in the
  spirit of Liger's fused linear cross-entropy.  In the forward pass it forms each
  chunk's logits, every loss term on those rows (DINO, iBOT, same-view) and their
  gradients with respect to the logits (``w / T * (softmax * sum(t) - t)``, what
  autograd computes through log-softmax), and accumulates the gradients of ``z``
  (R x d) and ``W`` (K x d); backward only scales them.  Nothing of size R x K
  outlives its chunk.

Chunks hold at most ``chunk_elements`` logits (rows x K; 0: one chunk per head).
Computation dtypes follow the module's ``F.linear(z, W)``: under autocast the
logits are formed in the autocast dtype (the targets and losses in fp32, as
before), and the logits' gradient is cast to that dtype before the two matmuls,
as autograd does through the autocast cast.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from poa_hpc.losses.dino import upcast

__all__ = ["Logits", "SinkhornTargets", "Term", "Group", "head_loss", "linear_dtype", "chunks"]

Rows = Union[slice, torch.Tensor]


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def linear_dtype(z: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(z, w)`` computes in here: autocast's where autocast is on for ``z``'s device
    (autocast leaves float64 alone), else the promoted input dtype."""
    promoted = torch.promote_types(z.dtype, w.dtype)
    if promoted == torch.float64:
        return promoted
    try:
        if torch.is_autocast_enabled(z.device.type):
            return torch.get_autocast_dtype(z.device.type)
    except (RuntimeError, TypeError, ValueError):  # a device type without autocast (meta)
        pass
    return promoted


def _no_autocast(device_type: str):
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type, enabled=False)
    except (RuntimeError, TypeError, ValueError):
        pass
    return contextlib.nullcontext()


def chunks(n_rows: int, n_cols: int, chunk_elements: int) -> List[slice]:
    """Row slices of at most ``chunk_elements`` elements (at least one row each); one slice when 0."""
    if n_rows == 0:
        return []
    step = n_rows if chunk_elements <= 0 else max(1, chunk_elements // max(n_cols, 1))
    return [slice(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]


class Logits:
    """Rows of ``F.linear(z, W)`` on demand, in the dtype the module's ``F.linear`` gives (see :func:`linear_dtype`)."""

    def __init__(self, z: torch.Tensor, w: torch.Tensor, dtype: Optional[torch.dtype] = None):
        self.dtype = dtype or linear_dtype(z, w)
        self.z = z.detach()
        self.w = w.detach().to(self.dtype)
        self.device_type = z.device.type

    @property
    def n_rows(self) -> int:
        return self.z.shape[0]

    @property
    def n_cols(self) -> int:
        return self.w.shape[0]

    def __call__(self, rows: Rows = slice(None)) -> torch.Tensor:
        with _no_autocast(self.device_type):
            return F.linear(self.z[rows].to(self.dtype), self.w)


class SinkhornTargets:
    """Sinkhorn-Knopp targets of ``F.linear(z, W) / temp`` (DINOv2's centring), formed chunk by chunk.

    The same computation as :func:`poa_hpc.losses.dino.sinkhorn_knopp` (each prototype's max over the
    rows of all ranks subtracted before ``exp``; ``n_iters`` rounds of per-prototype then per-sample
    normalisation over all ranks) keeping K shifts and K scales instead of the (rows x K) matrix; see
    the module docstring.  All ranks take part in the same all-reduces, also with no row here.
    """

    def __init__(self, logits: Logits, temp: float, n_iters: int = 3, chunk_elements: int = 0):
        self.logits = logits
        self.temp = temp
        self.n_iters = n_iters
        self.chunk_elements = chunk_elements
        K = logits.n_cols
        z = logits.z
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        self.acc = acc
        parts = chunks(logits.n_rows, K, chunk_elements)
        with torch.no_grad():
            shift = torch.full((K,), -torch.inf, dtype=acc, device=z.device)
            for rows in parts:  # each prototype's max over all rows (of all ranks)
                shift = torch.maximum(shift, self._scores(rows).amax(dim=0))
            shift = _all_reduce(shift, dist.ReduceOp.MAX)
            if n_iters == 0:  # only the total is normalised: one global shift is what cancels there
                shift = shift.amax().expand(K)
            self.shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
            tiny = torch.finfo(acc).tiny
            if n_iters == 0:  # Q / total * n_rows (no normalisation per row)
                stats = torch.zeros(2, dtype=acc, device=z.device)
                for rows in parts:
                    stats[0] += self._exp(rows).sum()
                stats[1] = float(logits.n_rows)
                stats = _all_reduce(stats)
                self.scale = stats[1] / stats[0].clamp_min(tiny)
                return
            log_r = None
            for _ in range(n_iters):
                rowsum = torch.zeros(K, dtype=acc, device=z.device)
                for rows in parts:
                    a = self._shifted(rows)
                    if log_r is not None:  # the previous round's per-sample normalisation, in log space
                        a -= torch.logsumexp(a + log_r, dim=-1, keepdim=True)
                    rowsum += a.exp_().sum(dim=0)  # first round: every sample weighs 1 (the total cancels)
                log_r = -torch.log(_all_reduce(rowsum).clamp_min(tiny))
                # Re-centre: the skipped total normalisations (/K, /B) add about log(K / rows) to every
                # entry each round; one constant cancels in the next round's and the targets' softmax,
                # but unbounded it left fp32 (and, after ~300 rounds, fp64) at exp's under/overflow.
                # The largest scale is 0 after this, the others span what the scores span.
                log_r = log_r - log_r.amax()
            self.log_r = log_r

    def _scores(self, rows: Rows) -> torch.Tensor:
        return upcast(self.logits(rows)) / self.temp

    def _shifted(self, rows: Rows) -> torch.Tensor:
        return self._scores(rows) - self.shift

    def _exp(self, rows: Rows) -> torch.Tensor:
        return self._shifted(rows).exp_()

    @property
    def n_rows(self) -> int:
        return self.logits.n_rows

    @torch.no_grad()
    def __call__(self, rows: Rows = slice(None)) -> torch.Tensor:
        """The targets (n, K) of ``rows`` (fp32, or fp64 for fp64 inputs)."""
        if self.n_iters == 0:
            return self._exp(rows).mul_(self.scale)
        # E_b * r / sum_k(E_bk r_k), as a softmax: a row far below every prototype's max does not underflow
        return F.softmax(self._shifted(rows) + self.log_r, dim=-1)


@dataclass
class Term:
    """One loss term on a group's rows: ``coef * sum_rows weight_r * CE(target_r, softmax(logits_r / temp))``.

    ``target(rows)`` gives the (n, K) target rows (no gradient) for a slice of the group's rows;
    ``weight`` is one number for every row or a (n_rows,) tensor; ``index`` is the term's slot in
    the returned values."""

    index: int
    target: Callable[[slice], torch.Tensor]
    weight: Union[float, torch.Tensor]
    temp: float
    coef: float


@dataclass
class Group:
    """Rows ``[start, start + n)`` of ``z`` and the terms computed on them (one logits chunk serves all)."""

    start: int
    n: int
    terms: List[Term] = field(default_factory=list)


def head_loss(z: torch.Tensor, w: torch.Tensor, groups: Sequence[Group], n_values: int,
              chunk_elements: int = 0) -> tuple:
    """``(loss, values)``: the differentiable ``sum coef * term`` of one head and the (n_values,) term values
    (no gradient), with the logits ``F.linear(z, w)`` formed chunk by chunk (:class:`_HeadLoss`)."""
    return _HeadLoss.apply(z, w, (tuple(groups), n_values, chunk_elements, linear_dtype(z, w)))


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, w, plan):
        groups, n_values, chunk_elements, dtype = plan
        grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        K = w.shape[0]
        values = torch.zeros(n_values, dtype=acc, device=z.device)
        gz = torch.zeros_like(z) if grad else None
        gw = torch.zeros(w.shape, dtype=acc, device=w.device) if grad else None
        with _no_autocast(z.device.type):
            wc = w.to(dtype)
            for group in groups:
                for part in chunks(group.n, K, chunk_elements):
                    rows = slice(group.start + part.start, group.start + part.stop)
                    zc = z[rows].to(dtype)
                    s0 = upcast(F.linear(zc, wc))
                    g_logits = None
                    for term in group.terms:
                        ls = F.log_softmax(s0 / term.temp, dim=-1)
                        t = term.target(part)
                        wr = term.weight[part] if isinstance(term.weight, torch.Tensor) else term.weight
                        per_row = -(t * ls).sum(dim=-1)
                        values[term.index] += (per_row * wr).sum()
                        if grad:
                            scale = (wr * (term.coef / term.temp)) if isinstance(wr, torch.Tensor) else \
                                wr * term.coef / term.temp
                            g = ls.exp_().mul_(t.sum(dim=-1, keepdim=True)).sub_(t)
                            g *= scale.unsqueeze(-1) if isinstance(scale, torch.Tensor) else scale
                            g_logits = g if g_logits is None else g_logits.add_(g)
                        del ls, t
                    if grad and g_logits is not None:
                        gc = g_logits.to(dtype)
                        gz[rows] = (gc @ wc).to(z.dtype)
                        gw += (gc.t() @ zc).to(acc)
        coefs = {term.index: term.coef for group in groups for term in group.terms}
        loss = values.new_zeros(())
        for i, c in coefs.items():
            loss = loss + c * values[i]
        ctx.mark_non_differentiable(values)
        if grad:
            ctx.save_for_backward(gz, gw.to(w.dtype))
        return loss, values

    @staticmethod
    def backward(ctx, g_loss, g_values):
        gz, gw = ctx.saved_tensors
        return gz * g_loss.to(gz.dtype), gw * g_loss.to(gw.dtype), None
