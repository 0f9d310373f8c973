"""Accuracy-controlled compression: the smallest model whose judged loss stays within a drop.

The equivalent of NNCF's ``quantize_with_accuracy_control`` for budgets: a coarse scan of the
budget fraction, then bisection inside the first bracket that meets the drop, each step an
ordinary budget decision (:class:`~.plan.Planner`: the statistics, curves and sensitivity gains
are computed once and reused), judged on the validation samples by the configured metric. The
search keeps the smallest fraction that met the drop.
"""

from __future__ import annotations

from ..errors import OnnxcompError

# The search stops when the bracket [fails, meets] is narrower than this fraction of the model.
STEP = 0.02
# The coarse scan, smallest first.
SCAN = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


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

    # A coarse scan first: the loss need not shrink monotonically with the fraction (rank grids
    # rounded to multiples, sensitivity choices), so a bisection from 0.5 alone can skip the
    # smallest fraction that meets the drop; then bisection inside the first bracket that does.
    fails, meets, best = 0.0, 1.0, None
    for fraction in SCAN:
        allocation, solved, loss = attempt(fraction)
        if loss <= max_drop:
            meets, best = fraction, (allocation, solved)
            break
        fails = fraction
    while best is not None and meets - fails > step:
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
