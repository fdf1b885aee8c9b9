"""Exit codes of ``poa`` and of a training process, and the one-line messages of known failures.

Exit codes of ``poa`` (and of a training task):

====  ==================================================================
0     finished
1     crashed (an unexpected error; also a collective that timed out or
      lost a rank, and a torchrun worker that crashed or was killed)
2     bad input: config, paths, a checkpoint of another configuration
3     the loss became NaN/inf (the last good checkpoint is untouched)
4     a checkpoint or the run folder could not be written (disk full,
      quota, read-only or unwritable folder); the committed checkpoints
      are intact
128+N stopped by signal N after checkpointing the finished step
====  ==================================================================

Nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional, Tuple

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_WRITE = 4
# Failures a restart would only repeat.
FATAL_EXIT_CODES = {EXIT_USAGE: "bad input", EXIT_NONFINITE: "non-finite loss",
                    EXIT_WRITE: "checkpoint could not be written"}

def collective_failure(exc: BaseException) -> Optional[str]:
    """A one-line explanation if ``exc`` is a collective that timed out or lost its peer, else ``None``."""
    name = type(exc).__name__
    text = str(exc)
    if not (isinstance(exc, RuntimeError) and (name.startswith("Dist") or "gloo" in text or "NCCL" in text
                                               or "c10d" in text or "ProcessGroup" in text)):
        return None
    first = text.strip().splitlines()[0] if text.strip() else name
    first = first.split("] ", 1)[-1] if first.startswith("[") else first  # drop gloo's source location
    first = first.split(". This is typically", 1)[0][:160]  # and gloo's advice
    if "timed out" in text.lower() or "timeout" in text.lower():
        return f"a collective did not complete within dist.timeout_s (another rank is stuck or gone): {first}"
    if any(s in text for s in ("Connection reset", "Connection closed", "Broken pipe", "Connection refused",
                               "Read error", "Write error", "remote process exited")):
        return f"lost the connection to another rank (it probably died; see its log): {first}"
    return None


def classify_error(exc: BaseException) -> Optional[Tuple[int, str]]:
    """(exit code, one-line message) of a known failure; ``None`` for an unexpected one (a crash)."""
    from poa_hpc.config import ConfigError
    from poa_hpc.train.checkpoint import OutputWriteError

    try:  # these modules import torch; the classes exist only once they are imported anyway
        from poa_hpc.train.trainer import NonFiniteLossError, ResumeError
    except ImportError:  # pragma: no cover
        NonFiniteLossError = ResumeError = ()  # type: ignore
    try:
        from poa_hpc.cli import UsageError
        from poa_hpc.launch.submit import SubmitError
    except ImportError:  # pragma: no cover
        UsageError = SubmitError = ()  # type: ignore
    if isinstance(exc, OutputWriteError):
        return EXIT_WRITE, str(exc)
    if isinstance(exc, NonFiniteLossError):
        return EXIT_NONFINITE, str(exc)
    if isinstance(exc, (ConfigError, UsageError, ResumeError, SubmitError, FileNotFoundError, NotADirectoryError)):
        return EXIT_USAGE, str(exc)
    collective = collective_failure(exc)
    if collective:
        return EXIT_CRASH, collective
    try:
        from poa_hpc.cli import WorkerFailure
    except ImportError:  # pragma: no cover
        WorkerFailure = ()  # type: ignore
    if isinstance(exc, WorkerFailure):
        return EXIT_CRASH, str(exc)
    return None


def describe(exc: BaseException) -> Tuple[int, str]:
    """(exit code, one line) for any exception: a known one's, else 1 and ``Type: message``."""
    known = classify_error(exc)
    if known:
        return known
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(exc, SystemExit):
        return (exc.code if isinstance(exc.code, int) else 1), "exited"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return EXIT_CRASH, f"{type(exc).__name__}: {text}"[:300]


def exit_rank(code: int) -> int:
    """Return ``code``, or, in a rank of a multi-process run, leave now with it.

    After a failure the process group is destroyed without the usual barrier; the
    interpreter's teardown then runs C++ destructors of process-group and
    checkpoint threads that can abort the process (SIGABRT, "terminate called
    without an active exception"), which would replace the exit code the
    launcher and the restart logic read.  Output is flushed first.
    """
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return code
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
