"""Extraction of dense sub-networks from an elastic backbone of any registered family.

A sub-network becomes a plain network of its family whose tensors are the
sliced weights, with the elastic input scale folded into each projection
weight (the family spec's ``extract_tensors``).  Its forward equals the elastic
forward of the intact model.  Files are safetensors with the family's format
name (``poa_hpc.<family>``) and the dense architecture in the metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from safetensors.torch import load_file, save_file

from poa_hpc.models.registry import backbone_names, get_backbone
from poa_hpc.models.subnets import Subnet


@torch.no_grad()
def extract_state_dict(backbone, sub: Subnet, arch: Any = None) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """Dense architecture and state dict of ``sub`` of the elastic ``backbone``."""
    spec = get_backbone(backbone.family)
    arch = arch if arch is not None else backbone.arch
    spec.space(arch).check(sub)
    dense, state = spec.extract_tensors(backbone.state_dict(), arch, sub)
    return dense, {k: v.detach().clone().contiguous() for k, v in state.items()}


def save_subnet(path: str | Path, family: str, arch: Any, state: Dict[str, torch.Tensor], **meta: object) -> Path:
    """Write a dense sub-network as safetensors (atomically) with its family and architecture in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": get_backbone(family).format, "arch": json.dumps(dataclasses.asdict(arch))}
    metadata.update({k: json.dumps(v) for k, v in meta.items()})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.float().contiguous() for k, v in state.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_subnet(path: str | Path, attn_backend: str = "sdpa"):
    """Load a dense sub-network written by :func:`save_subnet` as a ready network (eval mode).

    Returns ``(model, meta)``; ``meta`` holds what was recorded at extraction plus ``arch``
    (the dense architecture) and ``family``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sub-network file '{path}' does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:
        raise ValueError(f"'{path}' is not a readable safetensors file: {exc}") from None
    fmt = metadata.get("format") or ""
    family = fmt[len("poa_hpc."):] if fmt.startswith("poa_hpc.") else None
    if family not in backbone_names():
        raise ValueError(f"'{path}' is not a poa_hpc sub-network (metadata format={fmt or None!r}; expected one of "
                         f"{['poa_hpc.' + n for n in backbone_names()]})")
    spec = get_backbone(family)
    arch = spec.config_cls(**json.loads(metadata["arch"]))
    model = spec.build_dense(arch, attn_backend=attn_backend)
    model.load_state_dict(state)
    model.eval()
    meta = {k: json.loads(v) for k, v in metadata.items() if k not in ("format", "arch")}
    meta["arch"] = arch
    meta["family"] = family
    return model, meta
