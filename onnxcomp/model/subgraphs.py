"""Layers inside If / Loop / Scan bodies: where a body sits, and how calibration reads its values.

A real export may hold its layers in a control-flow body: a voice-activity model keeps one copy of
its network in each branch of an ``If`` on the sample rate, a decoder runs its step in a ``Loop``.
A body is reached from the main graph by a path of :class:`Scope` steps (the node that owns it and
the attribute it is in); a layer records its path, and the rewrite edits it in its own body.

onnxruntime returns graph outputs only, and a body's values are not graph outputs. To measure a
layer input inside a body, :func:`lift` carries it out of the instrumented model's bodies one level
at a time:

- out of an ``If`` branch as a new output of the ``If``; the other branch gives an empty tensor in
  that slot, so a batch whose samples took the other branch reads as "not seen" (size 0);
- out of a ``Loop`` or ``Scan`` body as a new scan output: the value of every iteration stacked
  on a new leading axis (one per such level), which calibration merges into the rows.

Only the instrumented copy changes; the working model and the compressed one keep their bodies.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import onnx
from onnx import helper

LIFT_PREFIX = "onnxcomp_lift"  # names of the nodes and tensors lift() adds
CONTROL_FLOW = ("If", "Loop", "Scan")


@dataclass(frozen=True)
class Scope:
    """One step into a body: the body in attribute ``attribute`` of the node whose first output is
    ``owner`` (output names are unique in a model; node names need not be)."""

    owner: str
    attribute: str
    op_type: str
    node_name: str = ""

    def describe(self) -> str:
        return f"{self.op_type} {self.node_name or self.owner!r} {self.attribute}"


def describe(scope: tuple[Scope, ...]) -> str:
    """Where a body sits, outermost first: "If 'If_0' then_branch > Loop 'loop' body"."""
    return " > ".join(step.describe() for step in scope)


def bodies(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """(attribute name, body) of each subgraph a node holds."""
    for attribute in node.attribute:
        if attribute.HasField("g"):
            yield attribute.name, attribute.g
        for body in attribute.graphs:
            yield attribute.name, body


def walk_graphs(graph: onnx.GraphProto, scope: tuple[Scope, ...] = ()) -> Iterator[tuple[tuple[Scope, ...], onnx.GraphProto]]:
    """The graph and every body inside it, each with its path, outer graphs first."""
    yield scope, graph
    for node in graph.node:
        for attribute, body in bodies(node):
            step = Scope(node.output[0] if node.output else "", attribute, node.op_type, node.name)
            yield from walk_graphs(body, (*scope, step))


def stacked_levels(scope: tuple[Scope, ...]) -> int:
    """Leading axes a lifted value gains: one per Loop or Scan it is carried out of."""
    return sum(step.op_type in ("Loop", "Scan") for step in scope)


def why_not_liftable(scope: tuple[Scope, ...], opset: int) -> str | None:
    """Why a body's values cannot be carried out (None: they can)."""
    for step in scope:
        if step.op_type not in CONTROL_FLOW:
            return f"inside a body of {step.describe()} (a {step.op_type} body is not read by calibration)"
        if step.op_type == "Scan" and opset < 9:
            return f"inside {step.describe()} (Scan before opset 9 batches its scans: not read by calibration)"
    return None


def lift(model: onnx.ModelProto, values: list[tuple[str, tuple[Scope, ...], int]]) -> list[str]:
    """Make each body value a graph output of ``model`` (changed in place). ``values``: (name, the
    path of the body that computes or reads it, its ONNX element type). Returns, for each, the graph
    output that carries it."""
    graphs = dict(walk_graphs(model.graph))
    carried = []
    for number, (name, scope, elem_type) in enumerate(values):
        current = name
        for depth in range(len(scope), 0, -1):
            current = _lift_one_level(graphs, scope[:depth], current, elem_type, f"{LIFT_PREFIX}/{number}/{depth}")
        model.graph.output.append(helper.make_tensor_value_info(current, elem_type, None))
        carried.append(current)
    return carried


def _lift_one_level(graphs: dict, scope: tuple[Scope, ...], name: str, elem_type: int, base: str) -> str:
    """``name``, computed (or read) in the body at ``scope``, as an output of the body's owner node
    in the enclosing graph; returns that output's name."""
    step, body, outer = scope[-1], graphs[scope], graphs[scope[:-1]]
    owner = next(node for node in outer.node if node.output and node.output[0] == step.owner)
    inner = f"{base}/inner"
    # An Identity, so that the body output is a value of the body even where the layer reads an
    # outer or formal input directly (an If branch must still say whether it ran).
    body.node.append(helper.make_node("Identity", [name], [inner], name=f"{base}/identity"))
    body.output.append(helper.make_tensor_value_info(inner, elem_type, None))
    if step.op_type == "If":
        other = "else_branch" if step.attribute == "then_branch" else "then_branch"
        absent = graphs[(*scope[:-1], Scope(step.owner, other, step.op_type, step.node_name))]
        empty = helper.make_tensor(f"{base}/absent_value", elem_type, [0], [])
        absent.node.append(helper.make_node("Constant", [], [f"{base}/absent"], name=f"{base}/absent", value=empty))
        absent.output.append(helper.make_tensor_value_info(f"{base}/absent", elem_type, None))
    elif step.op_type == "Scan":  # a new scan output: stacked on axis 0, first iteration first
        for attribute in owner.attribute:
            if attribute.name in ("scan_output_axes", "scan_output_directions"):
                attribute.ints.append(0)
    outer_name = f"{base}/out"
    owner.output.append(outer_name)
    return outer_name
