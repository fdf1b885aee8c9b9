"""The engine registry: ``dist.engine`` name -> the engine class and what the estimators need to know.

Like the backbone registry (:mod:`poa_hpc.models.registry`): the config's choices, ``poa estimate
memory|comm`` and ``poa bench engines`` derive the names and properties from here.  Torch-free (the
class is imported on use), so the config can read the names.  A new engine is one class (a subclass
of :class:`poa_hpc.distributed.engines.Engine`) and one :func:`register_engine` call below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Tuple

__all__ = ["Sharding", "EngineSpec", "register_engine", "engine_names", "get_engine", "engine_class"]


@dataclass(frozen=True)
class Sharding:
    """Which training states are split over the ranks (1/N each) rather than whole on every rank."""

    params: bool = False
    grads: bool = False
    optimizer: bool = False


@dataclass(frozen=True)
class EngineSpec:
    name: str
    #: ``module:Class`` of the engine, imported on use
    cls: str
    summary: str
    #: runs on more than one rank
    distributed: bool = True
    #: the sharding of the student's states, from the ``dist`` config section (ZeRO: its stage)
    sharding: Callable[[Any], Sharding] = field(default=lambda dist_cfg: Sharding())
    #: ``poa estimate memory``: ``traced`` (the engine runs on fake tensors and a fake process group),
    #: ``analytic`` (activations traced on one process, states from :attr:`sharding`) or ``""`` (none)
    memory: str = ""
    #: ``poa estimate comm``: ``traced`` (the engine's collectives recorded on a fake process group) or
    #: ``analytic`` (from :attr:`sharding`; a parameter-sharded variant as the traced FSDP step)
    comm: str = "analytic"
    #: ``poa bench engines`` names (``deepspeed:2``: ``dist.engine=deepspeed dist.zero_stage=2``)
    variants: Tuple[str, ...] = ()
    #: the overrides of a variant's suffix (``"2"`` of ``deepspeed:2``; ``""``: the default)
    variant_overrides: Callable[[str], Tuple[str, ...]] = field(default=lambda suffix: ())


_ENGINES: Dict[str, EngineSpec] = {}


def register_engine(spec: EngineSpec) -> EngineSpec:
    if spec.name in _ENGINES:
        raise ValueError(f"engine '{spec.name}' is registered twice")
    _ENGINES[spec.name] = spec
    return spec


def engine_names() -> Tuple[str, ...]:
    return tuple(_ENGINES)


def get_engine(name: str) -> EngineSpec:
    try:
        return _ENGINES[name]
    except KeyError:
        raise KeyError(f"unknown engine {name!r}, expected one of {list(_ENGINES)}") from None


def engine_class(name: str) -> type:
    module, _, cls = get_engine(name).cls.partition(":")
    return getattr(importlib.import_module(module), cls)


def _zero(dist_cfg) -> Sharding:
    """ZeRO (Rajbhandari et al. 2020): stage 1 shards the optimizer states, 2 also the gradients, 3 also the
    parameters."""
    stage = int(dist_cfg.zero_stage)
    return Sharding(params=stage >= 3, grads=stage >= 2, optimizer=True)


register_engine(EngineSpec(
    "none", "poa_hpc.distributed.engines:Engine", "one process", distributed=False, memory="traced", comm=""))
register_engine(EngineSpec(
    "ddp", "poa_hpc.distributed.engines:ReplicatedEngine",
    "whole model on every rank; gradients averaged with one flat all-reduce per step",
    variants=("ddp",)))
register_engine(EngineSpec(
    "fsdp", "poa_hpc.distributed.engines:FSDPEngine",
    "FSDP2 fully_shard per block, head and backbone; parameters gathered per forward and backward, gradients "
    "reduce-scattered", sharding=lambda dist_cfg: Sharding(params=True, grads=True, optimizer=True),
    memory="traced", comm="traced", variants=("fsdp",)))
register_engine(EngineSpec(
    "deepspeed", "poa_hpc.distributed.engines:DeepSpeedEngine", "DeepSpeed ZeRO stage dist.zero_stage (1, 2, 3)",
    sharding=_zero, memory="analytic", variants=("deepspeed:2", "deepspeed:3"),
    variant_overrides=lambda suffix: (f"dist.zero_stage={suffix or 2}",)))
