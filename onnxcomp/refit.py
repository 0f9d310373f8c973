"""Bias re-estimation: each layer's output mean, on what the compressed model feeds it, set back
to the original's.

Every layer is fitted to the statistics of the *original* model's input. In the compressed model a
layer receives an input already changed by the layers before it, and the shift of its mean passes
on, layer after layer. The cheapest part of fitting each layer to what the compressed model feeds it
(the sequential objective ``E||W x - W~ x~||^2``, whose bias term is ``b~ = b + W mu - W~ mu~``):
keep every chain's factors and move the bias of its last node by the difference of the original
layer's output mean and the chain's output mean on the same calibration samples, measured in the
compressed model. The layers a budget kept dense get the same correction (their inputs changed too).

The corrections go in one sweep down the network, a stage per *level* (a layer's level: one more
than the highest level of the layers it reads from), each stage measured in the model that already
holds the corrections of the stages above it. Corrected all at once instead, a layer would undo
both its own shift and the shift its upstream layers are undoing too: on a MobileNetV3 that
overshoot destroyed the model. A stage costs one forward pass of the samples, so the means are
taken on the first ``SAMPLES`` calibration samples the statistics used (a mean needs far fewer
than a covariance); the validation samples stay held out, and the judge keeps the re-estimated
model only where it scores better than the one-shot one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import onnx

from .calibration.means import output_means
from .decompose.solve import Decomposition
from .model import TargetLayer
from .model.subgraphs import bodies, walk_graphs
from .passes import apply_decompositions
from .runtime import feed_size

SAMPLES = 64  # calibration samples the means are measured on


@dataclass
class Refit:
    """The re-estimated model and what the judge said of it."""

    model: onnx.ModelProto
    plan: list[tuple[TargetLayer, Decomposition]]
    loss_before: float | None = None  # the judge's loss of the one-shot model (None: no judge)
    loss_after: float | None = None
    kept: bool = True  # False: the judge preferred the one-shot model, which is returned instead
    dense_layers: int = 0  # layers kept dense whose bias was moved too
    stages: int = 0
    rejected: onnx.ModelProto | None = None  # the re-estimated model, where the judge kept the one-shot one

    def note(self) -> str:
        moved = f"{len(self.plan)} rewritten and {self.dense_layers} dense layer(s), {self.stages} stage(s)"
        if self.loss_before is None:
            return f"bias re-estimation of {moved}: applied (no validation samples to judge it by)"
        verdict = "kept" if self.kept else "not kept (the one-shot biases judge better)"
        return f"bias re-estimation of {moved}: validation loss {self.loss_before:.4g} -> {self.loss_after:.4g}, {verdict}"


class SampleCapture:
    """Passes calibration batches through unchanged and keeps the first ``limit`` samples of them,
    so that bias re-estimation reads the statistics' own samples without reading the data again."""

    def __init__(self, feeds: Iterable[dict], limit: int = SAMPLES):
        self.feeds, self.limit = feeds, limit
        self.kept: list[dict] = []
        self.count = 0

    def __iter__(self) -> Iterator[dict]:
        for feed in self.feeds:
            room = self.limit - self.count
            if room > 0:
                part = {name: value[:room] if np.ndim(value) else value for name, value in feed.items()}
                self.kept.append(part)
                self.count += feed_size(part)
            yield feed


def refit_biases(model: onnx.ModelProto, layers: list[TargetLayer], plan: list[tuple[TargetLayer, Decomposition]],
                 samples: list[dict], compressed: onnx.ModelProto, judge=None, threads: int | None = None) -> Refit:
    """``compressed`` (built from ``plan``) with the bias of every one of ``layers`` (rewritten by
    ``plan`` or kept dense: the input of both changed) moved so that its output mean on ``samples``
    (calibration batches) equals the original layer's in ``model``, stage by stage down the levels;
    ``judge`` decides between it and ``compressed``."""
    target = output_means(model, layers, samples, threads)
    decompositions = {layer.name: decomposition for layer, decomposition in plan}
    dense: dict[str, np.ndarray] = {}  # layer kept dense -> its new bias
    current, new_plan = compressed, plan
    stages = _stages(model, layers)
    for stage in stages:
        measured = output_means(current, stage, samples, threads)
        after_output = _bias_after_output(current, stage)
        moved = False
        for layer in stage:
            shift = _shift(target.get(layer.name), measured.get(layer.name))
            if shift is None:
                continue
            moved = True
            if layer.name in decompositions:
                decomposition = decompositions[layer.name]
                bias = decomposition.bias if decomposition.bias is not None else 0.0
                # A bias folded into the Add after a MatMul chain is not in the measured output:
                # the shift is the whole bias the chain needs.
                decompositions[layer.name] = replace(decomposition, bias=shift if layer.name in after_output
                                                     else bias + shift)
            else:
                dense[layer.name] = _dense_bias(layer) + shift
        if moved:
            new_plan = [(layer, decompositions[layer.name]) for layer, _ in plan]
            current = apply_decompositions(model, new_plan, [(layer, dense[layer.name]) for layer in layers
                                                             if layer.name in dense])
    refit = Refit(current, new_plan, dense_layers=len(dense), stages=len(stages))
    if judge is not None:
        refit.loss_before, refit.loss_after = judge.loss(compressed), judge.loss(current)
        if not refit.loss_after <= refit.loss_before:  # NaN or worse: the one-shot model stays
            refit.rejected, refit.model, refit.plan, refit.kept = current, compressed, plan, False
    return refit


def _bias_after_output(model: onnx.ModelProto, layers: list[TargetLayer]) -> set[str]:
    """The MatMul layers whose chain in ``model`` ends in a MatMul: their bias, if any, was folded
    into the Add that follows (``passes/lowrank.py``), past the output the means are measured at."""
    producers = {name: node.op_type for _, graph in walk_graphs(model.graph) for node in graph.node
                 for name in node.output}
    return {layer.name for layer in layers if layer.op_type == "MatMul" and producers.get(layer.output) == "MatMul"}


def _stages(model: onnx.ModelProto, layers: list[TargetLayer]) -> list[list[TargetLayer]]:
    """``layers`` grouped by level, top first: no layer of a stage reads from another of it."""
    levels = layer_levels(model, layers)
    return [[layer for layer in layers if levels[layer.name] == level] for level in sorted(set(levels.values()))]


def layer_levels(model: onnx.ModelProto, layers: list[TargetLayer]) -> dict[str, int]:
    """Layer name -> 1 + the highest level of the layers on any path into it (bodies included:
    a body's nodes read the outer tensors around them by name)."""
    by_output = {layer.output: layer for layer in layers}
    tensor_level: dict[str, int] = {}
    levels: dict[str, int] = {}

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            incoming = max((tensor_level.get(name, 0) for name in node.input), default=0)
            for _, body in bodies(node):
                visit(body)
                incoming = max([incoming, *(tensor_level.get(o.name, 0) for o in body.output)])
            layer = by_output.get(node.output[0]) if node.output else None
            if layer is not None:
                levels[layer.name] = incoming = incoming + 1
            for name in node.output:
                tensor_level[name] = incoming

    visit(model.graph)
    return {layer.name: levels.get(layer.name, 1) for layer in layers}


# A shift below this, relative to the output mean's size, is float32 rounding: no new bias for it.
NEGLIGIBLE = 1e-5


def _shift(original: np.ndarray | None, measured: np.ndarray | None) -> np.ndarray | None:
    """How far to move a layer's bias (None: a mean is missing, its body did not run, or it is
    rounding only)."""
    if original is None or measured is None:
        return None
    shift = original - measured
    return shift if np.abs(shift).max() > NEGLIGIBLE * (np.abs(original).max() + 1e-30) else None


def _dense_bias(layer: TargetLayer) -> np.ndarray:
    """A dense layer's bias as :func:`~onnxcomp.passes.bias.rewrite_bias` takes it: the whole bias
    (a MatMul has none: its shift alone, added to the Add that follows or a new one)."""
    return np.zeros(layer.out_features) if layer.bias is None else layer.bias.astype(np.float64)
