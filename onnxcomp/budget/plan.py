"""A whole-model budget, decided: which layer keeps which rank.

1. Curves: every layer's candidate points (:mod:`.candidates`), priced by a cost
   model (:mod:`.costs`: MACs, params or measured latency).
2. Allocation: a multiple-choice knapsack (:mod:`.knapsack`) under
   ``fraction * total - (cost of the layers outside the plan)``; coarse Tucker-2 /
   CP curves get more points where the spare cost reaches, then it runs again.
3. Sensitivity (optional): each layer's error weighted by its measured effect on
   the model's outputs (:mod:`.sensitivity`); "auto" keeps the weighted
   allocation only when its solved model is closer to the original on the judge's
   validation samples (held out of the statistics where there are enough).
4. Latency budgets: the planned model is profiled; a miss of more than 3% is
   re-allocated once, aiming off by the miss, and the closer round is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from tqdm.auto import tqdm

from ..config import BudgetConfig, BudgetKind, Method, Sensitivity, SolveConfig
from ..decompose.solve import LayerProblem, Solved, layer_workers, solve_layers
from ..judge import Judge
from ..passes import apply_solved
from ..threads import map_parallel
from .candidates import CURVES, REFINABLE, Candidate
from .costs import CostModel
from .knapsack import Option, allocate
from .measured import MeasuredWeights
from .sensitivity import layer_sensitivities

# Refine the coarse Tucker-2/CP curves while more than this share of the model's cost is left unspent.
SPARE_TOLERANCE = 0.002
# A measured latency further than this (relative to the target) from the target gets one correction round.
LATENCY_RETRY = 0.03
# ALS sweeps of the Tucker-2 layers of an allocation that is only judged against another (after the one
# its candidate had): within about 1% of the converged errors; only the allocation kept is solved in full.
JUDGE_SWEEPS = 4


@dataclass
class Allocation:
    """What a budget decided, and how well it met the target."""

    choices: dict[str, Candidate | None]  # layer name -> candidate (None: the layer stays dense)
    predicted: float  # the model's cost as priced, a fraction of the original's
    feasible: bool  # False: even the cheapest choices miss the target (the closest point is returned)
    measured: float | None = None  # latency budgets: the planned model's profiled fraction
    rounds: list[dict] = field(default_factory=list)  # latency budgets: aimed, predicted, measured
    sensitivity: dict | None = None  # the probe's gains and what the "auto" choice compared
    total: float | None = None  # the original model's cost in the budget's unit (latency: seconds)
    timed: int = 0  # timings taken in this run (latency budgets; the rest came from the cache)
    layer_latency: dict | None = None  # latency budgets: layer name -> (seconds dense, seconds chosen)
    search: dict | None = None  # --max-drop: the fractions tried and their losses
    rank_multiple: int | None = None  # the multiple the candidate ranks were rounded to (None: any rank)

    def solve_plan(self, solve: SolveConfig) -> dict:
        """Layer name -> (the fit at its chosen point, the candidate's start), or why it stays dense."""
        return {name: "the budget keeps it dense" if choice is None else
                (solve.at_rank(choice.method, choice.rank), choice.start)
                for name, choice in self.choices.items()}


@dataclass
class Planning:
    """Everything a budget decision reads: the layers as problems, how they are fitted and priced,
    and the judge of candidate models (validation samples, held out of the statistics where possible)."""

    model: object  # onnx.ModelProto
    layers: list
    problems: dict[str, LayerProblem]
    solve: SolveConfig
    costs: CostModel
    xp: object
    progress: bool = False
    judge: Judge | None = None  # None: no data to judge by (no sensitivity weighting)
    workers: int = 1  # threads the layers' curves and solves are spread over (onnxcomp.threads)
    # (layer name, method, rank, CP form) -> its solve: allocations that share a choice (weighted and
    # unweighted, the fractions of --max-drop, latency rounds) solve it once.
    solved: dict = field(default_factory=dict, repr=False)
    judged: dict = field(default_factory=dict, repr=False)  # the same, Tucker-2 after JUDGE_SWEEPS sweeps only


def plan_budget(budget: BudgetConfig, planning: Planning) -> tuple[Allocation, Solved]:
    """The allocation meeting ``budget`` (a fraction, or ``max_drop``: the smallest fraction whose
    judged loss stays within it) and each layer solved at its chosen point."""
    planner = Planner(budget, planning)
    if budget.max_drop is not None:
        from .search import smallest_within  # the search calls back into the planner

        return smallest_within(planner, budget.max_drop)
    return planner.plan(budget.fraction)


class Planner:
    """Budget decisions at any fraction, sharing the curves and the sensitivity gains between them."""

    def __init__(self, budget: BudgetConfig, planning: Planning):
        self.budget, self.planning = budget, planning
        self.curves = Curves(planning, budget.rank_multiple)
        self._gains = self._any_rank = None

    def plan(self, fraction: float) -> tuple[Allocation, Solved]:
        """Allocate and solve at ``fraction`` (latency budgets: measured and corrected once)."""
        planning, costs = self.planning, self.planning.costs
        allocation, solved = self.decide(fraction)
        allocation.rank_multiple = self.curves.multiple
        if not allocation.feasible and self.budget.any_rank_fallback:  # the default rounding cannot meet it
            self._any_rank = self._any_rank or Curves(planning, None)
            allocation, solved = _with_sensitivity(self.budget, planning, self._any_rank, fraction, self.gains)
        if self.budget.kind is BudgetKind.LATENCY:
            allocation, solved = _close_latency_loop(planning, self.decide, (allocation, solved), fraction)
        costs.save()
        allocation.total, allocation.timed = costs.total, costs.timed
        if self.budget.kind is BudgetKind.LATENCY:
            allocation.layer_latency = {
                layer.name: (costs.dense(layer), costs.dense(layer) if choice is None else costs.of(layer, choice))
                for layer, choice in ((layer, allocation.choices[layer.name]) for layer in planning.layers)}
        return allocation, solved

    def decide(self, fraction: float) -> tuple[Allocation, Solved]:
        return _with_sensitivity(self.budget, self.planning, self.curves, fraction, self.gains)

    def gains(self):
        """The layers' weights, computed once: the noise probe's gains, or measured curves."""
        if self._gains is None:
            planning = self.planning
            if self.budget.sensitivity is Sensitivity.MEASURED:
                self._gains = MeasuredWeights(planning, self.curves)
            else:
                self._gains = layer_sensitivities(planning.model, planning.layers, planning.judge)
        return self._gains

    def loss(self, solved: Solved) -> float:
        """The judge's loss of the model ``solved`` gives (0: as the original)."""
        return self.planning.judge.loss(apply_solved(self.planning.model, self.planning.layers, solved))


class Curves:
    """The candidate curves of every layer, refined where an allocation's spare cost reaches."""

    def __init__(self, planning: Planning, multiple: int | None):
        self.planning, self.multiple = planning, multiple
        solve, xp = planning.solve, planning.xp
        workers = layer_workers(planning.workers, xp)
        # Each item is one layer's problem, so that a remote worker (Ray) is sent that layer's only.
        points = map_parallel(partial(CURVES[solve.method], solve=solve, xp=xp, multiple=multiple),
                              [planning.problems[layer.name] for layer in planning.layers], workers, desc="curves",
                              progress=planning.progress)
        self.points = {layer.name: p for layer, p in zip(planning.layers, points)}

    def allocate(self, fraction: float, gains: dict | None = None, rounds: int = 3) -> Allocation:
        """Knapsack, then up to ``rounds`` refinements of the coarse curves (see :meth:`_refine`)."""
        allocation = self._knapsack(fraction, gains)
        for _ in range(rounds):
            spare = (fraction - allocation.predicted) * self.planning.costs.total
            if spare <= SPARE_TOLERANCE * self.planning.costs.total or not self._refine(allocation, spare):
                break
            allocation = self._knapsack(fraction, gains)
        return allocation

    def _knapsack(self, fraction: float, gains: dict | None) -> Allocation:
        """Ranks per layer meeting a whole-model budget (layers outside the plan cost what they cost)."""
        costs, layers = self.planning.costs, self.planning.layers
        choices, dense_total = [], 0.0
        for layer in tqdm(layers, desc="costs", unit="layer", disable=not costs.progress):
            dense = costs.dense(layer)
            dense_total += dense
            points = self.points[layer.name]
            choices.append([Option(dense, 0.0, None)]
                           + [Option(costs.of(layer, c), _weighted_error(gains, layer.name, c), c) for c in points])
        untouched = costs.total - dense_total
        picked, feasible = allocate(choices, fraction * costs.total - untouched)
        spent = sum(options[i].cost for options, i in zip(choices, picked))
        chosen = {layer.name: options[i].label for layer, options, i in zip(layers, choices, picked)}
        return Allocation(chosen, (untouched + spent) / costs.total, feasible)

    def _refine(self, allocation: Allocation, spare: float) -> int:
        """Spend what coarse curves leave: the Tucker-2 and CP curves are sampled at a few MAC
        fractions, so the allocation can stop short of the budget (digits, Tucker-2 at 75%: 71.7%).
        Every layer on such a curve gets the candidate its current cost plus the whole spare would
        buy (cost ~ linear in MACs). Returns the number of new points."""
        planning, added = self.planning, 0
        for layer in planning.layers:
            chosen = allocation.choices[layer.name]
            if chosen is None or chosen.method not in REFINABLE:
                continue
            cost = planning.costs.of(layer, chosen)
            reach = min(0.95, chosen.macs / layer.weight.size * (cost + spare) / cost)
            known = {c.rank for c in self.points[layer.name]}
            new = [c for c in REFINABLE[chosen.method](planning.problems[layer.name], planning.solve, planning.xp,
                                                       self.multiple, fractions=(reach,))
                   if c.rank not in known]
            self.points[layer.name].extend(new)
            added += len(new)
        return added


def _weighted_error(gains, name: str, candidate: Candidate) -> float:
    """A candidate's error times its weight. An exact candidate costs no error whatever the weight:
    a layer whose noise made the outputs NaN weighs inf, and inf x 0 would be NaN."""
    return 0.0 if candidate.error == 0 else _weight(gains, name, candidate) * candidate.error


def _weight(gains, name: str, candidate: Candidate) -> float:
    """A candidate's error weight: 1, its layer's noise-probe gain, or a measured curve's interpolation."""
    if gains is None:
        return 1.0
    return gains(name, candidate) if callable(gains) else gains[name]


def _solve(planning: Planning, allocation: Allocation, judging: bool = False) -> Solved:
    """Each layer solved at its chosen point; points an earlier allocation solved are reused.

    ``judging``: the allocation is only judged against another (sensitivity on/auto): its Tucker-2
    layers stop after ``JUDGE_SWEEPS`` ALS sweeps, and the allocation kept continues from them to
    convergence. A full solve is spent only on the points the budget keeps.
    """
    plan = allocation.solve_plan(planning.solve)
    out, full, partial = {}, {}, {}
    for name, entry in plan.items():
        choice = allocation.choices[name]
        if choice is None:
            full[name] = entry
            continue
        key = (name, choice.method, choice.rank, choice.form)
        if key in planning.solved:
            out[name] = planning.solved[key]
        elif judging and choice.method is Method.TUCKER2:
            if key in planning.judged:
                out[name] = planning.judged[key]
            else:
                partial[name] = entry
        else:
            judged = planning.judged.get(key)
            if getattr(judged, "info", {}).get("converged"):  # the judged solve already converged
                out[name] = planning.solved[key] = judged
            else:
                full[name] = entry if judged is None else (entry[0], judged)
    for todo, sweeps, store in ((full, None, planning.solved), (partial, JUDGE_SWEEPS, planning.judged)):
        solved = solve_layers(planning.problems, todo, planning.xp, planning.progress,
                              planning.workers, sweeps)
        for name, result in solved.items():
            choice = allocation.choices[name]
            if choice is not None:
                store[(name, choice.method, choice.rank, choice.form)] = result
        out.update(solved)
    return {name: out[name] for name in plan}


def _with_sensitivity(budget: BudgetConfig, planning: Planning, curves: Curves, fraction: float, gains_of):
    """Allocate and solve; with a judge, also weight by sensitivity and keep what "auto" prefers
    (the allocation whose model has the smaller loss on the judge's samples)."""
    allocation = curves.allocate(fraction)
    if budget.sensitivity is Sensitivity.OFF or planning.judge is None:
        return allocation, _solve(planning, allocation)
    gains = gains_of()
    weighted = curves.allocate(fraction, gains)
    note = {}
    if weighted.choices != allocation.choices:
        losses = [_loss(planning, _solve(planning, a, judging=True)) for a in (allocation, weighted)]
        note = {"unweighted_loss": losses[0], "weighted_loss": losses[1], "metric": planning.judge.metric.name,
                "judged_tucker2_sweeps": JUDGE_SWEEPS}
        if budget.sensitivity in (Sensitivity.ON, Sensitivity.MEASURED) or losses[1] <= losses[0]:
            allocation = weighted
    elif budget.sensitivity in (Sensitivity.ON, Sensitivity.MEASURED):
        allocation = weighted  # the same choices: the same solved layers
    solved = _solve(planning, allocation)
    shown = gains.note() if isinstance(gains, MeasuredWeights) else {k: round(v, 6) for k, v in gains.items()}
    allocation.sensitivity = {**note, "weighted": allocation is weighted, "probe": planning.judge.source,
                              "probe_samples": getattr(gains, "samples", None), "mode": budget.sensitivity.value,
                              "gains": shown}
    return allocation, solved


def _loss(planning: Planning, solved: Solved) -> float:
    return planning.judge.loss(apply_solved(planning.model, planning.layers, solved))


def _close_latency_loop(planning: Planning, decide, first, fraction: float):
    """Measure the planned model; if it misses the target, re-plan once, aiming off by the miss.

    The prediction (in-model dense times, isolated chain/dense ratios) misses what the
    rewritten model does by a few percent (its chains fuse and cache differently); one
    re-allocation at ``fraction + (predicted - measured)`` corrects most of it. A chain that
    ran slower than priced re-prices its layer (``costs.measure``) and re-allocates too, the
    part of the miss it explains no longer aimed off. The round whose measurement is closer
    to the target is kept.
    """
    rounds, best, aim = [], None, fraction
    for _ in range(2):
        allocation, solved = first if best is None else decide(aim)
        if best is not None and allocation.choices == best[0].choices:
            break  # the allocation cannot move: nothing new to measure
        measured = planning.costs.measure(apply_solved(planning.model, planning.layers, solved), allocation.choices)
        repriced = list(planning.costs.repriced)  # chains slower than priced: their layers now cost what they took
        rounds.append({"aimed": aim, "predicted": allocation.predicted, "measured": measured, "repriced": repriced})
        allocation.measured = measured
        if best is None or abs(measured - fraction) < abs(best[0].measured - fraction):
            best = (allocation, solved)
        # What the loop corrects is the prediction's miss, not the grid's: an allocation predicted
        # below the target (coarse candidates) that measures as predicted is not re-aimed upwards.
        if abs(measured - allocation.predicted) <= LATENCY_RETRY * fraction and not repriced:
            break
        aim = min(1.0, max(0.01, aim + allocation.predicted - measured + planning.costs.explained))
    best[0].rounds = rounds
    return best
