"""What a layer choice costs, for whole-model budgets: MACs, parameters or measured latency.

Each cost model answers three questions the allocation asks: the whole
model's cost, a target layer's cost kept dense, and its cost as a candidate
chain. Layers outside the plan cost what they cost, so the budget for the
target layers is ``fraction * total - (total - sum of their dense costs)``.
"""

from __future__ import annotations

import numpy as np

from ..config import BudgetConfig, BudgetKind
from ..errors import OnnxcompError
from ..model import count_macs, count_params, infer_shapes, runtime_shapes, with_input_shapes
from ..reach import guard
from ..runtime import Timer
from .candidates import Candidate
from .latency import LatencyTable


class CostModel:
    """What every cost model offers; MACs and params are counted, so there is nothing to show or keep."""

    kind = ""
    total = 0.0
    timed = 0  # timings taken in this run (only measured costs take any)
    progress = False  # a progress bar while pricing: only measuring takes long enough
    repriced: tuple[str, ...] = ()  # measured costs: the layers the last measurement re-priced
    explained = 0.0  # and the part of its miss (a fraction of the total) that re-pricing explains

    def dense(self, layer) -> float:
        raise NotImplementedError

    def of(self, layer, candidate: Candidate) -> float:
        raise NotImplementedError

    def save(self) -> None:
        """Keep what was measured for the next run (nothing to keep for counted costs)."""


class MacCost(CostModel):
    kind = "macs"

    def __init__(self, model, layers, problems, shapes, sample):
        self.total = count_macs(model, shapes, sample)
        if self.total is None:
            raise OnnxcompError(
                "--target-macs cannot count this model's MACs: give calibration data (--data) or --input-shape")
        self._positions = {}
        for layer in layers:
            positions = problems[layer.name].positions
            if positions is None:
                raise OnnxcompError(f"cannot count the MACs of layer {layer.name!r}: give --input-shape")
            self._positions[layer.name] = positions

    def dense(self, layer) -> float:
        return float(layer.weight.size * self._positions[layer.name])

    def of(self, layer, candidate: Candidate) -> float:
        return float(candidate.macs * self._positions[layer.name])


class ParamCost(CostModel):
    kind = "params"

    def __init__(self, model):
        self.total = count_params(model)

    def dense(self, layer) -> float:
        return float(layer.weight.size)

    def of(self, layer, candidate: Candidate) -> float:
        return float(candidate.params)


class LatencyCost(CostModel):
    """Seconds at batch 1, measured with onnxruntime (see :mod:`onnxcomp.latency`): the whole model
    and each dense layer from the profiler (in place, fusions included), each candidate as its
    measured ratio to the dense layer."""

    kind = "latency"

    def __init__(self, model, layers, shapes, sample, timer: Timer, cache=None, progress: bool = False):
        if sample is None:
            raise OnnxcompError("--target-latency needs calibration data (--data) to time the model")
        self.timer = timer
        self.sample = sample
        self.table = LatencyTable(timer, cache)
        self.input_shapes = _layer_input_shapes(model, layers, shapes, sample)
        self.progress = progress
        self.layers = layers
        self.profile = timer.profile(model, sample, layers)
        self.total = self.profile.total
        self._scale: dict[str, float] = {}  # layer name -> measured / predicted time of its chains (re-priced)

    def dense(self, layer) -> float:
        seconds = self.profile.layers.get(layer.output)
        if seconds is None:  # not found in the profile: timed on its own
            seconds = self.table.layer_seconds(layer, self.input_shapes[layer.name])
        return seconds

    def of(self, layer, candidate: Candidate) -> float:
        ratio = self.table.ratio(layer, self.input_shapes[layer.name], candidate)
        return self.dense(layer) * ratio * self._scale.get(layer.name, 1.0)

    def measure(self, compressed, choices: dict | None = None) -> float:
        """The compressed model's profiled time as a fraction of the original's.

        Each chosen chain's time in the compressed model is checked against its price (the latency
        guard of :mod:`onnxcomp.reach`): a layer whose chain runs slower than its dense layer, or
        than priced by more than the guard's margin, is re-priced (all its candidates scaled by
        measured / priced) for the next allocation."""
        profile = self.timer.profile(compressed, self.sample, self.layers)
        chosen = [layer for layer in self.layers if (choices or {}).get(layer.name) is not None]
        priced = {layer.name: self.of(layer, choices[layer.name]) for layer in chosen}
        chains = {layer.name: profile.layers[layer.output] for layer in chosen if layer.output in profile.layers}
        checks = guard({layer.name: self.dense(layer) for layer in chosen}, chains, priced, priced)
        self.repriced = tuple(name for name, check in checks.items() if check.flag)
        self.explained = sum(chains[name] - priced[name] for name in self.repriced) / self.total
        for name in self.repriced:
            self._scale[name] = self._scale.get(name, 1.0) * chains[name] / priced[name]
        return profile.total / self.total

    @property
    def timed(self) -> int:
        return self.table.measured

    def save(self) -> None:
        self.table.save()


def make_costs(budget: BudgetConfig, model, layers, problems, shapes, sample, timer: Timer,
               progress: bool) -> CostModel:
    """The cost model of the budget's kind."""
    if budget.kind is BudgetKind.MACS:
        return MacCost(model, layers, problems, shapes, sample)
    if budget.kind is BudgetKind.PARAMS:
        return ParamCost(model)
    return LatencyCost(model, layers, shapes, sample, timer, budget.latency.cache, progress)


def _layer_input_shapes(model, layers, shapes, sample) -> dict[str, list[int]]:
    """Each layer's input shape for one sample (shape inference, else one onnxruntime run)."""
    inferred = infer_shapes(with_input_shapes(model, shapes))
    if any(not _static(inferred.get(layer.input)) for layer in layers):
        inferred.update(runtime_shapes(model, {k: np.asarray(v)[:1] for k, v in sample.items()}))
    out = {}
    for layer in layers:
        shape = inferred.get(layer.input)
        if not _static(shape):
            raise OnnxcompError(f"cannot time layer {layer.name!r}: the shape of its input {layer.input!r} is unknown")
        out[layer.name] = list(shape)  # the sample has batch 1
    return out


def _static(shape) -> bool:
    return bool(shape) and all(isinstance(d, int) and d > 0 for d in shape)
