"""The elastic sub-network space, its eq. 14 sampling weights and the per-step sampler.

Confirmed against the authors' code (``create_dynamic_networks`` in alipay/POA):
``w_scale = linspace(s, 1, #widths)`` and ``d_scale = linspace(s, 1, #depths)``
(smallest first); pair (w, d) appears ``round(w_scale * d_scale)`` times in a
list; the intact pair is dropped; the list is shuffled and walked without
replacement, reshuffled at the end of each pass.  Frequencies are therefore
exactly proportional to the weights.

Our sampler is stateless: the sub-network of step ``t`` is a pure function of
(seed, stream, t), so resuming at any step reproduces the run exactly.  The
stream is the rank for ``per_rank`` (each GPU trains a different sub-network,
as the paper) and 0 for ``shared``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np


@dataclass(frozen=True, order=True)
class Subnet:
    width: int
    depth: int

    def __str__(self) -> str:
        return f"{self.width}x{self.depth}"

    @classmethod
    def parse(cls, text: str) -> "Subnet":
        try:
            w, d = text.lower().split("x")
            return cls(int(w), int(d))
        except ValueError:
            raise ValueError(f"sub-network {text!r}: expected WIDTHxDEPTH, e.g. 384x12") from None


@dataclass(frozen=True)
class SubnetSpace:
    widths: tuple
    depths: tuple
    s: float = 3.0

    @classmethod
    def from_model_config(cls, model_cfg) -> "SubnetSpace":
        e = model_cfg.elastic
        widths = tuple(range(e.min_width, model_cfg.embed_dim + 1, e.width_step))
        depths = tuple(range(e.min_depth, model_cfg.depth + 1))
        return cls(widths, depths, e.sampling_s)

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
            raise ValueError(
                f"sub-network {sub} is not in the elastic space: widths {list(self.widths)}, depths {list(self.depths)}"
            )
        return sub

    def weights(self) -> Dict[Subnet, int]:
        """Eq. 14 integer weights, intact pair excluded (it is trained by the intact branch)."""
        ws = np.linspace(self.s, 1, len(self.widths))
        ds = np.linspace(self.s, 1, len(self.depths))
        out = {}
        for w, a in zip(self.widths, ws):
            for d, b in zip(self.depths, ds):
                out[Subnet(w, d)] = int(np.round(a * b))
        out.pop(self.intact)
        return out

    def probabilities(self) -> Dict[Subnet, float]:
        w = self.weights()
        total = sum(w.values())
        return {k: v / total for k, v in w.items()}


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class SubnetSampler:
    """Deterministic per-step elastic sub-network sampler (eq. 14 frequencies)."""

    def __init__(self, space: SubnetSpace, seed: int, rank: int = 0, mode: str = "per_rank"):
        if mode not in ("per_rank", "shared"):
            raise ValueError(f"model.elastic.rank_sampling: {mode!r}, expected per_rank or shared")
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
