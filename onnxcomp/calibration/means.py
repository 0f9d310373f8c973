"""The mean of each layer's output, per output channel, over calibration batches (float64 sums).

What bias re-estimation (``onnxcomp/refit.py``) compares: the original model's layer outputs and a
compressed model's, whose chains write the same output tensors. A layer inside an If/Loop/Scan body
has its output lifted out of the body as calibration lifts inputs (``model/subgraphs.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from onnx import helper

from ..model import TargetLayer
from ..model.subgraphs import lift, stacked_levels
from ..runtime import feed_size, repeated
from .collect import _first_samples, _iterations_as_rows, _Session
from .readers import fixed_batch, model_inputs


def output_means(model: onnx.ModelProto, layers: Sequence[TargetLayer], feeds: Iterable[dict],
                 threads: int | None = None) -> dict[str, np.ndarray]:
    """Layer name -> the mean of its output per output channel (float64) over ``feeds`` (batches laid
    out for ``model``); a layer whose output no batch computed (an If branch not taken) is absent."""
    instrumented, fetch = _with_layer_outputs(model, layers)
    session = _Session(instrumented, None, threads)
    fixed = fixed_batch(model_inputs(model))
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for index, feed in enumerate(feeds):
        real = feed_size(feed)
        padded = fixed is not None and real < fixed
        values = session.run(fetch, repeated(feed, fixed) if padded else feed, index)
        for layer, value in zip(layers, values):
            stacked = stacked_levels(layer.scope)
            output, _ = _iterations_as_rows(_first_samples(value, real, fixed, stacked) if padded else value, stacked)
            if output is None:  # the body did not run on this batch
                continue
            channels = _channel_rows(layer, output)
            sums[layer.name] = sums.get(layer.name, 0.0) + channels.sum(axis=0, dtype=np.float64)
            rows[layer.name] = rows.get(layer.name, 0) + len(channels)
    return {name: sums[name] / rows[name] for name in sums if rows[name]}


def _with_layer_outputs(model: onnx.ModelProto, layers: Sequence[TargetLayer]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with every layer's output as a graph output; the names to fetch, per layer."""
    instrumented = onnx.ModelProto()
    instrumented.CopyFrom(model)
    outputs = {o.name for o in instrumented.graph.output}
    in_bodies = [layer for layer in layers if layer.scope]
    lifted = lift(instrumented, [(layer.output, layer.scope, _elem_type(layer)) for layer in in_bodies])
    carried = {layer.name: name for layer, name in zip(in_bodies, lifted)}
    for layer in layers:
        if not layer.scope and layer.output not in outputs:
            instrumented.graph.output.append(helper.make_tensor_value_info(layer.output, _elem_type(layer), None))
            outputs.add(layer.output)
    return instrumented, [carried.get(layer.name, layer.output) for layer in layers]


def _elem_type(layer: TargetLayer) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(layer.weight.dtype))


def _channel_rows(layer: TargetLayer, value: np.ndarray) -> np.ndarray:
    """The output as rows of its channels: Conv / ConvTranspose [N, C, ...], Gemm [M, N], MatMul [..., N]."""
    axis = 1 if layer.conv is not None else value.ndim - 1
    return np.moveaxis(value, axis, -1).reshape(-1, value.shape[axis])
