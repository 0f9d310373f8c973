"""Whole-model parameter and multiply-add counts."""

from __future__ import annotations

import numpy as np
import onnx

from .constants import TARGET_OPS, constant_node_value
from .layers import node_attributes
from .shapes import NOT_RUN, infer_shapes, runtime_shapes, static_product, with_input_shapes
from .subgraphs import walk_graphs


def count_params(model: onnx.ModelProto) -> int:
    """Float weights of the model: initializers and Constant-node tensors, those of If/Loop/Scan
    bodies too."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    inputs = {i.name for i in model.graph.input}
    total = 0
    for _, graph in walk_graphs(model.graph):
        total += sum(int(np.prod(t.dims)) for t in graph.initializer if t.data_type in floats and t.name not in inputs)
        for node in graph.node:
            if node.op_type == "Constant":  # Identity copies are not counted again
                value = constant_node_value(node)
                if value is not None and value.dtype.kind == "f":
                    total += value.size
    return int(total)


def count_macs(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None,
               feed: dict | None = None) -> int | None:
    """Multiply-adds per sample of every Conv, ConvTranspose, Gemm and MatMul (None if a shape is unknown).
    Those inside If/Loop/Scan bodies count as if each body ran once: both branches of an If, one
    iteration of a Loop (which branch and how many iterations depend on the data).

    The first dimension of every tensor is taken as the batch: pass input
    shapes with batch 1 (or any batch: the count is per sample). Where ONNX
    shape inference cannot follow the graph (a Reshape whose target is
    computed at run time, common in opset <= 12 exports) and a ``feed`` of one
    sample is given, the missing shapes are measured by running it once.
    """
    shapes = infer_shapes(with_input_shapes(model, input_shapes or {}))
    if feed is not None and _macs_from(model, shapes) is None:
        shapes.update(runtime_shapes(model, feed))
    return _macs_from(model, shapes)


def _macs_from(model: onnx.ModelProto, shapes) -> int | None:
    total = 0
    for node in _all_nodes(model.graph):
        if node.op_type not in TARGET_OPS:
            continue
        macs = _node_macs(node, shapes)
        if macs is None:
            return None
        total += macs
    return total


def _node_macs(node: onnx.NodeProto, shapes) -> int | None:
    out = shapes.get(node.output[0])
    if out is NOT_RUN:  # in a body that the sample did not run (the other branch of an If)
        return 0
    if node.op_type == "Conv":
        weight = shapes.get(node.input[1])
        per_output = static_product(weight[1:]) if weight else None
        outputs = static_product(out[1:]) if out else None
        return None if per_output is None or outputs is None else per_output * outputs
    if node.op_type == "ConvTranspose":
        return _conv_transpose_macs(node, shapes)
    a = shapes.get(node.input[0])
    if not a or not out:
        return None
    if node.op_type == "Gemm":
        k = a[0] if node_attributes(node).get("transA", 0) else a[-1]
        n = out[-1]
        return k * n if isinstance(k, int) and isinstance(n, int) else None
    outputs = static_product(out[1:]) if len(out) > 1 else static_product(out)
    k = a[-1]
    return None if outputs is None or not isinstance(k, int) else outputs * k


def _conv_transpose_macs(node: onnx.NodeProto, shapes) -> int | None:
    """Every input pixel meets every weight of its group: C_in * C_out/group * kh * kw per input pixel."""
    weight, x = shapes.get(node.input[1]), shapes.get(node.input[0])
    per_pixel = static_product(weight) if weight else None
    pixels = static_product(x[2:]) if x and len(x) > 2 else None
    return None if per_pixel is None or pixels is None else per_pixel * pixels


# A rewritten layer's chain is at most this many nodes (CP 4way: four convs, a MatMul's bias Add: three).
MAX_CHAIN = 6


def chain_nodes(model: onnx.ModelProto, input_name: str, output_name: str, producers: dict | None = None) -> list:
    """The nodes computing ``output_name`` from ``input_name`` along their first inputs, first to last:
    a target layer's own node in the original model, its chain after a rewrite ([] when the walk
    does not reach ``input_name`` within :data:`MAX_CHAIN` nodes: not a chain onnxcomp wrote)."""
    producers = producers if producers is not None else {o: n for n in _all_nodes(model.graph) for o in n.output}
    nodes, tensor = [], output_name
    while len(nodes) < MAX_CHAIN:
        node = producers.get(tensor)
        if node is None or not node.input:
            return []
        nodes.append(node)
        if node.input[0] == input_name:
            return nodes[::-1]
        tensor = node.input[0]
    return []


def layer_macs(model: onnx.ModelProto, layers, input_shapes: dict[str, list[int]] | None = None,
               feed: dict | None = None) -> dict[str, int | None]:
    """Multiply-adds per sample of each target layer *as computed in* ``model``: the layer's node in
    its original, the nodes of its chain in a rewritten model (layer name -> MACs; None: unknown,
    or the layer's output is not computed from its input by a chain there)."""
    shapes = infer_shapes(with_input_shapes(model, input_shapes or {}))
    producers = {o: n for n in _all_nodes(model.graph) for o in n.output}
    chains = {layer.name: chain_nodes(model, layer.input, layer.output, producers) for layer in layers}
    if feed is not None and any(_node_macs(n, shapes) is None for nodes in chains.values() for n in nodes
                                if n.op_type in TARGET_OPS):
        shapes.update(runtime_shapes(model, feed))
    out = {}
    for name, nodes in chains.items():
        counts = [_node_macs(n, shapes) if n.op_type in TARGET_OPS else 0 for n in nodes]
        out[name] = sum(counts) if nodes and None not in counts else None
    return out


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes of the graph and of every body in it."""
    return [node for _, body in walk_graphs(graph) for node in body.node]
