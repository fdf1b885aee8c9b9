"""Loading a trained backbone out of a training checkpoint (what extraction, export and evaluation start from)."""

from __future__ import annotations

from typing import Optional

from poa_hpc.errors import UsageError

__all__ = ["load_teacher"]


def load_teacher(ckpt_path: str, which: str, step: Optional[int] = None):
    """``(config, backbone, step)``: the ``which`` branch (``teacher`` or ``student``) of a training checkpoint
    (a file, or a run folder; ``step``: a kept checkpoint instead of the newest), frozen in eval mode."""
    from poa_hpc.checkpoint.layout import load_checkpoint
    from poa_hpc.config import from_dict
    from poa_hpc.train.meta_arch import build_branch

    try:
        ckpt = load_checkpoint(ckpt_path, step=step)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    cfg = from_dict(ckpt["config"])
    branch = build_branch(cfg, 0.0)
    prefix = f"{which}."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    branch.load_state_dict(state)
    backbone = branch.backbone.eval().requires_grad_(False)
    return cfg, backbone, int(ckpt.get("step", 0))
