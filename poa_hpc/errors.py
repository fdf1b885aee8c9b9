"""Every exception type poa_hpc raises on purpose, and the exit code each one ends ``poa`` with.

Import-free (no torch), so any module can raise them and the launcher can classify them.

====  ==================================================================
0     finished
1     crashed (an unexpected error; also a collective that timed out or
      lost a rank) — a Slurm job restarts after it
2     bad input: config, paths, data, a checkpoint of another configuration
3     the loss became NaN/inf (the last good checkpoint is untouched)
4     a checkpoint or the run folder could not be written (disk full,
      quota, read-only or unwritable folder); the committed checkpoints
      are intact
5     the job gave up: ``--max-restarts`` restarts without a newer checkpoint
128+N stopped by signal N after checkpointing the finished step
====  ==================================================================

Codes 2-4 do not restart a Slurm job: the same input, the same step (training is
deterministic) or the same full disk would fail again.  A new error type subclasses
:class:`PoaError` (or one of the classes below) and so carries its exit code; the
message is printed as one line, never with a traceback.
"""

EXIT_CRASH = 1
EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_WRITE = 4
EXIT_GAVE_UP = 5
# Failures a restart would only repeat.
FATAL_EXIT_CODES = {EXIT_USAGE: "bad input", EXIT_NONFINITE: "non-finite loss",
                    EXIT_WRITE: "checkpoint could not be written"}


class PoaError(Exception):
    """A failure poa_hpc knows: one line on stderr and ``exit_code``."""

    exit_code = EXIT_CRASH


class UsageError(PoaError):
    """Bad input from the user (arguments, paths, files): printed as one line, exit code 2."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError, ValueError):
    """A configuration file or override is invalid; the message names the key."""


class DataError(UsageError, ValueError):
    """User data that cannot be trained or evaluated on (missing/empty root, too few images,
    unreadable index or shard); the message names the key or path and what to do."""


class ResumeError(UsageError, ValueError):
    """A checkpoint that cannot be resumed (another configuration, an unknown format)."""


class SubmitError(UsageError, RuntimeError):
    """``poa submit`` arguments or environment that cannot make a job."""


class ExportError(PoaError, RuntimeError):
    """An exported network does not reproduce PyTorch's output (e.g. ONNX beyond the tolerance)."""

    exit_code = EXIT_CRASH


class NonFiniteLossError(PoaError, RuntimeError):
    """The loss became NaN/inf: exit code 3."""

    exit_code = EXIT_NONFINITE


class OutputWriteError(PoaError, RuntimeError):
    """A checkpoint or the run folder could not be written: exit code 4."""

    exit_code = EXIT_WRITE


class WorkerFailure(PoaError, RuntimeError):
    """A torchrun worker crashed or was killed (its own error is in the output): one line, exit code 1."""

    exit_code = EXIT_CRASH


class SlurmError(PoaError, RuntimeError):
    """A Slurm command (scontrol, sbatch) failed."""

    exit_code = EXIT_CRASH
