"""The knapsack allocation against exhaustive search on small cases."""

import itertools

import numpy as np

from onnxcomp.budget.knapsack import Option, allocate


def random_layers(rng, layers=4, ranks=6):
    out = []
    for _ in range(layers):
        full = rng.uniform(50, 200)
        decay = rng.uniform(0.2, 1.5)
        curve = [Option(full, 0.0, "dense")]
        for r in range(1, ranks + 1):
            cost = full * r / (ranks + 1)
            curve.append(Option(cost, float(np.exp(-decay * r)), r))
        out.append(curve)
    return out


def brute_force(options, budget):
    best = None
    for pick in itertools.product(*[range(len(layer)) for layer in options]):
        cost = sum(layer[i].cost for layer, i in zip(options, pick))
        error = sum(layer[i].error for layer, i in zip(options, pick))
        if cost <= budget and (best is None or error < best):
            best = error
    return best


def test_allocation_meets_budget_and_is_near_optimal():
    rng = np.random.default_rng(0)
    for _trial in range(20):
        options = random_layers(rng)
        full = sum(layer[0].cost for layer in options)
        budget = full * rng.uniform(0.3, 0.8)
        chosen, feasible = allocate(options, budget)
        assert feasible
        cost = sum(layer[i].cost for layer, i in zip(options, chosen))
        error = sum(layer[i].error for layer, i in zip(options, chosen))
        assert cost <= budget + 1e-9
        optimum = brute_force(options, budget)
        assert error <= optimum * 1.25 + 1e-3


def test_infeasible_budget_returns_cheapest():
    options = [[Option(10, 0, "dense"), Option(4, 1, 1)], [Option(10, 0, "dense"), Option(5, 1, 1)]]
    chosen, feasible = allocate(options, 3)
    assert not feasible and chosen == [1, 1]
