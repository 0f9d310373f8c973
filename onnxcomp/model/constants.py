"""Tensors whose values are known without running the model."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

# The ops whose constant weights onnxcomp compresses (a ConvTranspose as a Conv: model/transposed.py).
TARGET_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def constant_tensors(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every tensor of the graph whose value is known without running it.

    Initializers (that are not also graph inputs, which a user may override),
    outputs of ``Constant`` nodes, and ``Identity`` of either.
    """
    inputs = {i.name for i in graph.input}
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name not in inputs}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = constant_node_value(node)
            if value is not None:
                values[node.output[0]] = value
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None
