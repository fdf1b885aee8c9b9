"""Where evaluated networks come from: a run's (or checkpoint's) elastic teacher, or extracted files."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from poa_hpc.config import from_dict
from poa_hpc.errors import UsageError

__all__ = ["load_teacher", "extract_to", "load_subnet_files", "split_files_and_overrides", "run_folder"]


def load_teacher(ckpt_path: str, which: str = "teacher", step: Optional[int] = None):
    """``(config, elastic backbone of branch `which`, step)`` of a training checkpoint or run folder."""
    from poa_hpc.train.checkpoint import load_checkpoint
    from poa_hpc.train.meta_arch import build_branch

    try:
        ckpt = load_checkpoint(ckpt_path, step=step)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    cfg = from_dict(ckpt["config"])
    branch = build_branch(cfg, 0.0)
    prefix = f"{which}."
    branch.load_state_dict({k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)})
    return cfg, branch.backbone.eval().requires_grad_(False), int(ckpt.get("step", 0))


def extract_to(cfg, backbone, subs, out: Path, step: int, source: str) -> List[Path]:
    """``poa extract``'s files of ``subs`` under the folder ``out``."""
    from poa_hpc.config import to_dict
    from poa_hpc.models.extract import extract_state_dict, save_subnet

    paths = []
    for sub in subs:
        arch, state = extract_state_dict(backbone, sub)
        path = out / f"{backbone.family}_{sub}.safetensors"
        save_subnet(path, backbone.family, arch, state, width=sub.width, depth=sub.depth, step=step, source=source,
                    config=to_dict(cfg))
        paths.append(path)
    return paths


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
