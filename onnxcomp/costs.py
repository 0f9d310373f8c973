"""What a layer choice costs, for whole-model budgets: MACs, parameters or measured latency.

Each cost model answers three questions the allocation asks: the whole
model's cost, a target layer's cost kept dense, and its cost as a candidate
chain. Layers outside the plan cost what they cost, so the budget for the
target layers is ``fraction * total - (total - sum of their dense costs)``.
"""

from __future__ import annotations

import numpy as np

from . import graph
from .decompose.solve import Candidate
from .errors import OnnxcompError
from .latency import LatencyTable, Timer, profile


class CostModel:
    """What every cost model offers; MACs and params are counted, so there is nothing to show or keep."""

    kind = ""
    total = 0.0
    progress = False  # a progress bar while pricing: only measuring takes long enough

    def dense(self, layer) -> float:
        raise NotImplementedError

    def of(self, layer, candidate: Candidate) -> float:
        raise NotImplementedError

    def save(self) -> None:
        """Keep what was measured for the next run (nothing to keep for counted costs)."""


class MacCost(CostModel):
    kind = "macs"

    def __init__(self, model, layers, problems, shapes, sample):
        self.total = graph.count_macs(model, shapes, sample)
        if self.total is None:
            raise OnnxcompError("--target-macs cannot count this model's MACs: give calibration data (--data) or --input-shape")
        self._positions = {}
        for layer in layers:
            positions = layer_positions(layer, problems[layer.name].stats)
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
        self.total = graph.count_params(model)

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
        self.profile = profile(model, sample, timer, layers)
        self.total = self.profile.total

    def dense(self, layer) -> float:
        seconds = self.profile.layers.get(layer.output)
        if seconds is None:  # not found in the profile: timed on its own
            seconds = self.table.layer_seconds(layer, self.input_shapes[layer.name])
        return seconds

    def of(self, layer, candidate: Candidate) -> float:
        return self.dense(layer) * self.table.ratio(layer, self.input_shapes[layer.name], candidate)

    def measure(self, compressed) -> float:
        """The compressed model's profiled time as a fraction of the original's."""
        return profile(compressed, self.sample, self.timer).total / self.total

    def save(self) -> None:
        self.table.save()


def layer_positions(layer: graph.TargetLayer, stats) -> int | None:
    """Output rows per sample: from shape inference, else from the calibration statistics."""
    if layer.positions is not None:
        return layer.positions
    return None if stats is None else round(stats.positions)


def _layer_input_shapes(model, layers, shapes, sample) -> dict[str, list[int]]:
    """Each layer's input shape for one sample (shape inference, else one onnxruntime run)."""
    inferred = graph.infer_shapes(graph.with_input_shapes(model, shapes))
    if any(not _static(inferred.get(layer.input)) for layer in layers):
        inferred.update(graph.runtime_shapes(model, {k: np.asarray(v)[:1] for k, v in sample.items()}))
    out = {}
    for layer in layers:
        shape = inferred.get(layer.input)
        if not _static(shape):
            raise OnnxcompError(f"cannot time layer {layer.name!r}: the shape of its input {layer.input!r} is unknown")
        out[layer.name] = list(shape)  # the sample has batch 1
    return out


def _static(shape) -> bool:
    return bool(shape) and all(isinstance(d, int) and d > 0 for d in shape)
