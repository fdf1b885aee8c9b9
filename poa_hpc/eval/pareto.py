"""Pareto front of (cost, accuracy) points: lower cost and higher accuracy are better."""

from __future__ import annotations

import math
from typing import List, Sequence

__all__ = ["pareto_front"]


def pareto_front(costs: Sequence[float], accs: Sequence[float]) -> List[int]:
    """Indices of the points no other point dominates, sorted by cost (then input order).

    Point ``j`` dominates ``i`` when ``cost[j] <= cost[i]`` and ``acc[j] >= acc[i]`` with at least
    one strict inequality; exact duplicates of a front point are on the front too.  Points with a
    missing (NaN) cost or accuracy are left out.  Along the returned front cost and accuracy
    both increase strictly, except between duplicates.
    """
    if len(costs) != len(accs):
        raise ValueError(f"pareto_front: {len(costs)} costs but {len(accs)} accuracies")
    ok = [i for i in range(len(costs)) if not (math.isnan(costs[i]) or math.isnan(accs[i]))]
    # Cheapest first; at equal cost the most accurate first, so the others there are dominated.
    order = sorted(ok, key=lambda i: (costs[i], -accs[i], i))
    front: List[int] = []
    for i in order:
        if not front or accs[i] > accs[front[-1]]:
            front.append(i)
        elif (costs[i], accs[i]) == (costs[front[-1]], accs[front[-1]]):
            front.append(i)  # a duplicate of the last front point
    return front
