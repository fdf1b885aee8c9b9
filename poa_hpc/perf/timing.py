"""Per-phase times of the training step without host synchronisations on the hot path.

On a GPU each phase of device work (teacher, intact, elastic, optimizer + EMA) is bracketed by two
CUDA events, recorded asynchronously; they are read at logged steps only, after one
``synchronize`` of the last event (the one host synchronisation a logged step adds).  On the CPU
the phases are timed with ``perf_counter``.  Host-side waits (the data loader, checkpoints) are
timed with ``perf_counter`` on both.  :meth:`StepTimer.collect` returns milliseconds per step
averaged since the previous collection, and the wall-clock step time over the same steps.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Dict, Iterator, List, Tuple

import torch

__all__ = ["StepTimer"]


class StepTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._events: List[Tuple[str, object, object]] = []
        self._totals: Dict[str, float] = defaultdict(float)
        self._steps = 0
        self._t_last = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Device work: CUDA events on a GPU, ``perf_counter`` on the CPU."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._totals[name] += time.perf_counter() - t0

    @contextlib.contextmanager
    def host(self, name: str) -> Iterator[None]:
        """Host-side waits (data loading, checkpointing): ``perf_counter``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._totals[name] += time.perf_counter() - t0

    def step_done(self) -> None:
        self._steps += 1

    def collect(self) -> Tuple[int, Dict[str, float]]:
        """``(steps, times)``: the steps since the last call and ``time/<phase>_ms`` per step over them, with
        ``time/step_ms`` (wall clock per step, the device's work included); one synchronisation on a GPU."""
        if self._events:
            self._events[-1][2].synchronize()
            for name, start, end in self._events:
                self._totals[name] += start.elapsed_time(end) / 1e3
            self._events.clear()
        now = time.perf_counter()
        steps = max(self._steps, 1)
        out = {f"time/{k}_ms": 1e3 * v / steps for k, v in self._totals.items()}
        out["time/step_ms"] = 1e3 * (now - self._t_last) / steps
        self._totals.clear()
        self._steps = 0
        self._t_last = now
        return steps, out
