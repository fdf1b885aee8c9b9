"""Per-iteration hyper-parameter schedules (DINOv2's CosineScheduler + POA's span trick).

DINOv2 builds every schedule with ``CosineScheduler``: ``freeze_iters`` zeros, then
``np.linspace(start_warmup_value, base_value, warmup_iters)``, then a half cosine from
``base_value`` to ``final_value`` over the remaining iterations.  POA (authors' code,
``iter_num_scale``) lays the cosine out over ``span = int(total_iters / s)`` iterations
and cuts the result at ``total_iters``, so a run with ``s = 0.78`` stops ~78% of the way
down the cosine instead of at ``final_value``.  Only the cosine part is stretched: the
warm-up and the freeze keep their lengths.

All arrays are numpy float64 of length ``total_iters``; :meth:`Schedules.at` returns the
``final_value`` of each schedule past the end, as ``CosineScheduler.__getitem__`` does.

Phase lengths are given in epochs (``optim.warmup_epochs``, ``optim.freeze_last_layer_epochs``,
``loss.warmup_teacher_temp_epochs``, ``loss.ibot_start_epoch``) and converted with the run's
iterations per epoch, or directly in steps: a ``*_steps`` / ``*_step`` key that is not null
(``optim.warmup_steps``, ``optim.freeze_last_layer_steps``, ``loss.warmup_teacher_temp_steps``,
``loss.ibot_start_step``) replaces its epoch key.  On a small data set an epoch is a few dozen
steps (the demo's digits: 22), so phases measured in epochs there are far shorter, in
optimizer steps, than the same numbers of epochs at ImageNet scale (1,250 steps per epoch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict

import numpy as np

from poa_hpc.config import POAConfig

__all__ = ["PhaseSteps", "Schedules", "build_schedules", "cosine_schedule", "phase_steps", "scaled_lr"]

_NAMES = ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr")


def cosine_schedule(
    base_value: float,
    final_value: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup_value: float = 0.0,
    freeze_iters: int = 0,
    span: int | None = None,
) -> np.ndarray:
    """DINOv2 ``CosineScheduler(...).schedule`` with POA's span, as a float64 array.

    ``freeze_iters`` zeros, ``linspace(start_warmup_value, base_value, warmup_iters)``,
    then ``final + 0.5 (base - final) (1 + cos(pi i / n))`` for ``i in range(n)`` with
    ``n = span - warmup_iters - freeze_iters``; the whole is cut at ``total_iters``.

    Unlike the reference (which asserts), a freeze/warm-up longer than the run is clipped
    to the run, so the result is always well defined: ``freeze`` zeros fill at most the
    whole run and the warm-up then reaches ``base_value`` on the last iteration.
    """
    total_iters = int(total_iters)
    if total_iters < 0:
        raise ValueError(f"total_iters must be >= 0, got {total_iters}")
    span = total_iters if span is None else max(int(span), total_iters)
    freeze = min(max(int(freeze_iters), 0), total_iters)
    warmup = min(max(int(warmup_iters), 0), total_iters - freeze)
    n_cos = span - warmup - freeze  # >= total_iters - warmup - freeze >= 0
    if n_cos > 0:
        i = np.arange(n_cos, dtype=np.float64)
        cos = final_value + 0.5 * (base_value - final_value) * (1.0 + np.cos(np.pi * i / n_cos))
    else:
        cos = np.zeros(0, dtype=np.float64)
    sched = np.concatenate(
        (
            np.zeros(freeze, dtype=np.float64),
            np.linspace(start_warmup_value, base_value, warmup, dtype=np.float64),
            cos,
        )
    )[:total_iters]
    assert len(sched) == total_iters
    return sched


def scaled_lr(cfg: POAConfig, world_size: int = 1) -> float:
    """Peak lr: ``base_lr * sqrt(global_batch / lr_ref_batch)`` (DINOv2 sqrt_wrt_1024 rule)."""
    o = cfg.optim
    global_batch = o.batch_size * max(int(world_size), 1)
    return o.base_lr * math.sqrt(global_batch / o.lr_ref_batch)


@dataclass(frozen=True)
class PhaseSteps:
    """Lengths of the schedule phases in optimizer steps (before clipping to the run)."""

    warmup: int  # lr linear warm-up
    freeze_last_layer: int  # last head layer's lr held at 0
    warmup_teacher_temp: int  # teacher temperature linear warm-up
    ibot_start: int  # first step with the iBOT loss


def phase_steps(cfg: POAConfig, iters_per_epoch: int) -> PhaseSteps:
    """Each phase's ``*_steps`` / ``*_step`` key when not null, else its epoch key times ``iters_per_epoch``."""
    ipe = int(iters_per_epoch)
    o, loss = cfg.optim, cfg.loss

    def pick(steps, epochs) -> int:
        return max(int(steps), 0) if steps is not None else max(int(epochs * ipe), 0)

    return PhaseSteps(
        warmup=pick(o.warmup_steps, o.warmup_epochs),
        freeze_last_layer=pick(o.freeze_last_layer_steps, o.freeze_last_layer_epochs),
        warmup_teacher_temp=pick(loss.warmup_teacher_temp_steps, loss.warmup_teacher_temp_epochs),
        ibot_start=pick(loss.ibot_start_step, loss.ibot_start_epoch),
    )


@dataclass
class Schedules:
    """Per-iteration values, arrays of length ``total_iters`` (float64)."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    last_layer_lr: np.ndarray
    # value returned past the end of each array (CosineScheduler.final_value)
    final: Dict[str, float] = field(default_factory=dict)

    @property
    def total_iters(self) -> int:
        return len(self.lr)

    def __len__(self) -> int:
        return len(self.lr)

    def at(self, step: int) -> Dict[str, float]:
        """All five values at ``step`` as python floats; past the end: each final value."""
        step = int(step)
        if step < 0:
            raise IndexError(f"schedule step must be >= 0, got {step}")
        out = {}
        for name in _NAMES:
            arr = getattr(self, name)
            if step < len(arr):
                out[name] = float(arr[step])
            else:
                out[name] = float(self.final.get(name, arr[-1] if len(arr) else 0.0))
        return out


def build_schedules(cfg: POAConfig, iters_per_epoch: int, world_size: int = 1) -> Schedules:
    """Build the lr / wd / momentum / teacher-temperature / last-layer-lr schedules.

    ``total_iters = optim.epochs * iters_per_epoch``; cosine schedules span
    ``int(total_iters / optim.schedule_fraction)`` iterations and are cut at ``total_iters``.
    The teacher temperature is a linear warm-up then constant (no span).  The last-layer
    lr is the lr schedule with its first ``freeze_last_layer_epochs`` epochs set to zero
    (DINOv2/POA: ``last_layer_lr_schedule.schedule[:freeze] = 0``).  Phase lengths come from
    :func:`phase_steps` (epoch keys, or the ``*_steps`` keys when set).
    """
    o, loss = cfg.optim, cfg.loss
    ipe = int(iters_per_epoch)
    if ipe < 1:
        raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
    if o.epochs < 1:
        raise ValueError(f"optim.epochs must be >= 1, got {o.epochs}")
    if not (0.0 < o.schedule_fraction <= 1.0):
        raise ValueError(f"optim.schedule_fraction must be in (0, 1], got {o.schedule_fraction}")
    total = o.epochs * ipe
    span = max(int(total / o.schedule_fraction), total)
    peak = scaled_lr(cfg, world_size)
    phases = phase_steps(cfg, ipe)

    lr = cosine_schedule(peak, o.min_lr, total, warmup_iters=phases.warmup, start_warmup_value=0.0, span=span)
    wd = cosine_schedule(o.weight_decay, o.weight_decay_end, total, span=span)
    momentum = cosine_schedule(o.momentum_teacher, o.final_momentum_teacher, total, span=span)

    # DINOv2: CosineScheduler(teacher_temp, teacher_temp, total_iters=W, warmup_iters=W,
    # start_warmup_value=warmup_teacher_temp); indexing past W returns teacher_temp.
    w = phases.warmup_teacher_temp
    teacher_temp = np.full(total, loss.teacher_temp, dtype=np.float64)
    n = min(w, total)
    teacher_temp[:n] = np.linspace(loss.warmup_teacher_temp, loss.teacher_temp, w, dtype=np.float64)[:n]

    last_layer_lr = lr.copy()
    last_layer_lr[: phases.freeze_last_layer] = 0.0

    final = {
        "lr": o.min_lr,
        "wd": o.weight_decay_end,
        "momentum": o.final_momentum_teacher,
        "teacher_temp": loss.teacher_temp,
        "last_layer_lr": o.min_lr,
    }
    return Schedules(lr=lr, wd=wd, momentum=momentum, teacher_temp=teacher_temp, last_layer_lr=last_layer_lr, final=final)
