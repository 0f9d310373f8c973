"""Accuracy-controlled compression: the smallest model whose judged loss stays within a drop.

The equivalent of NNCF's ``quantize_with_accuracy_control`` for budgets: bisection on the
budget fraction, each step an ordinary budget decision (:class:`~.plan.Planner`: the
statistics, curves and sensitivity gains are computed once and reused), judged on the
validation samples by the configured metric. The loss is assumed to shrink as the fraction
grows (more MACs, more rank); the search keeps the smallest fraction that met the drop.
"""

from __future__ import annotations

from ..errors import OnnxcompError

# The search stops when the bracket [fails, meets] is narrower than this fraction of the model.
STEP = 0.02


def smallest_within(planner, max_drop: float, step: float = STEP):
    """(allocation, solved) at the smallest fraction (to ``step``) whose loss is at most ``max_drop``."""
    if planner.planning.judge is None:
        raise OnnxcompError("--max-drop needs data to judge by (--data or --validation-data)")
    trials = []

    def attempt(fraction: float):
        allocation, solved = planner.plan(fraction)
        loss = planner.loss(solved)
        trials.append({"fraction": fraction, "predicted": allocation.predicted, "loss": loss})
        return allocation, solved, loss

    fails, meets = 0.0, 1.0
    best = None
    while meets - fails > step:
        fraction = round(0.5 * (fails + meets), 6)
        allocation, solved, loss = attempt(fraction)
        if loss <= max_drop:
            meets, best = fraction, (allocation, solved)
        else:
            fails = fraction
    if best is None:  # nothing smaller met the drop: the whole model, as priced at fraction 1
        allocation, solved, _ = attempt(1.0)
        best = (allocation, solved)
    chosen = next(t["fraction"] for t in reversed(trials) if t["predicted"] == best[0].predicted)
    best[0].search = {"max_drop": max_drop, "fraction": chosen, "metric": planner.planning.judge.metric.name,
                      "original_score": planner.planning.judge.original_score, "trials": trials}
    return best
