"""The elastic sub-network space, its eq. 14 sampling weights and the per-step sampler.

A sub-network is a (width, depth) pair.  ``width`` is one int for every family
(the ViT embedding width, Swin's stage-1 channels, ResNet's stage-1 bottleneck
mid channels); ``depth`` is an int where one number describes it (ViT blocks,
Swin's stage-3 blocks) or a tuple of per-stage block counts (ResNet).

Weights (eq. 14), confirmed against the authors' ``create_dynamic_networks``:
every width gets a scale and every depth a scale (ViT/Swin:
``linspace(s, 1, n)`` smallest first; ResNet: width scale 1 and depth scales
``linspace(s, 1, #depths)`` over the depth tuples sorted by total depth); pair
(w, d) appears ``round(w_scale * d_scale)`` times in a list; the intact pair is
dropped; the list is shuffled and walked without replacement, reshuffled at the
end of each pass.  Frequencies are therefore exactly proportional to the weights.

Our sampler is stateless: the sub-network of step ``t`` is a pure function of
(seed, stream, t), so resuming at any step reproduces the run exactly.  The
stream is the rank for ``per_rank`` (each GPU trains a different sub-network,
as the paper) and 0 for ``shared``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

Depth = Union[int, Tuple[int, ...]]


def depth_str(depth: Depth) -> str:
    """``12``, or ``3-4-6-3`` for per-stage depths: how a depth is written everywhere (names, tables, plots)."""
    return "-".join(map(str, depth)) if isinstance(depth, (tuple, list)) else str(depth)


@dataclass(frozen=True, order=True)
class Subnet:
    width: int
    depth: Depth

    def __str__(self) -> str:
        return f"{self.width}x{depth_str(self.depth)}"

    @classmethod
    def parse(cls, text: str) -> Subnet:
        """``WIDTHxDEPTH`` (``384x12``) or ``WIDTHxD1-D2-...`` for per-stage depths (``64x3-4-6-3``)."""
        try:
            w, d = text.lower().split("x")
            parts = tuple(int(p) for p in d.split("-"))
            return cls(int(w), parts if len(parts) > 1 else parts[0])
        except ValueError:
            raise ValueError(f"sub-network {text!r}: expected WIDTHxDEPTH, e.g. 384x12 (or 64x3-4-6-3)") from None


def eq14_scales(s: float, n: int) -> Tuple[float, ...]:
    """``linspace(s, 1, n)``: the eq. 14 scale of the n widths (or depths), smallest first."""
    return tuple(float(v) for v in np.linspace(s, 1, n))


@dataclass(frozen=True)
class SubnetSpace:
    """Widths x depths, each with its eq. 14 scale (default ``linspace(s, 1, n)``)."""

    widths: tuple
    depths: tuple
    s: float = 3.0
    width_scales: Optional[tuple] = None
    depth_scales: Optional[tuple] = None

    def __post_init__(self) -> None:
        if self.width_scales is None:
            object.__setattr__(self, "width_scales", eq14_scales(self.s, len(self.widths)))
        if self.depth_scales is None:
            object.__setattr__(self, "depth_scales", eq14_scales(self.s, len(self.depths)))
        if len(self.width_scales) != len(self.widths) or len(self.depth_scales) != len(self.depths):
            raise ValueError("SubnetSpace: one scale per width and per depth")

    @property
    def intact(self) -> Subnet:
        return Subnet(self.widths[-1], self.depths[-1])

    def all(self) -> List[Subnet]:
        return [Subnet(w, d) for w in self.widths for d in self.depths]

    def __len__(self) -> int:
        return len(self.widths) * len(self.depths)

    def __contains__(self, item: Subnet) -> bool:
        return item.width in self.widths and item.depth in self.depths

    def check(self, sub: Subnet) -> Subnet:
        if sub not in self:
            depths = [depth_str(d) for d in self.depths]
            shown = depths if len(depths) <= 16 else depths[:3] + ["..."] + depths[-3:]
            raise ValueError(
                f"sub-network {sub} is not in the elastic space: widths {list(self.widths)}, depths {shown}"
            )
        return sub

    def resolve(self, text: str, named: Optional[Dict[str, Subnet]] = None) -> List[Subnet]:
        """The sub-networks ``text`` names: ``all``, or comma-separated named sizes (``ViT-S``), their short
        forms (``S``), ``smallest`` / ``middle`` / ``intact`` (:func:`probe_subnets`) and ``WIDTHxDEPTH``
        entries (``384x12``, ``64x3-4-6-3``), case-insensitive, duplicates dropped.  ``named``: the family's
        named sizes.  Raises ``ValueError`` naming the bad entry and what is allowed."""
        named = named or {}
        by_name = {n.lower(): s for n, s in named.items()}
        by_short = {short.lower(): named[n] for n, short in short_forms(named).items()}
        out: List[Subnet] = []
        for entry in (e.strip() for e in str(text).split(",")):
            key = entry.lower()
            if key == "all":
                subs = self.all()
            elif key in PROBE_NAMES:
                subs = [probe_subnets(self)[PROBE_NAMES.index(key)]]
            elif key in by_name or key in by_short:
                subs = [by_name.get(key) or by_short[key]]
            else:
                try:
                    sub = Subnet.parse(entry)
                except ValueError:
                    sub = None
                if sub is None or sub not in self:
                    what = "is not a sub-network name" if sub is None else "is not in the elastic space"
                    raise ValueError(f"{entry!r} {what}; allowed: {self.describe(named)}")
                subs = [sub]
            out.extend(s for s in subs if s not in out)
        return out

    def describe(self, named: Optional[Dict[str, Subnet]] = None) -> str:
        """What :meth:`resolve` accepts, in one line."""
        named = named or {}
        depths = [depth_str(d) for d in self.depths]
        shown = depths if len(depths) <= 8 else depths[:3] + ["..."] + depths[-2:]
        shorts = short_forms(named)
        names = [f"{name}{'/' + shorts[name] if name in shorts else ''} ({sub})" for name, sub in named.items()]
        return (f"all, {', '.join(names) + ', ' if names else ''}or WIDTHxDEPTH with widths {list(self.widths)} and "
                f"depths [{', '.join(shown)}]{'' if names else ' (no named sizes in this space)'}, or "
                f"{', '.join(PROBE_NAMES)}")

    def weights(self) -> Dict[Subnet, int]:
        """Eq. 14 integer weights, intact pair excluded (it is trained by the intact branch)."""
        out = {}
        for w, a in zip(self.widths, self.width_scales):
            for d, b in zip(self.depths, self.depth_scales):
                out[Subnet(w, d)] = int(np.round(np.float64(a) * np.float64(b)))
        out.pop(self.intact)
        return out

    def probabilities(self) -> Dict[Subnet, float]:
        w = self.weights()
        total = sum(w.values())
        return {k: v / total for k, v in w.items()}


def short_forms(named: Dict[str, Subnet]) -> Dict[str, str]:
    """name -> short form (the part after the last '-', ``ViT-S`` -> ``S``) where no other name shares it."""
    tails: Dict[str, List[str]] = {}
    for name in named:
        tails.setdefault(name.rsplit("-", 1)[-1].lower(), []).append(name)
    return {names[0]: names[0].rsplit("-", 1)[-1] for t, names in tails.items() if len(names) == 1 and "-" in names[0]}


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class SubnetSampler:
    """Deterministic per-step elastic sub-network sampler (eq. 14 frequencies)."""

    def __init__(self, space: SubnetSpace, seed: int, rank: int = 0, mode: str = "per_rank"):
        if mode not in ("per_rank", "shared"):
            raise ValueError(f"model.rank_sampling: {mode!r}, expected per_rank or shared")
        self.space = space
        self.seed = seed
        self.stream = rank if mode == "per_rank" else 0
        self.mode = mode
        pool: List[Subnet] = []
        for sub, n in sorted(space.weights().items()):
            pool.extend([sub] * n)
        if not pool:
            raise ValueError("the elastic space has no sub-network besides the intact one")
        self.pool: Sequence[Subnet] = tuple(pool)
        self._cycle = -1
        self._order: List[Subnet] = []

    def sample(self, step: int) -> Subnet:
        cycle, pos = divmod(step, len(self.pool))
        if cycle != self._cycle:
            order = list(self.pool)
            random.Random(_seed("poa-subnet", self.seed, self.stream, cycle)).shuffle(order)
            self._cycle, self._order = cycle, order
        return self._order[pos]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "stream": self.stream, "mode": self.mode, "pool_size": len(self.pool)}


#: :meth:`SubnetSpace.resolve`'s names of the three :func:`probe_subnets`.
PROBE_NAMES = ("smallest", "middle", "intact")


def probe_subnets(space) -> list:
    """The three sub-networks the demo and the in-run k-NN report: the smallest, a middle one and the intact
    network."""
    return [Subnet(space.widths[0], space.depths[0]),
            Subnet(space.widths[len(space.widths) // 2], space.depths[len(space.depths) // 2]),
            space.intact]
