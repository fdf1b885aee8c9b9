"""AdamW with DINOv2 parameter groups (layer-wise lr decay, no wd on biases and norms).

``param_groups`` follows DINOv2/POA ``get_params_groups_with_decay`` + ``fuse_params_groups``
for the student layout ``backbone.* / heads.*``, with the backbone's rules taken from its
family spec (``poa_hpc.models.registry``), as timm's optimizer factory reads a model's
``group_matcher`` / ``no_weight_decay``:

* layer id: ``spec.layer_id(name)`` for backbone parameters (ViT: tokens and patch embedding 0,
  block i i + 1, final norm L + 1; Swin and ResNet number their blocks across stages), and
  ``num_layers + 1`` for the heads;
* ``lr_multiplier = layer_decay ** (num_layers + 1 - layer_id)``, times ``patch_embed_lr_mult``
  where ``spec.is_patch_embed(name)``;
* ``wd_multiplier = 0`` for biases and where ``spec.no_weight_decay(name)`` (norms, LayerScale);
* ``is_last_layer`` for names containing ``last_layer`` (frozen at the start of training).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Tuple

import torch

from poa_hpc.config import POAConfig
from poa_hpc.models.registry import get_backbone

__all__ = ["param_groups", "build_optimizer", "apply_schedules", "clean_name", "ParamRules"]

_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter name without the prefixes wrappers insert (FSDP1, activation checkpointing,
    torch.compile, DDP)."""
    for p in _WRAPPER_PREFIXES:
        name = name.replace(p, "")
    if name.startswith("module."):  # DDP
        name = name[len("module.") :]
    return name


class ParamRules:
    """Per-parameter optimizer multipliers of a student (``backbone.*``, ``heads.*``) of ``cfg``'s family."""

    def __init__(self, cfg: POAConfig):
        self.cfg = cfg
        self.spec = get_backbone(cfg.model.arch)
        self.arch = cfg.model.section
        self.num_layers = self.spec.num_layers(self.arch)

    def layer_id(self, name: str) -> int:
        """Layer index used for layer-wise lr decay (0 .. num_layers + 1)."""
        name = clean_name(name)
        if not name.startswith("backbone."):
            return self.num_layers + 1
        return self.spec.layer_id(name[len("backbone."):], self.arch)

    def __call__(self, name: str) -> Tuple[float, float, bool]:
        """(lr_multiplier, wd_multiplier, is_last_layer) of the parameter ``name``."""
        o = self.cfg.optim
        name = clean_name(name)
        lr_mult = o.layer_decay ** (self.num_layers + 1 - self.layer_id(name))
        rel = name[len("backbone."):] if name.startswith("backbone.") else None
        if rel is not None and self.spec.is_patch_embed(rel):
            lr_mult *= o.patch_embed_lr_mult
        no_wd = name.endswith(".bias") or (rel is not None and self.spec.no_weight_decay(rel))
        return float(lr_mult), 0.0 if no_wd else 1.0, "last_layer" in name


def param_groups(named_params: Iterable[Tuple[str, torch.nn.Parameter]], cfg: POAConfig) -> List[Dict[str, Any]]:
    """Fused optimizer groups: one per distinct (lr_multiplier, wd_multiplier, is_last_layer).

    Each group: ``params`` (list of tensors), ``names`` (their names, for debugging),
    ``lr_multiplier``, ``wd_multiplier``, ``is_last_layer``.  Frozen parameters
    (``requires_grad=False``) are skipped.  Group order is first-appearance order.
    """
    rules = ParamRules(cfg)
    fused: Dict[Tuple[float, float, bool], Dict[str, Any]] = {}
    seen: set[int] = set()
    for raw_name, p in named_params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        key = rules(raw_name)
        g = fused.get(key)
        if g is None:
            g = fused[key] = {
                "params": [],
                "names": [],
                "lr_multiplier": key[0],
                "wd_multiplier": key[1],
                "is_last_layer": key[2],
            }
        g["params"].append(p)
        g["names"].append(raw_name)
    return list(fused.values())


def build_optimizer(named_params: Iterable[Tuple[str, torch.nn.Parameter]], cfg: POAConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`.  lr and weight decay start at 0: call
    :func:`apply_schedules` before every step (as DINOv2's ``apply_optim_scheduler``)."""
    groups = param_groups(named_params, cfg)
    if not groups:
        raise ValueError("build_optimizer: no trainable parameters")
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, betas=(cfg.optim.beta1, cfg.optim.beta2))


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """group lr = (last_layer_lr if is_last_layer else lr) * lr_multiplier; wd = wd * wd_multiplier."""
    for g in optimizer.param_groups:
        base = last_layer_lr if g.get("is_last_layer", False) else lr
        g["lr"] = float(base) * g.get("lr_multiplier", 1.0)
        g["weight_decay"] = float(wd) * g.get("wd_multiplier", 1.0)
