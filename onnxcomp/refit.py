"""Bias re-estimation: each rewritten layer's output mean, on what the compressed model feeds it,
set back to the original's.

Every layer is fitted to the statistics of the *original* model's input. In the compressed model a
layer receives an input already changed by the layers before it, and the shift of its mean passes
on, layer after layer. The cheapest part of fitting each layer to what the compressed model feeds it
(the sequential objective ``E||W x - W~ x~||^2``, whose bias term is ``b~ = b + W mu - W~ mu~``):
keep every chain's factors and move the bias of its last node by the difference of the original
layer's output mean and the chain's output mean on the same calibration samples, measured in the
compressed model; the layers a budget kept dense get the same correction (their inputs changed too). One pass corrects every layer for the shifts of the uncorrected layers before it;
a second pass sees the corrected ones. Only the calibration samples the statistics used are read
(the validation samples stay held out), and the judge keeps the re-estimated model only where it
scores better than the one-shot one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np
import onnx

from .calibration.means import output_means
from .decompose.solve import Decomposition
from .model import TargetLayer
from .passes import apply_decompositions

PASSES = 3  # each pass sees the corrections the last one made to the layers before each layer


@dataclass
class Refit:
    """The re-estimated model and what the judge said of it."""

    model: onnx.ModelProto
    plan: list[tuple[TargetLayer, Decomposition]]
    loss_before: float | None = None  # the judge's loss of the one-shot model (None: no judge)
    loss_after: float | None = None
    kept: bool = True  # False: the judge preferred the one-shot model, which is returned instead
    dense_layers: int = 0  # layers kept dense whose bias was moved too
    rejected: onnx.ModelProto | None = None  # the re-estimated model, where the judge kept the one-shot one

    def note(self) -> str:
        moved = f"{len(self.plan)} rewritten and {self.dense_layers} dense layer(s)"
        if self.loss_before is None:
            return f"bias re-estimation of {moved}: applied (no validation samples to judge it by)"
        verdict = "kept" if self.kept else "not kept (the one-shot biases judge better)"
        return f"bias re-estimation of {moved}: validation loss {self.loss_before:.4g} -> {self.loss_after:.4g}, {verdict}"


def refit_biases(model: onnx.ModelProto, layers: list[TargetLayer], plan: list[tuple[TargetLayer, Decomposition]],
                 calibration: Callable[[], Iterable[dict]], compressed: onnx.ModelProto, judge=None,
                 threads: int | None = None, passes: int | None = None) -> Refit:
    """``compressed`` (built from ``plan``) with the bias of every one of ``layers`` (rewritten by
    ``plan`` or kept dense: the input of both changed) moved so that its output mean on
    ``calibration()`` (a fresh iterator of the statistics' batches each call) equals the original
    layer's in ``model``; ``judge`` decides between it and ``compressed``."""
    target = output_means(model, layers, calibration(), threads)
    decompositions = {layer.name: decomposition for layer, decomposition in plan}
    dense: dict[str, np.ndarray] = {}  # layer kept dense -> its new bias
    current, new_plan = compressed, plan
    for _ in range(PASSES if passes is None else passes):
        measured = output_means(current, layers, calibration(), threads)
        for layer in layers:
            shift = _shift(target.get(layer.name), measured.get(layer.name))
            if shift is None:
                continue
            if layer.name in decompositions:
                decomposition = decompositions[layer.name]
                bias = decomposition.bias if decomposition.bias is not None else 0.0
                decompositions[layer.name] = replace(decomposition, bias=bias + shift)
            else:
                dense[layer.name] = dense.get(layer.name, _dense_bias(layer)) + shift
        new_plan = [(layer, decompositions[layer.name]) for layer, _ in plan]
        current = apply_decompositions(model, new_plan, [(layer, dense[layer.name]) for layer in layers
                                                         if layer.name in dense])
    refit = Refit(current, new_plan, dense_layers=len(dense))
    if judge is not None:
        refit.loss_before, refit.loss_after = judge.loss(compressed), judge.loss(current)
        if not refit.loss_after <= refit.loss_before:  # NaN or worse: the one-shot model stays
            refit.rejected, refit.model, refit.plan, refit.kept = current, compressed, plan, False
    return refit


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
