"""Metric loggers as plug-ins: one :class:`Logger` class per backend, registered by name.

``train.loggers`` names the backends of a run (``jsonl`` is always on: ``metrics.jsonl`` in the run
folder, which ``poa plot`` reads).  Only the main rank builds loggers.  Every record the trainer
writes to ``metrics.jsonl`` goes to every logger with its ``step``; the config goes in once as the
run's parameters.

One run per training run, across every requeue and restart: a backend that has a run id (W&B,
MLflow) stores it in ``<train.output_dir>/loggers.json`` and reuses it on ``--resume``.  A resumed
run recomputes, exactly (see :mod:`poa_hpc.train.trainer`), the steps between its checkpoint and
the point where the previous attempt died; ``jsonl`` drops its own lines past the checkpoint and
TensorBoard purges them (``purge_step``), while W&B and MLflow, which cannot delete points, skip
the steps the previous attempts already logged (``Logger.skip_through``: the
backend's own last step when it can tell — MLflow's metric history, W&B's resumed summary or, offline,
its ``.wandb`` files — else the last step of the previous ``metrics.jsonl``).  So each step appears once
in every backend; what a SIGKILL took before the backend wrote it (W&B flushes its file every
``WANDB__TRANSACTION_LOG_FLUSH_INTERVAL`` seconds, 15 by default) is the only gap.

A backend is one module of this package that registers its class with :func:`register_logger`;
an optional package is imported inside :meth:`Logger.open`, and a missing one is a one-line
:class:`~poa_hpc.errors.ConfigError` naming the extra to install.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from poa_hpc.errors import ConfigError, OutputWriteError

__all__ = ["Logger", "LoggerSet", "check_available", "register_logger", "get_logger", "logger_names", "build_loggers",
           "RUN_IDS", "read_run_ids", "last_logged_step"]

RUN_IDS = "loggers.json"  # in the run folder: backend name -> its run id

_REGISTRY: Dict[str, type] = {}


def register_logger(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"logger '{name}' is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def logger_names() -> List[str]:
    return sorted(_REGISTRY)


def get_logger(name: str) -> type:
    if name not in _REGISTRY:
        raise ConfigError(f"key 'train.loggers': unknown logger {name!r}, expected some of {logger_names()}")
    return _REGISTRY[name]


class Logger:
    """One backend.  ``open`` is called once per attempt (fresh or resumed) on the main rank."""

    name: str = ""
    #: steps <= this were logged by an earlier attempt of the same run (-1: none)
    skip_through: int = -1

    def open(self, cfg: Any, run_dir: Path, start_step: int, run_id: Optional[str]) -> Optional[str]:
        """Start (``run_id`` None) or continue the run; returns the run id to store (None: none)."""
        return None

    def logged_through(self) -> Optional[int]:
        """After ``open`` continued a run: the last step the backend holds, if it can tell (else the
        last step of the previous attempt's metrics.jsonl is used)."""
        return None

    def log(self, record: Dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def missing_extra(package: str, extra: str) -> ConfigError:
    return ConfigError(f"key 'train.loggers': the {extra} logger needs the '{package}' package: "
                       f"pip install 'poa_hpc[{extra}]'")


def read_run_ids(run_dir: Path) -> Dict[str, str]:
    p = Path(run_dir) / RUN_IDS
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except (OSError, ValueError):
        return {}


def _write_run_ids(run_dir: Path, ids: Dict[str, str]) -> None:
    p = Path(run_dir) / RUN_IDS
    tmp = p.with_name(p.name + ".tmp")
    try:
        tmp.write_text(json.dumps(ids, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, p)
    except OSError as exc:
        raise OutputWriteError(f"the logger run ids '{p}' could not be written: {exc}") from None


def last_logged_step(metrics: Path) -> int:
    """The largest ``step`` in a metrics.jsonl (-1 if none); a torn last line is ignored."""
    last = -1
    try:
        lines = Path(metrics).read_text().splitlines() if Path(metrics).is_file() else []
    except OSError:
        return -1
    for ln in lines:
        try:
            last = max(last, int(json.loads(ln)["step"]))
        except (ValueError, KeyError, TypeError):
            continue
    return last


def selected(cfg: Any) -> List[str]:
    """``train.loggers`` with ``jsonl`` first (always on) and the legacy ``train.tensorboard: true``."""
    load_all()
    names = ["jsonl"] + [n for n in cfg.train.loggers if n != "jsonl"]
    if cfg.train.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    for n in names:
        get_logger(n)
    return list(dict.fromkeys(names))


_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # logger -> package (= extra)


def check_available(cfg: Any) -> None:
    """On every rank before training: a logger whose package is missing is a one-line error naming the
    extra (here, rather than on rank 0 alone when it opens its loggers, so no rank waits for it)."""
    import importlib

    for n in selected(cfg):
        pkg = _PACKAGES.get(n)
        if pkg is not None:
            try:
                importlib.import_module(pkg)
            except ImportError:
                raise missing_extra(pkg, n) from None


class LoggerSet:
    """The loggers of one attempt; ``log`` sends a record to each (``jsonl`` first)."""

    def __init__(self, loggers: List[Logger]):
        self.loggers = loggers

    def log(self, record: Dict[str, float]) -> None:
        for lg in self.loggers:
            if record["step"] > lg.skip_through:
                lg.log(record)

    def close(self) -> None:
        for lg in reversed(self.loggers):
            try:
                lg.close()
            except Exception:  # closing must not hide the run's own error
                pass


BACKENDS = ("jsonl", "tensorboard", "wandb", "mlflow")  # one module each in this package: one line to add one


def _import_backends() -> None:
    """Import every backend module (each registers itself), by name as the backbone registry does."""
    import importlib

    for name in BACKENDS:
        importlib.import_module(f"{__name__}.{name}")


def build_loggers(cfg: Any, run_dir: Path, start_step: int, resume: bool) -> LoggerSet:
    """Open the loggers of ``train.loggers`` for an attempt starting at ``start_step`` (main rank only)."""
    _import_backends()

    run_dir = Path(run_dir)
    names = selected(cfg)
    earlier = last_logged_step(run_dir / "metrics.jsonl") if resume else -1
    ids = read_run_ids(run_dir) if resume else {}
    new_ids: Dict[str, str] = {}
    opened: List[Logger] = []
    try:
        for n in names:
            lg = get_logger(n)()
            rid = lg.open(cfg, run_dir, start_step, ids.get(n))
            if rid is not None:
                new_ids[n] = rid
                if ids.get(n) == rid:  # the same run continues: skip what the earlier attempts logged
                    held = lg.logged_through()
                    lg.skip_through = held if held is not None else earlier
            opened.append(lg)
    except BaseException:
        LoggerSet(opened).close()
        raise
    if new_ids != {k: v for k, v in ids.items() if k in new_ids} or (new_ids and not ids):
        _write_run_ids(run_dir, {**read_run_ids(run_dir), **new_ids})
    return LoggerSet(opened)


def load_all() -> None:
    """Import every backend module (registration), for listing the names."""
    _import_backends()
