"""How much does each layer's output error move the model's outputs?

A cheap one-layer-at-a-time probe: every target layer's output gets an
``Add`` of a noise input (zeros by default) in one probe model; then, per
layer, noise with a per-channel standard deviation of ``epsilon`` times that
channel's own spread (a relative output error of about ``epsilon``, in the
units of the solvers' relative error) is fed to that layer alone, and the
change of the model's outputs is measured as the judge measures candidate models
(standardised per output channel: a large-valued output must not drown a
small-valued one, as pixel boxes drowned class scores in a detector). The squared gain
``(output change / epsilon)^2`` weights the layer's squared relative error in
the budget allocation: errors in sensitive layers cost more.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..judge import Judge
from ..model import TargetLayer
from ..runtime import feed_size, fixed_batch, make_session, repeated, run_arrays

_SUFFIX = "/onnxcomp_clean"


# Samples the probe runs: one forward pass of them per layer, so its cost grows as layers x
# samples x MACs per sample. Up to PROBE_SAMPLES; fewer where that would pass PROBE_MACS, never fewer
# than MIN_PROBE_SAMPLES. Measured on PP-OCRv4 det at --target-macs 0.5 (48 layers): 4 samples
# instead of 8 ranked the layers' gains the same (Spearman 0.99), gave the same allocation quality
# (held-out box hit rate 0.973 both) in 17 s instead of 37 s; 1 sample ranked them at 0.94.
PROBE_SAMPLES = 16
MIN_PROBE_SAMPLES = 4
PROBE_MACS = 4e11  # multiply-adds of all the probe's forward passes together: 5-20 s on 2 cores


class Gains(dict):
    """Layer name -> squared gain, and how many samples the probe ran (``samples``)."""

    samples: int = 0


def layer_sensitivities(model: onnx.ModelProto, layers: list[TargetLayer], judge: Judge, epsilon: float = 0.05,
                        seed: int = 0) -> Gains:
    """Layer name -> squared gain from its relative output error to the model's standardised output error
    (the judge's measure: per output channel, weighted by ``--outputs``)."""
    session = make_session(_probe_model(model, layers), threads=judge.threads)
    batches = _probe_batches(judge.feed, fixed_batch(session, judge.feed), probe_samples(layers))
    outputs = [o.name for o in model.graph.output]
    zeros = {f"noise/{layer.output}": np.zeros((1,), _dtype(layer)) for layer in layers}
    clean_names = [layer.output + _SUFFIX for layer in layers]
    runs = [run_arrays(session, outputs + clean_names, {**feed, **zeros}) for feed in batches]
    reference = _joined([run[: len(outputs)] for run in runs])
    feed = {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}
    rng = np.random.default_rng(seed)
    gains = Gains()
    gains.samples = feed_size(feed)
    for index, layer in enumerate(layers):
        perturbed = []
        for batch, run in zip(batches, runs):
            noise = _relative_noise(run[len(outputs) + index], epsilon, rng)
            perturbed.append(run_arrays(session, outputs, {**batch, **zeros, f"noise/{layer.output}": noise}))
        gains[layer.name] = (judge.standardized(reference, _joined(perturbed), feed) / epsilon) ** 2
    return gains


def _joined(runs: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Each output of several batches' runs, joined along the sample axis."""
    return [np.concatenate(parts) if len(parts) > 1 else parts[0] for parts in zip(*runs)]


def probe_samples(layers: list[TargetLayer]) -> int:
    """How many samples the probe runs at most: PROBE_SAMPLES, fewer for large models (PROBE_MACS)."""
    macs_per_pass = len(layers) * sum(layer.macs() or 0 for layer in layers)
    if macs_per_pass <= 0:
        return PROBE_SAMPLES
    return int(min(PROBE_SAMPLES, max(MIN_PROBE_SAMPLES, PROBE_MACS // macs_per_pass)))


def _probe_batches(feed: dict, fixed: int | None, most: int = PROBE_SAMPLES) -> list[dict]:
    """Up to ``most`` samples of ``feed`` as the probe's batches: one batch, or batches of exactly
    the size a fixed-batch model takes, as many as those samples fill (a fixed batch of 1 probed
    on one sample gave noise for gains: a layout detector's budget lost to the unweighted one)."""
    count = min(feed_size(feed), most)
    if not fixed:
        return [repeated(feed, count)]
    return [repeated(feed, fixed, start) for start in range(0, max(count, 1), fixed)]


def _dtype(layer: TargetLayer) -> np.dtype:
    """The element type of the layer's output: its weight's (float16 models add float16 noise)."""
    return np.dtype(layer.weight.dtype)


def _relative_noise(activation: np.ndarray, epsilon: float, rng) -> np.ndarray:
    """Gaussian noise whose energy per channel (axis 1, or the last axis of a row layout) is
    epsilon^2 times the channel's variance."""
    axis = 1 if activation.ndim == 4 else activation.ndim - 1
    reduce = tuple(i for i in range(activation.ndim) if i != axis)
    spread = activation.astype(np.float64).std(axis=reduce, keepdims=True)
    return (epsilon * spread * rng.standard_normal(activation.shape)).astype(activation.dtype)


def _probe_model(model: onnx.ModelProto, layers: list[TargetLayer]) -> onnx.ModelProto:
    """The model with ``y = y_clean + noise/y`` after every target layer, and the clean outputs exposed."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph = probe.graph
    by_output = {node.output[0]: node for node in graph.node if node.output}
    additions = []
    for layer in layers:
        node = by_output[layer.output]
        clean = layer.output + _SUFFIX
        node.output[0] = clean
        noise = f"noise/{layer.output}"
        elem_type = onnx.helper.np_dtype_to_tensor_dtype(_dtype(layer))
        graph.input.append(onnx.helper.make_tensor_value_info(noise, elem_type, None))
        additions.append(onnx.helper.make_node("Add", [clean, noise], [layer.output], name=f"{noise}/add"))
        graph.output.append(onnx.helper.make_tensor_value_info(clean, elem_type, None))
    # Keep topological order: each Add right after the node it follows.
    ordered = []
    after = {a.input[0]: a for a in additions}
    for node in graph.node:
        ordered.append(node)
        if node.output and node.output[0] in after:
            ordered.append(after[node.output[0]])
    del graph.node[:]
    graph.node.extend(ordered)
    return probe
