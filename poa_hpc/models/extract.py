"""Extraction of dense sub-networks from an elastic ViT.

A (width, depth) sub-network becomes a plain ViT whose tensors are the sliced
weights, with the elastic input scale folded into each projection weight
(``F.linear(a * x, W) == F.linear(x, a * W)``).  Its forward equals the elastic
forward of the intact model.  The final LayerNorm is kept (the authors'
extractor drops it; spec §0).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import torch
from safetensors.torch import load_file, save_file

from poa_hpc.kernels.sliced_linear import slice_rows
from poa_hpc.models.vit import ElasticViT, ViTArch, block_ids, build_vit


@torch.no_grad()
def extract_state_dict(model: ElasticViT, width: int, depth: int) -> Tuple[ViTArch, Dict[str, torch.Tensor]]:
    """Dense architecture and state dict of the (width, depth) sub-network of ``model``."""
    arch = model.arch
    sub = arch.sub(width, depth)
    D = arch.embed_dim
    H = int(D * arch.mlp_ratio)
    h = int(round(width * arch.mlp_ratio))
    a_in = D / width  # scale of projections whose input is the embedding
    a_hidden = H / h  # scale of fc2 (its input is the MLP hidden layer)
    sd = model.state_dict()
    out: Dict[str, torch.Tensor] = {
        "patch_embed.proj.weight": sd["patch_embed.proj.weight"][:width],
        "patch_embed.proj.bias": sd["patch_embed.proj.bias"][:width],
        "cls_token": sd["cls_token"][..., :width],
        "pos_embed": sd["pos_embed"][..., :width],
        "mask_token": sd["mask_token"][..., :width],
        "norm.weight": sd["norm.weight"][:width],
        "norm.bias": sd["norm.bias"][:width],
    }
    for new, old in enumerate(block_ids(model.depth, depth)):
        src, dst = f"blocks.{old}.", f"blocks.{new}."
        b = {k[len(src):]: v for k, v in sd.items() if k.startswith(src)}
        g = b.__getitem__
        blk = {
            "norm1.weight": g("norm1.weight")[:width],
            "norm1.bias": g("norm1.bias")[:width],
            "attn.qkv.weight": slice_rows(g("attn.qkv.weight"), width, 3)[:, :width] * a_in,
            "attn.proj.weight": g("attn.proj.weight")[:width, :width] * a_in,
            "attn.proj.bias": g("attn.proj.bias")[:width],
            "ls1.gamma": g("ls1.gamma")[:width],
            "norm2.weight": g("norm2.weight")[:width],
            "norm2.bias": g("norm2.bias")[:width],
            "mlp.fc1.weight": g("mlp.fc1.weight")[:h, :width] * a_in,
            "mlp.fc1.bias": g("mlp.fc1.bias")[:h],
            "mlp.fc2.weight": g("mlp.fc2.weight")[:width, :h] * a_hidden,
            "mlp.fc2.bias": g("mlp.fc2.bias")[:width],
            "ls2.gamma": g("ls2.gamma")[:width],
        }
        if "attn.qkv.bias" in b:
            blk["attn.qkv.bias"] = slice_rows(g("attn.qkv.bias"), width, 3)
        out.update({dst + k: v for k, v in blk.items()})
    return sub, {k: v.detach().clone().contiguous() for k, v in out.items()}


def save_subnet(path: str | Path, arch: ViTArch, state: Dict[str, torch.Tensor], **meta: object) -> Path:
    """Write a dense sub-network as safetensors (atomically) with its architecture in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "poa_hpc.vit", "arch": json.dumps(dataclasses.asdict(arch))}
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


def load_subnet(path: str | Path, attn_backend: str = "sdpa") -> Tuple[ElasticViT, dict]:
    """Load a dense sub-network written by :func:`save_subnet` as a ready ViT (eval mode)."""
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
    if metadata.get("format") != "poa_hpc.vit":
        raise ValueError(f"'{path}' is not a poa_hpc sub-network (metadata format={metadata.get('format')!r})")
    arch = ViTArch(**json.loads(metadata["arch"]))
    model = build_vit(arch, attn_backend=attn_backend)
    model.load_state_dict(state)
    model.eval()
    meta = {k: json.loads(v) for k, v in metadata.items() if k not in ("format", "arch")}
    meta["arch"] = arch
    return model, meta


def to_timm_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """State dict for timm's ``VisionTransformer`` (same names; timm has no mask token)."""
    return {k: v for k, v in state.items() if k != "mask_token"}


def timm_kwargs(arch: ViTArch) -> dict:
    """Keyword arguments that build the matching timm ``VisionTransformer``."""
    return dict(
        img_size=arch.img_size, patch_size=arch.patch_size, in_chans=arch.in_chans, embed_dim=arch.embed_dim,
        depth=arch.depth, num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio, qkv_bias=arch.qkv_bias,
        init_values=arch.layerscale_init, num_classes=0, global_pool="token", class_token=True,
        dynamic_img_size=True,
    )
