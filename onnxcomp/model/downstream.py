"""Which model outputs a set of tensors can reach through the graph.

An output that no compressible layer feeds (an echo of ``input_ids``, a mask passed through,
a shape) is the same in every compressed model: counted in the fidelity, its zero error would
only dilute the error of the outputs that do change.
"""

from __future__ import annotations

import onnx


def outputs_reached(model: onnx.ModelProto, tensors) -> set[str]:
    """The graph outputs that depend on any of ``tensors``. A graph with control flow (If, Loop,
    Scan: subgraphs read outer tensors by name) counts every output as reached."""
    graph = model.graph
    if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in graph.node for attr in node.attribute):
        return {o.name for o in graph.output}
    reached = set(tensors)
    for node in graph.node:  # ONNX graphs are topologically sorted
        if any(name in reached for name in node.input):
            reached.update(name for name in node.output if name)
    return {o.name for o in graph.output if o.name in reached}
