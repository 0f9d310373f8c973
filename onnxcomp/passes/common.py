"""Graph editing shared by the rewrites, on onnx-graphsurgeon.

The recipe of onnx-graphsurgeon's examples: find the node, build the new
chain with ``graph.layer``, let the chain produce the node's old output tensor
(so every consumer and graph output keeps its name), detach the old node, then
``cleanup().toposort()``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..model.denormals import flush_subnormals
from ..model.opsets import onnx_opset
from ..model.subgraphs import walk_graphs


class GraphEditor:
    """One onnx-graphsurgeon graph being rewritten layer by layer."""

    def __init__(self, model: onnx.ModelProto):
        self.original = model
        # Imported from a copy: onnx-graphsurgeon's export writes into the TensorProtos it imported
        # (a Constant node's tensor gets its name set), which changed the caller's model and its
        # fingerprint, so its statistics were refused by the next compress.
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        self.graph = gs.import_onnx(copy)
        # Nodes by (body path, first output): a layer inside an If/Loop/Scan body is edited in its body.
        self._by_output: dict[tuple, gs.Node] = {}
        self._graph_of: dict[int, gs.Graph] = {}
        self._names: set[str] = set()
        for path, graph in _gs_graphs(self.graph):
            for n in graph.nodes:
                if n.outputs:
                    self._by_output[path, n.outputs[0].name] = n
                self._graph_of[id(n)] = graph
            self._names |= set(graph.tensors()) | {n.name for n in graph.nodes}
        self.flushed = 0  # subnormal values written as 0 by :meth:`constant`

    @property
    def opset(self) -> int:
        """The model's ai.onnx opset version (what the ops it writes must conform to)."""
        return onnx_opset(self.original)

    def node_of(self, layer) -> gs.Node:
        """The node of a target layer (found by its output, in its own body)."""
        return self._by_output[tuple((step.owner, step.attribute) for step in layer.scope), layer.output]

    def graph_of(self, node: gs.Node) -> gs.Graph:
        """The graph (the main graph, or a body) that holds ``node``."""
        return self._graph_of[id(node)]

    def unique(self, base: str) -> str:
        """``base``, or ``base_1``, ``base_2``...: new names are deterministic and never clash."""
        name, k = base, 0
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def constant(self, base: str, array: np.ndarray, dtype) -> gs.Constant:
        """A new weight tensor in the model's ``dtype``: every factor, bias and folded constant the
        rewrites write is made here. Values that are subnormal *in that dtype* are written as 0
        (factors fitted in float64 inherit near-zero components of dead channels, and many CPUs
        compute with subnormal operands through a slow path: see :mod:`onnxcomp.model.denormals`)."""
        value, flushed = flush_subnormals(np.ascontiguousarray(array, dtype=dtype))
        self.flushed += flushed
        return gs.Constant(self.unique(base), value)

    def chain(self, node: gs.Node, steps: list[tuple[str, list, dict]]) -> None:
        """Replace ``node`` by ``steps`` run one after the other.

        Each step is ``(op, extra_inputs, attrs)``: its first input is the
        previous step's output (the node's activation input for the first).
        The last step writes the node's original output tensor.
        """
        current = node.inputs[0]
        final = node.outputs[0]
        base = node.name or final.name
        graph = self.graph_of(node)
        for index, (op, extra, attrs) in enumerate(steps):
            last = index == len(steps) - 1
            out = final if last else gs.Variable(self.unique(f"{base}/lowrank_{index}"), dtype=final.dtype)
            graph.layer(
                op=op, name=self.unique(f"{base}/{op.lower()}_{index}"),
                inputs=[current, *extra], outputs=[out], attrs=attrs,
            )
            current = out
        node.outputs.clear()
        node.inputs.clear()

    def export(self) -> onnx.ModelProto:
        """The edited model, with the original's IR version, opsets and metadata."""
        self.graph.cleanup().toposort()
        model = gs.export_onnx(self.graph, do_type_check=True)
        original = self.original
        model.ir_version = original.ir_version
        del model.opset_import[:]
        model.opset_import.extend(original.opset_import)
        for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
            setattr(model, field, getattr(original, field))
        del model.metadata_props[:]
        model.metadata_props.extend(original.metadata_props)
        _hoist_outer_initializers(model, original)
        return model


def _hoist_outer_initializers(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """The main graph's initializers back where they were: onnx-graphsurgeon's export writes a copy
    of each into every subgraph that reads it (both branches of an If: the weights twice over)."""
    outer = {t.name for t in original.graph.initializer}
    moved: dict[str, onnx.TensorProto] = {}
    for scope, body in walk_graphs(model.graph):
        if not scope:
            continue
        kept = []
        for tensor in body.initializer:
            (moved.setdefault(tensor.name, tensor) if tensor.name in outer else kept.append(tensor))
        if len(kept) < len(body.initializer):
            taken = [onnx.TensorProto() for _ in kept]
            for copy, tensor in zip(taken, kept):
                copy.CopyFrom(tensor)
            del body.initializer[:]
            body.initializer.extend(taken)
    present = {t.name for t in model.graph.initializer}
    model.graph.initializer.extend(t for name, t in moved.items() if name not in present)


def _gs_graphs(graph: gs.Graph, path: tuple = ()):
    """(body path, graph) of the graph and of every body in it; a path step is (the owner node's
    first output, the attribute), as :class:`~onnxcomp.model.subgraphs.Scope` has them."""
    yield path, graph
    for node in graph.nodes:
        for attribute, value in node.attrs.items():
            for body in value if isinstance(value, list) else [value]:
                if isinstance(body, gs.Graph):
                    yield from _gs_graphs(body, (*path, (node.outputs[0].name if node.outputs else "", attribute)))



def grouped_steps(chains: list[list[tuple[str, np.ndarray, dict]]]) -> list[tuple[str, np.ndarray, dict]]:
    """One chain of Convs from each group's own (the same steps, of the same shapes, in every group):
    each step's weights stacked on the output axis and its ``group`` times the number of groups, so
    the step is one grouped Conv whose group g computes group g's step. Steps are (weight name,
    weight, attributes); one chain is returned as it is."""
    if len(chains) == 1:
        return chains[0]
    steps = []
    for step in zip(*chains):
        name, _, attrs = step[0]
        stacked = np.concatenate([weight for _, weight, _ in step])
        steps.append((name, stacked, {**attrs, "group": len(chains) * attrs.get("group", 1)}))
    return steps


def write_conv_chain(editor: GraphEditor, layer, steps: list[tuple[str, np.ndarray, dict]], bias, dtype) -> None:
    """Replace the node of ``layer`` by one Conv per step (weight name, weight, attributes), the
    (corrected) bias on the last one."""
    inputs = [[editor.constant(f"{layer.name}/{name}", weight, dtype)] for name, weight, _ in steps]
    if bias is not None:
        inputs[-1].append(editor.constant(f"{layer.name}/bias", bias, dtype))
    editor.chain(editor.node_of(layer), [("Conv", extra, attrs) for extra, (_, _, attrs) in zip(inputs, steps)])


def pointwise_weight(matrix: np.ndarray, spatial_dims: int) -> np.ndarray:
    """A (C_out, C_in) matrix as the weight of a 1x1 conv (1 for Conv1d, 1x1x1 for Conv3d)."""
    return matrix.reshape(*matrix.shape, *(1,) * spatial_dims)


def constant_value(tensor) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output, else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    producers = list(tensor.inputs)
    if len(producers) == 1 and producers[0].op == "Constant":
        value = producers[0].attrs.get("value")
        return value.values if isinstance(value, gs.Constant) else None
    return None
