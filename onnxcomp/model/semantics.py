"""What each model output means, read from the graph: its channel axis and its kind.

The channel axis is the axis that carries a producing layer's features: a Conv's axis 1 or a
MatMul/Gemm's last axis, followed through layout ops (Reshape, Transpose, Concat, Split, Flatten,
Squeeze, Unsqueeze) and element-wise ops. Rank alone cannot tell a YOLOv8 head [N, 4 + classes,
anchors] (channels on axis 1) from a PicoDet head [N, anchors, C] or an encoder's [N, seq, F]
(channels last); the graph can. A Reshape is followed by static shapes: the output axis of the same
size with the same product of the dims before it (or after it, when the batch is symbolic).

The kind says how an output is judged (:mod:`onnxcomp.metrics`):

- ``distribution``: a Softmax / LogSoftmax over the channel axis (``log``: LogSoftmax);
- ``scores``: a Sigmoid: independent scores per channel;
- ``embedding``: L2-normalised along the channel axis (LpNormalization, x / ReduceL2(x),
  x / Sqrt(ReduceSumSquare(x)));
- ``labels``: an integer output (ArgMax, TopK's indices);
- ``values``: anything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .constants import constant_tensors
from .opsets import onnx_opset
from .shapes import infer_shapes

KINDS = ("distribution", "scores", "embedding", "labels", "values")

# Ops whose output has the input's shape (or a broadcast of it) and keeps its channel axis; the
# output is plain values again (an affine map of probabilities is no longer a distribution).
ELEMENTWISE = {
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Tanh", "HardSigmoid", "HardSwish", "Mish",
    "Softplus", "Softsign", "Gelu", "Erf", "Clip", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal",
    "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min",
    "Mean", "Sum", "Where", "BatchNormalization", "InstanceNormalization", "LayerNormalization",
    "Resize", "Upsample", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Pad",
    "Slice", "Expand", "Tile", "ThresholdedRelu", "Shrink",
}
# Ops that pass their input through unchanged in value (the kind survives them).
PASS_THROUGH = {"Identity", "Dropout", "Cast", "CastLike"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"}


@dataclass(frozen=True)
class OutputSemantics:
    """One graph output: its channel axis (None: unknown from the graph), its kind, and the nodes
    that tell (the producing layer, the Softmax, ...), nearest the output last."""

    name: str
    axis: int | None
    kind: str = "values"
    log: bool = False  # a distribution given as log-probabilities (LogSoftmax)
    evidence: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "axis": self.axis, "log": self.log,
                "evidence": list(self.evidence)}

    def line(self) -> str:
        kind = f"{self.kind} (log)" if self.log else self.kind
        axis = "?" if self.axis is None else str(self.axis)
        return f"output {self.name}: {kind}, channel axis {axis}, from {', '.join(self.evidence) or '-'}"


@dataclass(frozen=True)
class _Trace:
    """What is known of one tensor: its channel axis, kind and the nodes that told."""

    axis: int | None
    kind: str = "values"
    log: bool = False
    evidence: tuple[str, ...] = field(default=())

    def moved(self, axis: int | None, node: onnx.NodeProto | None = None, keep_kind: bool = True) -> "_Trace":
        evidence = self.evidence if node is None else self.evidence + (_label(node),)
        kind, log = (self.kind, self.log) if keep_kind else ("values", False)
        return _Trace(axis, kind if axis is not None or kind == "labels" else "values", log, evidence[-4:])


def output_semantics(model: onnx.ModelProto) -> dict[str, OutputSemantics]:
    """Per graph output name, what it means (every output has an entry)."""
    graph = model.graph
    shapes = infer_shapes(model)
    constants = constant_tensors(graph)
    opset = onnx_opset(model, default=13)
    producers = {name: node for node in graph.node for name in node.output}
    traces: dict[str, _Trace] = {}
    for node in graph.node:  # ONNX graphs are topologically sorted
        for name, trace in _node_traces(node, traces, shapes, constants, opset, producers).items():
            if name and trace is not None:
                traces[name] = trace
    result = {}
    for output in graph.output:
        trace = traces.get(output.name, _Trace(None))
        if _integer(output) and trace.kind != "labels":
            trace = _Trace(None, "labels", False, trace.evidence)
        result[output.name] = OutputSemantics(output.name, trace.axis, trace.kind, trace.log, trace.evidence)
    return result


def _node_traces(node, traces, shapes, constants, opset, producers) -> dict:
    """The traces of ``node``'s outputs from those of its inputs."""
    op, out = node.op_type, node.output[0] if node.output else ""
    rank = _rank(shapes, out)
    if op == "Conv" or op == "ConvTranspose":
        return {out: _Trace(1, "values", False, (_label(node),))}
    if op in ("MatMul", "Gemm", "MatMulInteger", "FusedMatMul"):
        return {out: _Trace(-1 if rank is None else rank - 1, "values", False, (_label(node),))}
    if op in ("ArgMax", "ArgMin"):
        return {out: _Trace(None, "labels", False, (_label(node),))}
    if op == "TopK":
        source = _input_trace(node, traces, 0)
        values = None if source is None else source.moved(source.axis, node, keep_kind=False)
        return {out: values, node.output[1] if len(node.output) > 1 else "": _Trace(None, "labels", False,
                                                                                    (_label(node),))}
    inputs = [_input_trace(node, traces, i) for i in range(len(node.input))]
    source = next((t for t in inputs if t is not None and t.axis is not None), None)
    if op in ("Softmax", "LogSoftmax"):
        return {out: _softmax(node, source, rank, opset, shapes)}
    if op == "LpNormalization":
        axis = _normalised(_attr(node, "axis", -1), rank)
        return {out: _Trace(axis, "embedding" if _attr(node, "p", 2) == 2 else "values", False,
                            _evidence(source, node))}
    if op == "Div" and _l2_norm_of(node, producers, constants) is not None:
        axis = _l2_norm_of(node, producers, constants)
        axis = (source.axis if source is not None else None) if axis == "channel" else _normalised(axis, rank)
        return {out: _Trace(axis, "embedding", False, _evidence(source, node))}
    if source is None:
        return {}
    if op == "Sigmoid":
        return {out: _Trace(source.axis, "scores", False, _evidence(source, node))}
    if op in PASS_THROUGH:
        return {name: source.moved(source.axis) for name in node.output}
    if op in ELEMENTWISE:
        shift = 0 if rank is None or _rank(shapes, _traced_input(node, traces)) is None else (
            rank - _rank(shapes, _traced_input(node, traces)))
        return {out: source.moved(source.axis + shift if source.axis >= 0 else source.axis, keep_kind=False)}
    if op == "Transpose":
        return {out: _transpose(node, source, shapes)}
    if op == "Concat":
        return {out: _concat(node, inputs)}
    if op == "Split":
        return {name: source.moved(source.axis) for name in node.output}
    if op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
        return {out: _reshaped(node, source, shapes, _traced_input(node, traces))}
    if op in REDUCE:
        return {out: _reduced(node, source, shapes, constants)}
    return {}


def _reduced(node, source, shapes, constants) -> _Trace | None:
    """A reduction over other axes (mean pooling over tokens) keeps the channel axis, shifted left
    past the reduced axes unless ``keepdims``; reducing the channel axis itself loses it."""
    rank = _rank(shapes, node.input[0])
    if rank is None:
        return source.moved(None, node)
    axes = _axes(node, constants)
    axes = set(range(rank)) if axes is None else {a % rank for a in axes}
    axis = source.axis % rank
    if axis in axes:
        return source.moved(None, node)
    return source.moved(axis if _attr(node, "keepdims", 1) else axis - sum(a < axis for a in axes), node,
                        keep_kind=False)


def _axes(node, constants) -> list | None:
    """The ``axes`` of a reduction or Squeeze (attribute before opset 13/18, input after); None: all."""
    axes = _attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1] in constants:
        axes = constants[node.input[1]].ravel().tolist()
    return None if axes is None or len(axes) == 0 else [int(a) for a in axes]


def _softmax(node, source, rank, opset, shapes) -> _Trace | None:
    """A Softmax is a distribution over its axis; before opset 13 it normalises over every axis from
    ``axis`` on, which is one axis only when the later ones are 1."""
    axis = _normalised(_attr(node, "axis", -1 if opset >= 13 else 1), rank)
    log = node.op_type == "LogSoftmax"
    dims = shapes.get(node.output[0])
    if axis is None:
        return _Trace(None, "values", False, _evidence(source, node))
    if opset < 13 and (rank is None or axis != rank - 1) and (dims is None or any(d != 1 for d in dims[axis + 1:])):
        return _Trace(axis, "values", False, _evidence(source, node))  # a joint distribution over several axes
    return _Trace(axis, "distribution", log, _evidence(source, node))


def _transpose(node, source, shapes) -> _Trace | None:
    rank = _rank(shapes, node.input[0])
    perm = list(_attr(node, "perm", []) or ([] if rank is None else list(range(rank))[::-1]))
    axis = source.axis if source.axis >= 0 or rank is None else source.axis % rank
    if axis < 0 or axis not in perm:
        return source.moved(None, node)
    return source.moved(perm.index(axis), node)


def _concat(node, inputs) -> _Trace | None:
    """Inputs that agree on the channel axis keep it (whichever axis they are joined on); the kind
    survives when all inputs share it (class scores joined with box values are plain values)."""
    traced = [t for t in inputs if t is not None and t.axis is not None]
    if not traced or len({t.axis for t in traced}) != 1:
        return None
    same_kind = len(traced) == len(inputs) and len({(t.kind, t.log) for t in traced}) == 1
    evidence = tuple(dict.fromkeys(e for t in traced for e in t.evidence))[-3:] + (_label(node),)
    return _Trace(traced[0].axis, traced[0].kind if same_kind else "values",
                  traced[0].log if same_kind else False, evidence)


def _reshaped(node, source, shapes, input_name) -> _Trace | None:
    """The output axis of the channel axis' size with the same product of dims before it (or,
    with a symbolic batch, after it); None when the static shapes cannot tell."""
    before, after = shapes.get(input_name), shapes.get(node.output[0])
    if before is None or after is None or source.axis is None:
        return source.moved(None, node)
    axis = source.axis % len(before) if before else None
    if axis is None or not isinstance(before[axis], int):
        return source.moved(None, node)
    leading, trailing = _product(before[:axis]), _product(before[axis + 1:])
    for candidate, size in enumerate(after):
        if size == before[axis] and (_product(after[:candidate]) == leading
                                     or _product(after[candidate + 1:]) == trailing):
            return source.moved(candidate, node)
    return source.moved(None, node)


def _l2_norm_of(node, producers, constants):
    """For ``x / n``: the axis ``n`` is the L2 norm of ``x`` over ("channel": the reduction's axes
    are not known statically), or None when ``n`` is not such a norm."""
    if len(node.input) < 2:
        return None
    numerator = _through(node.input[0], producers, PASS_THROUGH)
    norm = producers.get(_through(node.input[1], producers, {"Clip", "Max", "Add", "Expand", *PASS_THROUGH}))
    if norm is not None and norm.op_type == "Sqrt":
        inner = producers.get(_through(norm.input[0], producers, {"Clip", "Max", "Add", *PASS_THROUGH}))
        norm = inner if inner is not None and inner.op_type == "ReduceSumSquare" else None
    if norm is None or norm.op_type not in ("ReduceL2", "ReduceSumSquare"):
        return None
    if _through(norm.input[0], producers, PASS_THROUGH) != numerator:
        return None
    axes = _axes(norm, constants)
    return axes[0] if axes is not None and len(axes) == 1 else "channel"


def _through(name: str, producers: dict, ops: set) -> str:
    """The tensor behind ``name`` past any chain of ``ops`` (first input of each)."""
    node = producers.get(name)
    while node is not None and node.op_type in ops and node.input:
        name = node.input[0]
        node = producers.get(name)
    return name


def _input_trace(node, traces, index) -> _Trace | None:
    return traces.get(node.input[index]) if index < len(node.input) else None


def _traced_input(node, traces) -> str:
    return next((name for name in node.input if name in traces and traces[name].axis is not None), node.input[0])


def _evidence(source, node) -> tuple[str, ...]:
    return ((source.evidence if source is not None else ()) + (_label(node),))[-4:]


def _label(node) -> str:
    return f"{node.name or node.output[0]} ({node.op_type})"


def _attr(node, name, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _normalised(axis, rank):
    if axis is None:
        return None
    return axis % rank if rank else (axis if axis >= 0 else None)


def _rank(shapes, name) -> int | None:
    dims = shapes.get(name)
    return None if dims is None else len(dims)


def _product(dims) -> tuple:
    """The product of ``dims`` as (integer part, sorted symbolic names); unknown dims never match."""
    known, symbols = 1, []
    for d in dims:
        if isinstance(d, int):
            known *= d
        elif d:
            symbols.append(d)
        else:
            return (None, id(dims))
    return (known, tuple(sorted(symbols)))


def _integer(output: onnx.ValueInfoProto) -> bool:
    elem = output.type.tensor_type.elem_type if output.type.HasField("tensor_type") else 0
    return elem != 0 and np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(elem), np.integer)
