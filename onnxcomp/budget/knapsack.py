"""Whole-model budgets: one option per layer so that the total cost meets a target.

A multiple-choice knapsack: every layer offers options (keep dense, or a
decomposition at some rank), each with a cost (MACs, params or measured
latency) and an error (the layer's weighted relative output error). We
minimise the summed error under a total cost by Lagrangian relaxation: for a
price ``lam`` every layer independently takes the option minimising
``error + lam * cost``; bisection on ``lam`` finds the cheapest price that
meets the budget, and a greedy pass then spends what the relaxation left on
the table (the relaxation only reaches the lower convex hull of each layer's
curve).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Option:
    cost: float
    error: float
    label: object  # what the caller needs to build it (method, rank), opaque here


def allocate(options: list[list[Option]], budget: float) -> tuple[list[int], bool]:
    """Index of the chosen option per layer, and whether the budget was met.

    When even the cheapest options exceed the budget, they are returned with
    ``False`` (the closest feasible point).
    """
    costs = [np.array([o.cost for o in layer], dtype=np.float64) for layer in options]
    errors = [np.array([o.error for o in layer], dtype=np.float64) for layer in options]
    cheapest = [int(np.argmin(c)) for c in costs]
    if _total(costs, cheapest) > budget:
        return cheapest, False
    low, high = 0.0, 1.0
    while _total(costs, _pick(costs, errors, high)) > budget:
        high *= 4.0
        if high > 1e30:
            return cheapest, True
    for _ in range(100):
        middle = 0.5 * (low + high)
        if _total(costs, _pick(costs, errors, middle)) > budget:
            low = middle
        else:
            high = middle
    chosen = _pick(costs, errors, high)
    return _spend_remainder(costs, errors, chosen, budget), True


def _pick(costs, errors, price: float) -> list[int]:
    return [int(np.argmin(e + price * c)) for c, e in zip(costs, errors)]


def _total(costs, chosen: list[int]) -> float:
    return float(sum(c[i] for c, i in zip(costs, chosen)))


def _spend_remainder(costs, errors, chosen: list[int], budget: float) -> list[int]:
    """Greedy upgrades, best error reduction per unit of extra cost first, while they fit."""
    chosen = list(chosen)
    spare = budget - _total(costs, chosen)
    while True:
        best, best_gain = None, 0.0
        for index, (c, e) in enumerate(zip(costs, errors)):
            extra = c - c[chosen[index]]
            reduction = e[chosen[index]] - e
            usable = (reduction > 0) & (extra <= spare)
            if not usable.any():
                continue
            gain = np.where(usable, reduction / np.maximum(extra, 1e-12), -np.inf)
            option = int(np.argmax(gain))
            if gain[option] > best_gain:
                best, best_gain = (index, option), gain[option]
        if best is None:
            return chosen
        index, option = best
        spare -= costs[index][option] - costs[index][chosen[index]]
        chosen[index] = option
