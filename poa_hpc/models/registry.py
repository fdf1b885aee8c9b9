"""Backbone families as plug-ins: one :class:`BackboneSpec` per family, registered by name.

Everything the rest of poa_hpc needs from a backbone goes through its spec:
the config section class (``model.<family>``), building the elastic network,
its sub-network space (eq. 14 weights, intact pair), extraction to a dense
network and rebuilding one from a file (format ``poa_hpc.<family>``),
parameters / GFLOPs of a sub-network, the feature width per sub-network,
the optimizer's layer-id and no-weight-decay rules, the sharding units that
FSDP2 / ZeRO wrap, and the iBOT mask grid.  ``model.arch`` picks the spec; the
allowed values are the registered names.

A family is one sub-package of ``poa_hpc.models`` (``vit/``, ``swin/``, ...) whose
``__init__`` registers its spec with :func:`register_backbone`; they are found
by :func:`load_families`, so adding a backbone touches no other file.  Like timm's
``@register_model`` + ``group_matcher`` / ``no_weight_decay`` read by its optimizer
factory, and torchtitan's ``ModelSpec`` whose ``parallelize`` is applied from
outside: the model code stays single-device and engine-agnostic.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["BackboneSpec", "TimmExport", "apply_timm_attributes", "register_backbone", "get_backbone",
           "backbone_names", "load_families"]

_REGISTRY: Dict[str, BackboneSpec] = {}


class BackboneSpec:
    """What a backbone family provides.  ``arch`` arguments are instances of :attr:`config_cls`
    (the ``model.<name>`` config section, which is also the architecture of a dense extracted
    sub-network); ``sub`` arguments are :class:`~poa_hpc.models.subnets.Subnet`.
    Parameter names given to the optimizer rules are relative to the backbone
    (``blocks.3.attn.qkv.weight``, no ``backbone.`` prefix, no wrapper prefixes)."""

    #: registry name, ``model.arch`` value and config section name
    name: str = ""
    #: dataclass of the ``model.<name>`` section
    config_cls: type = object
    #: one-line description for ``poa subnets`` and the README table
    description: str = ""
    #: the packaged config of the paper's run for this family (``configs/``)
    recipe: str = ""
    #: ``poa bench engines`` presets: name -> (packaged config file, dotted overrides)
    bench_presets: Dict[str, Tuple[str, List[str]]] = {}

    @property
    def format(self) -> str:
        """``format`` metadata of extracted files."""
        return f"poa_hpc.{self.name}"

    # ------------------------------------------------------------------ config
    def validate(self, arch: Any, cfg: Any) -> None:
        """Raise ``ConfigError`` naming the key (``model.<name>.<field>``) when ``arch`` is impossible
        (``cfg`` is the whole config, e.g. for crop sizes)."""

    # ------------------------------------------------------------------ model
    def build(self, arch: Any, *, drop_path_rate: float, linear_backend: str = "torch",
              attn_backend: str = "sdpa"):
        """The elastic backbone (an :class:`~poa_hpc.models.elastic.ElasticBackbone`) at initialisation."""
        raise NotImplementedError

    def space(self, arch: Any):
        """The :class:`~poa_hpc.models.subnets.SubnetSpace` of ``arch``."""
        raise NotImplementedError

    def named_sizes(self, arch: Any) -> Dict[str, Any]:
        """Named sub-networks (``{"ViT-S": Subnet(384, 12)}``) that exist in ``arch``'s space."""
        return {}

    def feature_dim(self, arch: Any, width: int) -> int:
        """Width of the [CLS] feature of a sub-network of this width (the heads' input)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ extraction
    def extract_tensors(self, state: Dict[str, Any], arch: Any, sub: Any) -> Tuple[Any, Dict[str, Any]]:
        """(dense arch, dense tensors) of ``sub`` from the intact ``state`` (name -> tensor).

        Slicing and scaling only, so it is differentiable: the tests read which entries of every
        parameter a sub-network uses from its gradient."""
        raise NotImplementedError

    def build_dense(self, dense_arch: Any, attn_backend: str = "sdpa"):
        """An empty dense network of ``dense_arch`` (load the extracted tensors into it)."""
        return self.build(dense_arch, drop_path_rate=0.0, attn_backend=attn_backend)

    def timm_export(self, dense_arch: Any, state: Dict[str, Any], img_size: Optional[int] = None) -> TimmExport:
        """The timm model of a dense sub-network: ``timm.create_model(e.model, pretrained=False,
        num_classes=0, **e.kwargs)``, :func:`apply_timm_attributes` with ``e.attributes``, then
        ``load_state_dict(e.state, strict=True)`` gives the sub-network's features on ``img_size``
        inputs (default: the native size).  Raise ``ValueError`` for a size where timm cannot match."""
        raise NotImplementedError(f"backbone {self.name!r} has no timm export")

    def timm_model(self, dense_arch: Any, state: Dict[str, Any], img_size: Optional[int] = None):
        """The timm model of :meth:`timm_export`, attributes set and ``state`` loaded strictly, in eval mode."""
        import timm

        e = self.timm_export(dense_arch, state, img_size=img_size)
        model = timm.create_model(e.model, pretrained=False, num_classes=0, **e.kwargs)
        apply_timm_attributes(model, e.attributes)
        model.load_state_dict(e.state, strict=True)
        return model.eval()

    # ------------------------------------------------------------------ cost
    def params(self, arch: Any, sub: Any = None) -> int:
        """Parameters of the dense sub-network (default: intact), without the iBOT mask token."""
        raise NotImplementedError

    def gflops(self, arch: Any, sub: Any = None, img_size: Optional[int] = None) -> float:
        """Multiply-accumulates (G) of one forward at ``img_size`` (fvcore/timm "GFLOPs")."""
        raise NotImplementedError

    def residual_gflops(self, arch: Any, sub: Any = None, img_size: Optional[int] = None) -> List[Tuple[float, float]]:
        """Per block the sub-network runs: (multiply-accumulates (G) of one sample through the block's residual
        branches at ``img_size``, part of :meth:`gflops`; the block's stochastic-depth rate in a network built
        with ``drop_path_rate=arch.drop_path_rate``).  The FLOPs estimators take out the samples that
        subset-mode stochastic depth leaves out of these branches.  Default: none (no discount)."""
        return []

    # ------------------------------------------------------------------ optimizer
    def num_layers(self, arch: Any) -> int:
        """Layers of layer-wise lr decay: ids run 0 (embedding) .. num_layers + 1 (final norm, heads)."""
        raise NotImplementedError

    def layer_id(self, name: str, arch: Any) -> int:
        raise NotImplementedError

    def no_weight_decay(self, name: str) -> bool:
        """True for backbone parameters without weight decay (besides biases, which never get it)."""
        return False

    def is_patch_embed(self, name: str) -> bool:
        """Parameters that get ``optim.patch_embed_lr_mult``."""
        return name.startswith("patch_embed.")

    # ------------------------------------------------------------------ distribution, data
    def sharding_units(self, backbone: Any) -> List[str]:
        """Dotted names of the sub-modules FSDP2 shards one by one (and activation checkpointing /
        ``torch.compile`` wrap); the backbone root owns whatever they leave out."""
        raise NotImplementedError

    def mask_grid(self, arch: Any, img_size: int) -> int:
        """Side of the iBOT mask grid for a global crop of ``img_size``."""
        raise NotImplementedError


@dataclass
class TimmExport:
    """How to rebuild a dense sub-network in timm (see :meth:`BackboneSpec.timm_export`)."""

    model: str  # a timm.create_model name
    kwargs: Dict[str, Any]  # create_model kwargs overriding that model's shape
    state: Dict[str, Any]  # the state dict to load with strict=True
    # Module attributes to set after create_model, dotted name -> value (lists stand for tuples): what
    # kwargs cannot express, e.g. a Swin sub-network's per-block window shifts.
    attributes: Dict[str, Any] = field(default_factory=dict)


def apply_timm_attributes(model: Any, attributes: Dict[str, Any]) -> None:
    """Set ``attributes`` (``{"layers.2.blocks.1.shift_size": [3, 3]}``) on a timm model."""
    for name, value in attributes.items():
        module, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(module), attr, tuple(value) if isinstance(value, list) else value)


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Register a family's spec under ``spec.name`` (its ``model.arch`` value)."""
    if not spec.name or spec.name in _REGISTRY and type(_REGISTRY[spec.name]) is not type(spec):
        raise ValueError(f"backbone {spec.name!r}: empty name or registered twice")
    _REGISTRY[spec.name] = spec
    return spec


_loaded = False


def load_families() -> None:
    """Import every family sub-package of ``poa_hpc.models`` (each registers its spec)."""
    global _loaded
    if _loaded:
        return
    import poa_hpc.models as models

    for info in pkgutil.iter_modules(models.__path__):
        if info.ispkg:
            importlib.import_module(f"poa_hpc.models.{info.name}")
    _loaded = True


def backbone_names() -> Tuple[str, ...]:
    load_families()
    return tuple(_REGISTRY)


def get_backbone(name: str) -> BackboneSpec:
    load_families()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; registered: {list(_REGISTRY)}") from None
