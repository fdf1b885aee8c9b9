"""Evaluation protocols as plug-ins: what ``poa eval sweep --protocols ...`` runs on each sub-network.

A protocol declares its ``name``, what it ``needs`` (``"features"``: the cached frozen features of
the evaluation splits, with their labels; ``"model"``: the dense extracted network), its
``columns`` (keys of a sweep row, in ``sweep.json`` / ``sweep.csv`` and the text table), its
``metrics`` (accuracies, higher is better: one plot panel each, rankable by ``poa select``) and its
``costs`` (measured costs a plot or ``poa select`` can put on the x-axis), and how to run on one
sub-network:

* a *feature* protocol implements ``score(feats, opts) -> {column: value}`` on one network's cached
  features (:class:`NetFeatures`); the features of all networks come from one pass over the data
  (:func:`poa_hpc.eval.sweep.evaluate_networks`);
* a *model* protocol implements ``measure(model, img_size, opts) -> {column: value}`` on the dense
  network (built from the elastic teacher by the sweep, or loaded from a file by ``poa eval <name>``).

A model protocol with ``distributed = True`` (``finetune``) runs data-parallel when ``poa eval <name>``
is started under torchrun or srun (or with ``--nproc N``): every rank calls ``measure`` on every network
together and only rank 0 prints.

``add_arguments(parser)`` adds the protocol's own options (to ``poa eval <name>`` and to
``poa eval sweep``), ``options(args, cfg)`` turns them into the ``opts`` dict, ``provenance(opts)``
is what ``sweep.json`` records about the protocol.  Register with :func:`register_protocol`.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple

from poa_hpc.models.subnets import depth_str

__all__ = ["Column", "Metric", "Cost", "Protocol", "NetFeatures", "register_protocol", "get_protocol",
           "protocol_names", "resolve_protocols", "BASE_COLUMNS"]


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    fmt: str = "num"  # pct | lr | ms | ips (images/s) | num
    json_only: bool = False  # kept in sweep.json, not in sweep.csv or the table


@dataclass(frozen=True)
class Metric:
    """An accuracy (%, higher is better): one plot panel."""
    key: str
    label: str
    reference_names: Tuple[str, ...] = ()  # spellings of the reference CSV's ``metric`` column


@dataclass(frozen=True)
class Cost:
    """A measured cost a plot / ``poa select`` can use as its x-axis."""
    key: str
    label: str
    higher_is_better: bool = False  # throughput


#: The columns of every sweep row, before the protocols' own.
BASE_COLUMNS = (Column("name", "sub-network"), Column("named", "name"), Column("width", "width"),
                Column("depth", "depth"), Column("params_m", "params(M)"), Column("gflops", "GFLOPs"))


@dataclass
class NetFeatures:
    """One network's cached features: ``(N, C_cls + C_patch)`` float32 rows of
    :func:`poa_hpc.eval.linear.probe_features` (the first ``cls_dim`` columns are the final-norm [CLS])."""
    train: Any
    train_labels: Any
    val: Any
    val_labels: Any
    cls_dim: int
    num_classes: int
    device: Any


class Protocol:
    name: str = ""
    help: str = ""
    needs: Tuple[str, ...] = ()  # "features" (with labels) or "model"
    #: A model protocol that runs data-parallel in a process group: ``poa eval <name> --nproc N`` launches it
    #: under torchrun, and under torchrun / srun every rank runs ``measure`` together (rank 0 prints).
    distributed: bool = False

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def options(self, args: argparse.Namespace, cfg: Any) -> Dict[str, Any]:
        return {}

    def columns(self, opts: Dict[str, Any]) -> Tuple[Column, ...]:
        raise NotImplementedError

    def metrics(self, opts: Dict[str, Any]) -> Tuple[Metric, ...]:
        return ()

    def costs(self, opts: Dict[str, Any]) -> Tuple[Cost, ...]:
        return ()

    def provenance(self, opts: Dict[str, Any]) -> Dict[str, Any]:
        return {}

    def score(self, feats: NetFeatures, opts: Dict[str, Any]) -> Dict[str, Any]:  # needs "features"
        raise NotImplementedError

    def measure(self, model: Any, img_size: int, opts: Dict[str, Any]) -> Dict[str, Any]:  # needs "model"
        raise NotImplementedError

    def after(self, rows: Sequence[Any], opts: Dict[str, Any], log: Callable[[str], None]) -> None:
        """Called once with all rows (e.g. a warning about the learning-rate grid)."""


_PROTOCOLS: Dict[str, Protocol] = {}


def register_protocol(cls: type) -> type:
    """Class decorator: register an instance of the :class:`Protocol` subclass under its ``name``."""
    inst = cls()
    if not inst.name or inst.name in _PROTOCOLS:
        raise ValueError(f"evaluation protocol {inst.name!r} has no name or is registered twice")
    if not set(inst.needs) <= {"features", "model"}:
        raise ValueError(f"evaluation protocol {inst.name!r}: needs {inst.needs}; expected features or model")
    _PROTOCOLS[inst.name] = inst
    return cls


#: Modules whose protocols register themselves when first needed (by name, as the backbone registry loads
#: families): a new protocol is one class in one of them, or one new module named here.
PROTOCOL_MODULES = ("poa_hpc.eval.builtin_protocols",)


def _load() -> None:
    import importlib

    for module in PROTOCOL_MODULES:
        importlib.import_module(module)


def protocol_names() -> Tuple[str, ...]:
    _load()
    return tuple(_PROTOCOLS)


def get_protocol(name: str) -> Protocol:
    _load()
    if name not in _PROTOCOLS:
        raise ValueError(f"evaluation protocol {name!r} is not registered; available: {', '.join(_PROTOCOLS)}")
    return _PROTOCOLS[name]


def resolve_protocols(text: str) -> List[Protocol]:
    """``knn,linear,latency`` -> the protocols, in that order, duplicates dropped (``ValueError`` naming
    an unknown one and the available ones)."""
    out: List[Protocol] = []
    for name in (n.strip().lower() for n in str(text).split(",") if n.strip()):
        p = get_protocol(name)
        if p not in out:
            out.append(p)
    if not out:
        raise ValueError(f"--protocols {text!r}: name at least one of {', '.join(protocol_names())}")
    return out


def format_value(col: Column, v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if col.fmt == "pct":
        return f"{v:.2f}%"
    if col.fmt == "lr":
        return f"{v:g}"
    if col.fmt == "ms":
        return f"{v:.3f}"
    if col.fmt == "ips":
        return f"{v:,.0f}"
    if col.key == "gflops":
        return f"{v:.4f}"
    if col.key == "params_m":
        return f"{v:.3f}"
    return depth_str(v)  # per-stage depths as 3-4-6-3, anything else as str()
