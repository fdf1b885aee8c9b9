"""Where evaluated networks come from: extracted files, or a run folder (its teacher: :func:`poa_hpc.train.load.load_teacher`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence, Tuple

from poa_hpc.errors import UsageError

__all__ = ["load_subnet_files", "split_files_and_overrides", "run_folder"]


def split_files_and_overrides(args: argparse.Namespace, attr: str, what: str = "") -> None:
    """`nargs="+"` also takes dotted overrides written after the files: an argument with '=' that is no file is
    one; move those from ``args.<attr>`` to ``args.overrides``."""
    items = getattr(args, attr)
    files = [a for a in items if "=" not in a or Path(a).exists()]
    args.overrides = [a for a in items if a not in files] + list(getattr(args, "overrides", []) or [])
    setattr(args, attr, files)
    if not files:
        raise UsageError("name the sub-network files written by `poa extract`" + what)


def load_subnet_files(paths: Sequence[str], with_step: bool = False) -> Tuple[list, dict]:
    """``[(name, model)]`` of extracted sub-network files and the first file's metadata; a missing or foreign
    file is a one-line error.  The name is the file's stem (``@step<N>`` appended with ``with_step``)."""
    from poa_hpc.models.extract import load_subnet

    models, meta0 = [], None
    for path in paths:
        try:
            model, meta = load_subnet(path)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        meta0 = meta0 or meta
        stem = Path(path).stem
        models.append((f"{stem}@step{meta['step']}" if with_step and "step" in meta else stem, model))
    return models, meta0


def run_folder(checkpoint: str) -> Path:
    """The run folder of a checkpoint argument (a run folder, its checkpoints/ folder or a file in it)."""
    p = Path(checkpoint)
    if p.is_file():
        p = p.parent
    return p.parent if p.name == "checkpoints" else p
