"""AdamW with DINOv2 parameter groups (layer-wise lr decay, no wd on bias/norm/gamma).

``param_groups`` follows DINOv2/POA ``get_params_groups_with_decay`` +
``fuse_params_groups`` for the student layout used by poa_hpc::

    backbone.{patch_embed.*, cls_token, pos_embed, mask_token}   layer_id 0
    backbone.blocks.{i}.*                                         layer_id i + 1
    everything else (backbone.norm.*, heads.*)                    layer_id num_layers + 1

``lr_multiplier = layer_decay ** (num_layers + 1 - layer_id)`` (times
``patch_embed_lr_mult`` for patch_embed params); ``wd_multiplier = 0`` for names ending
in ``.bias`` or containing ``norm`` or ``gamma`` (cls_token/pos_embed keep weight decay,
as in DINOv2); ``is_last_layer`` for names containing ``last_layer``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, Iterable, List, Tuple

import torch

from poa_hpc.config import POAConfig

__all__ = ["param_groups", "build_optimizer", "apply_schedules", "clip_grad_norm", "lr_layer_id"]

_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_TOKEN_KEYS = (".pos_embed", ".patch_embed", ".mask_token", ".cls_token")


def _clean(name: str) -> str:
    for p in _WRAPPER_PREFIXES:
        name = name.replace(p, "")
    if name.startswith("module."):  # DDP
        name = name[len("module.") :]
    return name


def lr_layer_id(name: str, num_layers: int) -> int:
    """Layer index used for layer-wise lr decay (0 .. num_layers + 1)."""
    name = _clean(name)
    if not name.startswith("backbone."):
        return num_layers + 1
    if any(k in name for k in _TOKEN_KEYS):
        return 0
    m = _BLOCK_RE.search(name)
    if m is not None:
        i = int(m.group(1))
        if not (0 <= i < num_layers):
            raise ValueError(f"parameter {name!r} is in block {i} but num_layers={num_layers}")
        return i + 1
    return num_layers + 1


def param_groups(
    named_params: Iterable[Tuple[str, torch.nn.Parameter]], cfg: POAConfig, num_layers: int
) -> List[Dict[str, Any]]:
    """Fused optimizer groups: one per distinct (lr_multiplier, wd_multiplier, is_last_layer).

    Each group: ``params`` (list of tensors), ``names`` (their names, for debugging),
    ``lr_multiplier``, ``wd_multiplier``, ``is_last_layer``.  Frozen parameters
    (``requires_grad=False``) are skipped.  Group order is first-appearance order.
    """
    o = cfg.optim
    fused: Dict[Tuple[float, float, bool], Dict[str, Any]] = {}
    seen: set[int] = set()
    for raw_name, p in named_params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        name = _clean(raw_name)
        lr_mult = o.layer_decay ** (num_layers + 1 - lr_layer_id(name, num_layers))
        if "patch_embed" in name:
            lr_mult *= o.patch_embed_lr_mult
        wd_mult = 0.0 if (name.endswith(".bias") or "norm" in name or "gamma" in name) else 1.0
        is_last = "last_layer" in name
        key = (float(lr_mult), wd_mult, is_last)
        g = fused.get(key)
        if g is None:
            g = fused[key] = {
                "params": [],
                "names": [],
                "lr_multiplier": float(lr_mult),
                "wd_multiplier": wd_mult,
                "is_last_layer": is_last,
            }
        g["params"].append(p)
        g["names"].append(raw_name)
    return list(fused.values())


def build_optimizer(
    named_params: Iterable[Tuple[str, torch.nn.Parameter]], cfg: POAConfig, num_layers: int
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`.  lr and weight decay start at 0: call
    :func:`apply_schedules` before every step (as DINOv2's ``apply_optim_scheduler``)."""
    groups = param_groups(named_params, cfg, num_layers)
    if not groups:
        raise ValueError("build_optimizer: no trainable parameters")
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, betas=(cfg.optim.beta1, cfg.optim.beta2))


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """group lr = (last_layer_lr if is_last_layer else lr) * lr_multiplier; wd = wd * wd_multiplier."""
    for g in optimizer.param_groups:
        base = last_layer_lr if g.get("is_last_layer", False) else lr
        g["lr"] = float(base) * g.get("lr_multiplier", 1.0)
        g["weight_decay"] = float(wd) * g.get("wd_multiplier", 1.0)


def clip_grad_norm(params: Iterable[torch.Tensor] | torch.Tensor, max_norm: float) -> float:
    """Total L2 norm of the gradients (before clipping) as a float; clips if ``max_norm > 0``.

    Uses the foreach kernels where torch supports them for the device (``foreach=None``:
    CUDA uses them, other devices silently fall back).  Parameters without grad are ignored.
    """
    if isinstance(params, torch.Tensor):
        params = [params]
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm is not None and max_norm > 0 and math.isfinite(max_norm):
        total = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=None)
    else:
        total = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=None)
    return float(total)
