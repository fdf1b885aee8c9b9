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
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from safetensors.torch import load_file, save_file

from poa_hpc.files import atomic_write
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
    atomic_write(path, lambda tmp: save_file({k: v.float().contiguous() for k, v in state.items()}, tmp,
                                              metadata=metadata))
    return path


def read_subnet(path: str | Path) -> Tuple[str, Any, Dict[str, torch.Tensor], dict]:
    """``(family, dense arch, tensors, meta)`` of a file written by :func:`save_subnet`."""
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
    arch = get_backbone(family).config_cls(**json.loads(metadata["arch"]))
    meta = {k: json.loads(v) for k, v in metadata.items() if k not in ("format", "arch")}
    return family, arch, state, meta


def load_subnet(path: str | Path, attn_backend: str = "sdpa"):
    """Load a dense sub-network written by :func:`save_subnet` as a ready network (eval mode).

    Returns ``(model, meta)``; ``meta`` holds what was recorded at extraction plus ``arch``
    (the dense architecture) and ``family``."""
    family, arch, state, meta = read_subnet(path)
    model = get_backbone(family).build_dense(arch, attn_backend=attn_backend)
    model.load_state_dict(state)
    model.eval()
    meta["arch"] = arch
    meta["family"] = family
    return model, meta


def export_timm(path: str | Path, family: str, arch: Any, state: Dict[str, torch.Tensor],
                img_size: int | None = None, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                **provenance: object) -> Tuple[Path, Path]:
    """Write ``<path>.safetensors`` (a timm state dict) and ``<path>.json`` such that::

        meta = json.load(open("x.json"))
        model = timm.create_model(meta["timm_model"], pretrained=False, num_classes=0, **meta["timm_kwargs"])
        for name, value in meta["timm_attributes"].items():  # what kwargs cannot say (Swin: window shifts)
            module, attr = name.rsplit(".", 1); setattr(model.get_submodule(module), attr, tuple(value))
        model.load_state_dict(safetensors.torch.load_file("x.safetensors"))  # strict

    gives the sub-network's features on ``input_size`` inputs normalised with ``mean`` / ``std``."""
    e = get_backbone(family).timm_export(arch, state, img_size=img_size)
    size = e.kwargs.get("img_size") or img_size or getattr(arch, "img_size", None)
    path = Path(path)
    weights, info = path.with_suffix(".safetensors"), path.with_suffix(".json")
    weights.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(weights, lambda tmp: save_file({k: v.float().contiguous() for k, v in e.state.items()}, tmp))
    meta = {"timm_model": e.model, "timm_kwargs": e.kwargs, "timm_attributes": e.attributes,
            "input_size": [getattr(arch, "in_chans", 3), size, size], "mean": list(mean), "std": list(std),
            "poa_hpc": {"family": family, "arch": dataclasses.asdict(arch), **provenance}}
    atomic_write(info, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return weights, info


def extract_to(backbone, subs, out: Path, single_file: bool, step: int, source: str, config: dict) -> list:
    """Write each sub-network of ``subs`` of the elastic ``backbone`` as a poa_hpc safetensors file: ``out``
    itself (``single_file``) or ``out/<family>_<sub>.safetensors``; ``config`` (the run's, as a dict) is recorded."""
    paths = []
    for sub in subs:
        arch, state = extract_state_dict(backbone, sub)
        path = out if single_file else out / f"{backbone.family}_{sub}.safetensors"
        save_subnet(path, backbone.family, arch, state, width=sub.width, depth=sub.depth, step=step, source=source,
                    config=config)
        paths.append(path)
    return paths
