"""Graceful stop on a signal: finish the step, checkpoint, return.

A cluster tells a job to stop with a signal: ``SIGTERM`` when it is cancelled
or requeued (``scancel``, ``scontrol requeue``, preemption), ``SIGUSR2`` (or
whatever ``--signal`` names) shortly before its time limit.  A handler that
saved a checkpoint on the spot would interrupt the step in the middle, possibly
inside a collective, and the ranks would save different steps.  Instead the
handler only records the signal; the training loop polls :attr:`StopRequest.signal`
at each step boundary, agrees with the other ranks (any rank's signal stops all
of them), checkpoints the finished step and returns.  Nothing is lost but the
step in flight.

``SIGTERM`` is only caught once the training loop starts (:meth:`StopRequest.arm`):
before that there is nothing to checkpoint, and a process that is still starting
(waiting for the other ranks, loading a checkpoint) should end at once when
cancelled, or when srun or torchrun end a step whose other rank died, instead of
holding the allocation until the SIGKILL that follows.  ``SIGUSR1``/``SIGUSR2``
are caught from the start (their default action would kill the process without
the requeue a time-limit warning asks for).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Dict, Iterable, Optional

log = logging.getLogger("poa_hpc.train")

__all__ = ["StopRequest", "DEFAULT_STOP_SIGNALS"]

DEFAULT_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
DEFERRED_SIGNALS = (signal.SIGTERM,)  # caught from arm() on


class StopRequest:
    """Records the first stop signal received; installs and restores the handlers.

    Use as a context manager around training.  ``signal`` is the received
    signal's number (or ``None``); ``name`` its name.
    """

    def __init__(self, signals: Iterable[int] = DEFAULT_STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.signal: Optional[int] = None
        self._previous: Dict[int, object] = {}

    @property
    def name(self) -> Optional[str]:
        return None if self.signal is None else signal.Signals(self.signal).name

    def _handler(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signal is None:
            self.signal = int(signum)
            log.warning("received %s: stopping after this step with a checkpoint", signal.Signals(signum).name)

    def install(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopRequest.install() must run in the main thread")
        for s in self.signals:
            if s not in DEFERRED_SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def arm(self) -> None:
        """Catch the deferred signals too (``SIGTERM``); called when the training loop starts."""
        if threading.current_thread() is not threading.main_thread():
            return
        for s in self.signals:
            if s in DEFERRED_SIGNALS and s not in self._previous:
                self._previous[s] = signal.signal(s, self._handler)

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()
