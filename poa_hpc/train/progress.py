"""What a Slurm log line says about a run: progress, elapsed time, ETA and a smoothed throughput.

    step 635/1210 (52%)  elapsed 0:02:31  eta 0:02:17  loss 7.69  lr 6.6e-04  sub 48x4  img/s 221 (smoothed)  mfu 41%

The step time is an exponential moving average, bias-corrected like Adam's moments
(``ema / (1 - beta**n)``), of the compute steps only: a step that also wrote a checkpoint or ran the
in-run k-NN is left out (:meth:`StepClock.tick` with ``regular=False``), so neither the ETA nor
img/s jumps after one.  ETA = remaining steps x smoothed step time.
"""

from __future__ import annotations

import time
from typing import Optional


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (hours grow past 24: ``27:03:05``); ``-`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class StepClock:
    """Smoothed seconds per step over the regular steps, elapsed time and ETA of one attempt."""

    def __init__(self, start_step: int, end_step: int, beta: float = 0.9, now: Optional[float] = None):
        self.start_step, self.end_step, self.beta = start_step, end_step, beta
        self.t0 = time.perf_counter() if now is None else now
        self._ema = 0.0
        self._n = 0

    def tick(self, seconds: float, regular: bool = True) -> None:
        """Account one step that took ``seconds``; ``regular=False``: it checkpointed or evaluated (ignored)."""
        if regular:
            self._ema = self.beta * self._ema + (1.0 - self.beta) * seconds
            self._n += 1

    @property
    def step_s(self) -> Optional[float]:
        """Smoothed seconds per step (None before the first regular step)."""
        return self._ema / (1.0 - self.beta ** self._n) if self._n else None

    def eta_s(self, done_steps: int) -> Optional[float]:
        """Seconds left after ``done_steps`` steps (absolute: the run's step count, not this attempt's)."""
        st = self.step_s
        return None if st is None else max(self.end_step - done_steps, 0) * st

    def elapsed_s(self, now: Optional[float] = None) -> float:
        return (time.perf_counter() if now is None else now) - self.t0


def log_line(step: int, end: int, elapsed_s: float, eta_s: Optional[float], loss: float, lr: float, sub: str,
             img_per_s: Optional[float], mfu: Optional[float] = None) -> str:
    """One progress line (``step`` is the step just finished, counted from 0; shown 1-based as done steps)."""
    done = step + 1
    parts = [f"step {done}/{end} ({100 * done // max(end, 1)}%)", f"elapsed {format_duration(elapsed_s)}",
             f"eta {format_duration(eta_s) if eta_s is not None else '-'}", f"loss {loss:.2f}", f"lr {lr:.1e}",
             f"sub {sub}", f"img/s {img_per_s:.0f} (smoothed)" if img_per_s is not None else "img/s -"]
    if mfu is not None:
        parts.append(f"mfu {100 * mfu:.0f}%")
    return "  ".join(parts)
