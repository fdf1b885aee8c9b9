"""torchrun's agent run in this process, with the workers' exit codes as one line (``poa train --nproc``,
``poa eval finetune --nproc``)."""

from __future__ import annotations

import signal
from typing import List

from poa_hpc.errors import FATAL_EXIT_CODES, WorkerFailure


def torchrun(argv: List[str], max_restarts: int) -> int:
    """torchrun's agent, in this process: the exit code is the workers' (2/3/4 for their known errors,
    128+N when they stopped on a signal), and a worker failure is one line here rather than
    torchrun's ChildFailedError traceback (each worker prints its own error above it)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
        return 0
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        root, first = exc.get_first_failure()
        codes = [f.exitcode for f in exc.failures.values()]
        fatal = [c for c in [first.exitcode, *codes] if c in FATAL_EXIT_CODES]
        if fatal:
            return fatal[0]
        if all(c > 128 for c in codes):  # every worker stopped on a signal (with a checkpoint)
            return codes[0]
        how = (f"was killed by {signal.Signals(-first.exitcode).name}" if first.exitcode < 0
               else f"exited with code {first.exitcode}")
        after = f" after {max_restarts} restart(s) (--max-restarts)" if max_restarts else ""
        raise WorkerFailure(f"rank {root} (pid {first.pid}) {how}; torchrun ended the run{after}. Its error "
                            f"is in the output above; continue with --resume") from None
