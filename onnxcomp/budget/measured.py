"""Measured layer curves: each layer's own truncations, applied one layer at a time, judged on the model.

The noise probe (:mod:`.sensitivity`) weighs a layer by how isotropic noise of one size moves the
model's outputs. A truncation's error has another structure (it drops the low-energy directions of
the layer's output), so ``--sensitivity measured`` measures instead: for a few points along each
layer's candidate curve, the layer alone is solved at that point and rewritten, the rest of the
model stays dense, and the judge's loss on its first ``SAMPLES`` validation samples is taken. The
ratio of that model-level error to the layer's own proxy error, interpolated along the curve in log
error, weighs every candidate of the layer in the knapsack. Cost: ``POINTS`` solves and forward
passes per layer (shown in the progress bar).

With the default metric the loss is the standardised error, and its square is what is compared with
the layers' relative squared errors (independent errors add in energy); other metrics' losses (drops)
are used as they are.
"""

from __future__ import annotations

import math

import numpy as np
from tqdm.auto import tqdm

from ..decompose.solve import Decomposition, solve_layer
from ..passes import apply_decompositions

POINTS = 4  # points measured per layer
SAMPLES = 16  # validation samples they are judged on


class MeasuredWeights:
    """Per layer, measured (proxy error, model-level error) points; a candidate's weight interpolated."""

    def __init__(self, planning, curves):
        judge = planning.judge.subset(SAMPLES)
        squared = judge.metric.name == "fidelity"
        self.points: dict[str, list[tuple[float, float]]] = {}
        for layer in tqdm(planning.layers, desc="measured curves", unit="layer", disable=not planning.progress):
            measured = []
            for candidate in _spread(curves.points[layer.name], POINTS):
                solve = planning.solve.at_rank(candidate.method, candidate.rank)
                result = solve_layer(planning.problems[layer.name], solve, planning.xp, candidate.start)
                if not isinstance(result, Decomposition):
                    continue
                loss = max(judge.loss(apply_decompositions(planning.model, [(layer, result)])), 0.0)
                measured.append((candidate.error, loss**2 if squared else loss))
            self.points[layer.name] = sorted(measured)

    def __call__(self, layer_name: str, candidate) -> float:
        """The weight of ``candidate``'s proxy error: the measured model-level / proxy ratio, interpolated."""
        points = [(e, q) for e, q in self.points.get(layer_name, []) if e > 0]
        if not points or candidate.error <= 0:
            return 1.0 if not points else max(q / e for e, q in points)
        errors = np.log([e for e, _ in points])
        ratios = [q / e for e, q in points]
        weight = float(np.interp(np.log(candidate.error), errors, ratios))
        # Beside a point whose model came out NaN (an infinite loss) the interpolation is inf x 0 = NaN:
        # such a neighbourhood is infinitely costly.
        return math.inf if math.isnan(weight) else weight

    def note(self) -> dict:
        return {name: [[round(e, 6), round(q, 6)] for e, q in points] for name, points in self.points.items()}


def _spread(candidates: list, count: int) -> list:
    """Up to ``count`` candidates evenly spread over the curve ordered by proxy error."""
    ordered = sorted(candidates, key=lambda c: c.error)
    if len(ordered) <= count:
        return ordered
    return [ordered[i] for i in np.unique(np.linspace(0, len(ordered) - 1, count).round().astype(int))]
