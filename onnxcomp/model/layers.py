"""The layers we can compress, found in a model.

A *target layer* is a Conv, ConvTranspose, Gemm or MatMul whose weight is a constant (an
initializer, a ``Constant`` node, or either behind ``Identity`` nodes). Each one
is described by a :class:`TargetLayer`: the layer as ``y = W x + b`` on one
input row ``x`` (a Gemm/MatMul row, or an im2col patch of a Conv ordered
``(c, i, j)`` like ``W.reshape(C_out, -1)``), plus what the calibration needs to
rebuild ``x`` and what the rewrite needs to rebuild the node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx

from ..errors import OnnxcompError
from .constants import TARGET_OPS, constant_tensors
from .opsets import onnx_opset
from .prepare import quantized_weights
from .shapes import infer_shapes, static_product, with_input_shapes
from .subgraphs import Scope, describe, stacked_levels, walk_graphs, why_not_liftable

if TYPE_CHECKING:
    from .transposed import TransposedGeometry


@dataclass
class ConvGeometry:
    """How a Conv turns its input into patches (everything im2col needs), in any number of
    spatial dims: ``kernel``, ``strides`` and ``dilations`` per axis, ``pads`` as ONNX orders them
    (every axis's begin, then every axis's end; for 2-D top, left, bottom, right)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...] = ()  # () : 1 on every axis
    dilations: tuple[int, ...] = ()  # () : 1 on every axis
    pads: tuple[int, ...] = ()  # () : no padding
    auto_pad: str = "NOTSET"

    def __post_init__(self):
        rank = len(self.kernel)
        self.kernel = tuple(int(k) for k in self.kernel)
        self.strides = tuple(self.strides) or (1,) * rank
        self.dilations = tuple(self.dilations) or (1,) * rank
        self.pads = tuple(self.pads) or (0,) * (2 * rank)

    @property
    def rank(self) -> int:
        """Spatial dims: 1 for Conv1d, 2 for Conv2d, 3 for Conv3d."""
        return len(self.kernel)

    def resolve_pads(self, *sizes: int) -> tuple[int, ...]:
        """Explicit pads (every axis's begin, then every end) for an input of these spatial sizes."""
        if self.auto_pad in ("NOTSET", "VALID"):
            return self.pads if self.auto_pad == "NOTSET" else (0,) * (2 * self.rank)
        begin, end = [], []
        for size, k, s, d in zip(sizes, self.kernel, self.strides, self.dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            # SAME_UPPER puts the extra pad at the end, SAME_LOWER at the beginning.
            first, last = (small, large) if self.auto_pad == "SAME_UPPER" else (large, small)
            begin.append(first)
            end.append(last)
        return (*begin, *end)

    def output_size(self, *sizes: int) -> tuple[int, ...]:
        pads = self.resolve_pads(*sizes)
        return tuple((size + lo + hi - d * (k - 1) - 1) // s + 1 for size, lo, hi, k, s, d in zip(
            sizes, pads[: self.rank], pads[self.rank :], self.kernel, self.strides, self.dilations))

    def key(self) -> str:
        pads = self.auto_pad if self.auto_pad != "NOTSET" else ",".join(map(str, self.pads))
        def joined(values):
            return "x".join(map(str, values))
        return f"k{joined(self.kernel)} s{joined(self.strides)} d{joined(self.dilations)} p{pads}"


@dataclass
class TargetLayer:
    """One compressible layer, seen as ``y = W x + b`` on one input row ``x``."""

    name: str  # node name, or "<op>_<index>" for unnamed nodes
    op_type: str  # "Conv", "Gemm" or "MatMul"
    node_index: int
    input: str  # the activation tensor the layer reads
    output: str  # the node's (unique) output tensor: how passes find the node again
    weight: np.ndarray  # W as a matrix, (out_features, in_features), original dtype
    bias: np.ndarray | None  # per-output bias (Conv B, Gemm beta*C as a vector), or None
    conv: ConvGeometry | None = None  # for Conv
    trans_a: bool = False  # Gemm transA: the rows x are the columns of A
    positions: int | None = None  # rows per sample (output pixels, tokens); None if unknown
    attrs: dict = field(default_factory=dict)  # the node's original attributes
    # ConvTranspose: how its input is zero-stuffed into the input of ``conv`` (model/transposed.py)
    transposed: TransposedGeometry | None = None
    groups: int = 1  # a grouped Conv's group: output block g reads input channel block g only
    scope: tuple[Scope, ...] = ()  # the If/Loop/Scan body holding the node, outermost step first; () : the main graph

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def kernel(self) -> tuple[int, ...]:
        return self.conv.kernel if self.conv else (1, 1)

    @property
    def in_channels(self) -> int:
        """Input channels one output reads (a grouped conv's: those of its group)."""
        return self.in_features // int(np.prod(self.kernel))

    @property
    def stats_key(self) -> str:
        """Layers reading the same tensor the same way share one statistic (in a body: those of the
        same body, which runs on its own samples)."""
        where = f"{self.scope[-1].owner}/{self.scope[-1].attribute}::" if self.scope else ""
        if self.transposed is not None:
            return f"{where}{self.input}|convtranspose {self.transposed.key()}|conv {self.conv.key()}"
        if self.conv is not None:
            return f"{where}{self.input}|conv {self.conv.key()}"
        return f"{where}{self.input}|rows{' T' if self.trans_a else ''}"

    @property
    def stats_keys(self) -> tuple[str, ...]:
        """The statistics the layer's problem reads: ``stats_key``, or one per group of a grouped
        conv (each group's patches hold its own input channels only)."""
        if self.groups == 1:
            return (self.stats_key,)
        c = self.in_channels
        return tuple(f"{self.stats_key}|channels {g * c}:{(g + 1) * c}" for g in range(self.groups))

    @property
    def params(self) -> int:
        return int(self.weight.size + (0 if self.bias is None else self.bias.size))

    def macs(self, positions: int | None = None) -> int | None:
        """Multiply-adds per sample; ``positions`` overrides the static count."""
        positions = positions if positions is not None else self.positions
        return None if positions is None else int(self.weight.size) * int(positions)

    @property
    def shape_text(self) -> str:
        if self.conv is not None:
            text = "x".join(map(str, (self.out_features, self.in_channels, *self.kernel)))
            return text if self.groups == 1 else f"{text} g{self.groups}"
        return f"{self.in_features}x{self.out_features}"


@dataclass
class Skipped:
    name: str
    op_type: str
    reason: str


def find_layers(
    model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None
) -> tuple[list[TargetLayer], list[Skipped]]:
    """The compressible layers of a model, and the Conv/Gemm/MatMul nodes that are not (with why);
    layers inside If/Loop/Scan bodies too (each with its body's path, ``TargetLayer.scope``)."""
    shapes = infer_shapes(with_input_shapes(model, input_shapes or {}))
    users = _WeightUsers(model.graph)
    opset = onnx_opset(model)
    layers, skipped = [], []
    outer_constants: dict[tuple, dict] = {}
    for scope, graph in walk_graphs(model.graph):
        # A body reads the constants of the graphs around it by name.
        constants = {**outer_constants.get(scope[:-1], {}), **constant_tensors(graph)} if scope else constant_tensors(graph)
        outer_constants[scope] = constants
        found, refused = _graph_layers(graph, scope, constants, shapes, users, why_not_liftable(scope, opset))
        layers += found
        skipped += refused
    _unique_names(layers)
    return layers, skipped


def _graph_layers(graph, scope, constants, shapes, users, unreadable: str | None):
    """The layers of one graph (a body when ``scope``), and the refused ones; ``unreadable``: why
    calibration cannot read this body (its layers are all refused with it)."""
    why_not_constant = _why_not_constant(graph)
    layers, skipped = [], []
    prefix = f"{scope[-1].owner}/" if scope else ""
    for index, (node, name) in enumerate(zip(graph.node, layer_names(graph, prefix))):
        if node.op_type in UNSUPPORTED_OPS:
            skipped.append(Skipped(name, node.op_type, UNSUPPORTED_OPS[node.op_type]))
        if node.op_type not in TARGET_OPS:
            continue
        if unreadable:
            skipped.append(Skipped(name, node.op_type, f"{unreadable}: not rewritten"))
            continue
        builder = {"Conv": _conv_layer, "ConvTranspose": _conv_transpose_layer, "Gemm": _gemm_layer,
                   "MatMul": _matmul_layer}[node.op_type]
        try:
            users.check_unshared(node)
            layer = builder(node, name, index, constants, shapes)
            if scope and layer.trans_a and stacked_levels(scope):
                raise _NotTarget(f"a Gemm with transA inside {describe(scope)} (its stacked columns are not read)")
            layer.scope = scope
            layers.append(layer)
        except _NotTarget as why:
            weight = node.input[1] if len(node.input) > 1 else ""
            skipped.append(Skipped(name, node.op_type, why_not_constant.get(weight, str(why))))
    return layers, skipped


def layer_names(graph: onnx.GraphProto, prefix: str = "") -> list[str]:
    """Each node's name in reports and ``--skip``: its own, or ``OpType_index`` for an unnamed node
    (``prefix``: a body's owner, ``If_3/``, before it).
    Layers are told apart by name, so a generated name that another node or a tensor already has
    (an unnamed Gemm beside one named ``Gemm_0``), or a name a node shares with an earlier one,
    gets a suffix ``_2``, ``_3``, ... until it is unique."""
    taken = {n.name for n in graph.node if n.name} | {t for n in graph.node for t in (*n.input, *n.output) if t}
    taken |= {t.name for t in graph.initializer} | {v.name for v in (*graph.input, *graph.output)}
    names: list[str] = []
    used: set[str] = set()
    for index, node in enumerate(graph.node):
        name = node.name
        if not name or name in used:
            base = name or f"{prefix}{node.op_type}_{index}"
            name, k = base, 1
            while name in used or name in taken:
                k += 1
                name = f"{base}_{k}"
        used.add(name)
        names.append(name)
    return names


def _unique_names(layers: list[TargetLayer]) -> None:
    """Layer names are keys everywhere (plans, reports, --skip): a name two bodies both use gets
    its body's path as well."""
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer.name] = counts.get(layer.name, 0) + 1
    for layer in layers:
        if counts[layer.name] > 1 and layer.scope:
            layer.name = f"{layer.scope[-1].owner}/{layer.scope[-1].attribute}/{layer.name}"


# Ops that look compressible but are not (yet): listed by inspect and the report, with why.
UNSUPPORTED_OPS: dict[str, str] = {}


def _why_not_constant(graph: onnx.GraphProto) -> dict[str, str]:
    """{weight tensor: why it is not a constant} where the graph says more than "not a constant"."""
    reasons = {name: f"its weight {name!r} is computed through {op}: a quantized model (compress the float "
                     "model, then quantize)" for name, op in quantized_weights(graph).items()}
    initializers = {t.name for t in graph.initializer}
    for info in graph.input:
        if info.name in initializers:
            reasons[info.name] = (f"its weight {info.name!r} is a graph input with a default (kept overridable by "
                                  "--initializer-inputs refuse)")
    return reasons


class _WeightUsers:
    """How many node inputs read each tensor, an ``Identity`` of a tensor counting as its source
    (bodies included: they read the weights of the graphs around them by name)."""

    def __init__(self, graph: onnx.GraphProto):
        nodes = [node for _, body in walk_graphs(graph) for node in body.node]
        self.source = {node.output[0]: node.input[0] for node in nodes if node.op_type == "Identity"}
        self.counts: dict[str, int] = {}
        for node in nodes:
            if node.op_type != "Identity":
                for name in node.input:
                    root = self.root(name)
                    self.counts[root] = self.counts.get(root, 0) + 1

    def root(self, name: str) -> str:
        while name in self.source:
            name = self.source[name]
        return name

    def check_unshared(self, node: onnx.NodeProto) -> None:
        """A weight read by other nodes too would stay in the model beside the new chain (and each
        user would get a chain of its own): compressing it would add parameters, not remove them."""
        weight = self.root(node.input[1])
        others = self.counts.get(weight, 0) - 1
        if others > 0:
            raise _NotTarget(f"its weight {weight!r} is shared with {others} other node input(s): "
                             "compressing one user would duplicate the weight")


class _NotTarget(Exception):
    pass


def node_attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _float_weight(value: np.ndarray | None, what: str) -> np.ndarray:
    if value is None:
        raise _NotTarget(f"{what} is not a constant")
    if value.dtype not in (np.float32, np.float64, np.float16):
        raise _NotTarget(f"{what} has dtype {value.dtype}, not a float type")
    if not np.isfinite(value).all():
        raise _NotTarget(f"{what} holds NaN or Inf values")
    return value


def _conv_layer(node, name, index, constants, shapes) -> TargetLayer:
    attrs = node_attributes(node)
    weight = _float_weight(constants.get(node.input[1]), "weight")
    if not 3 <= weight.ndim <= 5:
        raise _NotTarget(f"{weight.ndim - 2}-D convolution (only 1-D, 2-D and 3-D are supported)")
    groups = int(attrs.get("group", 1))
    c_out, c_in = weight.shape[0], weight.shape[1] * groups
    if groups > 1 and weight.shape[1] == 1 and c_out == c_in:
        raise _NotTarget(f"depthwise convolution (group={groups} = channels): one kernel per channel, "
                         "no channel mode to factor")
    bias = _constant_bias(node, constants)
    rank = weight.ndim - 2
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    geometry = ConvGeometry(
        kernel=weight.shape[2:],
        strides=tuple(attrs.get("strides", [1] * rank)),
        dilations=tuple(attrs.get("dilations", [1] * rank)),
        pads=tuple(attrs.get("pads", [0] * (2 * rank))),
        auto_pad=auto_pad,
    )
    out_shape = shapes.get(node.output[0])
    positions = static_product(out_shape[2:]) if out_shape and len(out_shape) == weight.ndim else None
    return TargetLayer(
        name=name, op_type="Conv", node_index=index, input=node.input[0], output=node.output[0],
        weight=weight.reshape(c_out, -1), bias=bias, conv=geometry, positions=positions, attrs=attrs,
        groups=groups,
    )


def _constant_bias(node, constants) -> np.ndarray | None:
    """A Conv / ConvTranspose bias (input 2): its value, None without one; not a constant: not a target."""
    if len(node.input) <= 2 or not node.input[2]:
        return None
    bias = constants.get(node.input[2])
    if bias is None:
        raise _NotTarget("bias is not a constant")
    return bias


def _conv_transpose_layer(node, name, index, constants, shapes) -> TargetLayer:
    """A ConvTranspose as the plain conv over its zero-stuffed input, with the flipped weight."""
    from .transposed import flip_transpose, transposed_geometry

    attrs = node_attributes(node)
    weight = _float_weight(constants.get(node.input[1]), "weight")
    if weight.ndim != 4:
        raise _NotTarget(f"{weight.ndim - 2}-D ConvTranspose (only 2-D is supported)")
    if attrs.get("group", 1) != 1:
        raise _NotTarget(f"grouped ConvTranspose (group={attrs['group']})")
    bias = _constant_bias(node, constants)
    geometry = transposed_geometry(attrs, tuple(weight.shape[2:]))
    equivalent = flip_transpose(weight)  # (C_out, C_in, kh, kw)
    out_shape = shapes.get(node.output[0])
    # Rows per sample: the output pixels (the equivalent conv's patches, one per output pixel).
    positions = static_product(out_shape[2:]) if out_shape and len(out_shape) == 4 else None
    return TargetLayer(
        name=name, op_type="ConvTranspose", node_index=index, input=node.input[0], output=node.output[0],
        weight=equivalent.reshape(equivalent.shape[0], -1), bias=bias, conv=geometry.equivalent,
        positions=positions, attrs=attrs, transposed=geometry,
    )


def _gemm_layer(node, name, index, constants, shapes) -> TargetLayer:
    attrs = node_attributes(node)
    b = _float_weight(constants.get(node.input[1]), "B")
    if node.input[0] in constants:
        raise _NotTarget("input A is a constant as well")
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    b_matrix = b.T if attrs.get("transB", 0) else b  # (K, N)
    weight = (alpha * b_matrix.T).astype(b.dtype)  # y = alpha * B'^T x
    bias = None
    if len(node.input) > 2 and node.input[2]:
        c = constants.get(node.input[2])
        if c is None:
            raise _NotTarget("C is not a constant")
        n = weight.shape[0]
        if c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1):
            raise _NotTarget(f"C of shape {list(c.shape)} is not a per-output bias")
        bias = (beta * np.broadcast_to(c.reshape(-1), (n,))).astype(c.dtype)
    return TargetLayer(
        name=name, op_type="Gemm", node_index=index, input=node.input[0], output=node.output[0],
        weight=weight, bias=bias, trans_a=bool(attrs.get("transA", 0)), positions=1, attrs=attrs,
    )


def _matmul_layer(node, name, index, constants, shapes) -> TargetLayer:
    b = constants.get(node.input[1])
    if b is None and node.input[0] in constants:
        raise _NotTarget("the constant is the first operand (W @ x): only x @ W is supported")
    if b is None:
        raise _NotTarget("second input is not a constant (activation x activation)")
    b = _float_weight(b, "weight")
    if b.ndim != 2:
        raise _NotTarget(f"constant weight has rank {b.ndim}, not 2")
    if node.input[0] in constants:
        raise _NotTarget("both inputs are constants")
    x_shape = shapes.get(node.input[0])
    positions = None
    if x_shape is not None:
        if len(x_shape) < 2:
            raise _NotTarget("1-D activation")
        positions = static_product(x_shape[1:-1])  # rows per sample: every dim but batch and K
    return TargetLayer(
        name=name, op_type="MatMul", node_index=index, input=node.input[0], output=node.output[0],
        weight=b.T, bias=None, positions=positions, attrs={},
    )


def select_layers(layers: list[TargetLayer], skipped: list[Skipped], skip) -> list[TargetLayer]:
    """The layers left after ``skip`` (node names or op types), or a one-line error when none is left
    or a name in ``skip`` matches nothing (a typo must not compress what the user meant to keep)."""
    _check_skip(skip, layers, skipped)
    chosen = [layer for layer in layers if not any(s in (layer.name, layer.op_type) for s in skip)]
    if not layers:
        raise NothingToCompress(_no_layers_message(layers, skipped))
    if not chosen:
        raise OnnxcompError(_no_layers_message(layers, skipped))
    return chosen


class NothingToCompress(OnnxcompError):
    """The model has no layer that can be compressed (each refused with its reason, or none at all)."""


def _check_skip(skip, layers, skipped) -> None:
    known = {key for layer in layers for key in (layer.name, layer.op_type)} | {s.name for s in skipped}
    unknown = [name for name in skip if name not in known]
    if unknown:
        names = ", ".join(layer.name for layer in layers[:6]) + (", ..." if len(layers) > 6 else "")
        raise OnnxcompError(f"--skip {unknown[0]!r} matches no compressible layer's name or op type "
                            f"(the layers are {names}; see `onnxcomp inspect`)")


def _no_layers_message(layers, skipped) -> str:
    if layers:
        return "every compressible layer was excluded by --skip"
    reasons = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:3])
    return "no compressible layers (Conv/Gemm/MatMul with constant weights) in the model" + (
        f" ({reasons}{'; ...' if len(skipped) > 3 else ''})" if reasons else "")
