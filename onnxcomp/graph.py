"""Model side: load and save ONNX files, find the layers we can compress.

A *target layer* is a Conv, Gemm or MatMul whose weight is a constant (an
initializer, a ``Constant`` node, or either behind ``Identity`` nodes). Each one
is described by a :class:`TargetLayer`: the layer as ``y = W x + b`` on one
input row ``x`` (a Gemm/MatMul row, or an im2col patch of a Conv ordered
``(c, i, j)`` like ``W.reshape(C_out, -1)``), plus what the calibration needs to
rebuild ``x`` and what the rewrite needs to rebuild the node.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import OnnxcompError, first_line

TARGET_OPS = ("Conv", "Gemm", "MatMul")
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}
_TWO_GB = 2**31


@dataclass
class ConvGeometry:
    """How a Conv turns its input into patches (everything im2col needs)."""

    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    auto_pad: str = "NOTSET"

    def resolve_pads(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Explicit (top, left, bottom, right) pads for an input of this size."""
        if self.auto_pad in ("NOTSET", "VALID"):
            return self.pads if self.auto_pad == "NOTSET" else (0, 0, 0, 0)
        begin, end = [], []
        for size, k, s, d in zip((height, width), self.kernel, self.strides, self.dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            # SAME_UPPER puts the extra pad at the end, SAME_LOWER at the beginning.
            first, last = (small, large) if self.auto_pad == "SAME_UPPER" else (large, small)
            begin.append(first)
            end.append(last)
        return (begin[0], begin[1], end[0], end[1])

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        top, left, bottom, right = self.resolve_pads(height, width)
        sizes = []
        for size, lo, hi, k, s, d in zip(
            (height, width), (top, left), (bottom, right), self.kernel, self.strides, self.dilations
        ):
            sizes.append((size + lo + hi - d * (k - 1) - 1) // s + 1)
        return sizes[0], sizes[1]

    def key(self) -> str:
        pads = self.auto_pad if self.auto_pad != "NOTSET" else ",".join(map(str, self.pads))
        return (
            f"k{self.kernel[0]}x{self.kernel[1]} s{self.strides[0]}x{self.strides[1]} "
            f"d{self.dilations[0]}x{self.dilations[1]} p{pads}"
        )


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

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def kernel(self) -> tuple[int, int]:
        return self.conv.kernel if self.conv else (1, 1)

    @property
    def in_channels(self) -> int:
        kh, kw = self.kernel
        return self.in_features // (kh * kw)

    @property
    def stats_key(self) -> str:
        """Layers reading the same tensor the same way share one statistic."""
        if self.conv is not None:
            return f"{self.input}|conv {self.conv.key()}"
        return f"{self.input}|rows{' T' if self.trans_a else ''}"

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
            kh, kw = self.kernel
            return f"{self.out_features}x{self.in_channels}x{kh}x{kw}"
        return f"{self.in_features}x{self.out_features}"


# ---------------------------------------------------------------- load / save


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load a model file (with its external data), or raise a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise OnnxcompError(f"model file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # protobuf's DecodeError, missing external data, ...
        raise OnnxcompError(f"cannot read ONNX model {path}: {first_line(exc)}") from None
    if not model.graph.node:
        raise OnnxcompError(f"{path} holds no ONNX graph (empty or not an ONNX model)")
    return model


def as_model(model_or_path) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    return load_model(model_or_path)


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> None:
    """Check and write a model atomically: a temp file renamed into place.

    Models over 2 GB (or any, with ``external_data=True``) go out with their
    tensors in one external data file beside the model (protobuf cannot hold
    more than 2 GB).
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise OnnxcompError(f"output folder does not exist: {directory}")
    large = external_data if external_data is not None else (
        model.ByteSize() > _TWO_GB - 2**24 if _can_size(model) else True
    )
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=directory))
    data_name = path.name + ".data"
    try:
        staged = staging / path.name
        if large:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # saving with external data rewrites the tensors in place
            onnx.save_model(copy, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(staged))
        onnx.checker.check_model(str(staged), full_check=True)
        if large:
            os.replace(staging / data_name, directory / data_name)
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _can_size(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses to size messages over 2 GB
        return False



# ---------------------------------------------------------------- constants


def constant_tensors(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every tensor of the graph whose value is known without running it.

    Initializers (that are not also graph inputs, which a user may override),
    outputs of ``Constant`` nodes, and ``Identity`` of either.
    """
    inputs = {i.name for i in graph.input}
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name not in inputs}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = _constant_node_value(node)
            if value is not None:
                values[node.output[0]] = value
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
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


# ---------------------------------------------------------------- shapes


def parse_input_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """``["name:1,3,224,224", ...]`` -> ``{"name": [1, 3, 224, 224]}``."""
    shapes = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise OnnxcompError(f"bad --input-shape {spec!r}: expected name:d1,d2,... (e.g. input:1,3,224,224)") from None
    return shapes


def with_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy of the model whose graph inputs have the given fixed shapes."""
    if not shapes:
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    by_name = {i.name: i for i in model.graph.input}
    for name, dims in shapes.items():
        if name not in by_name:
            raise OnnxcompError(
                f"--input-shape names {name!r}, but the model's inputs are {sorted(by_name)}"
            )
        tensor_type = by_name[name].type.tensor_type
        old = tensor_type.shape.dim
        if len(old) and len(old) != len(dims):
            raise OnnxcompError(f"--input-shape {name}: model input has rank {len(old)}, got {len(dims)} dims")
        tensor_type.shape.ClearField("dim")
        for d in dims:
            tensor_type.shape.dim.add().dim_value = d
    return model


def infer_shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Static shapes of every tensor that shape inference can tell (dims may be symbolic)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is a help, not a requirement
        inferred = model
    shapes = {}
    graph = inferred.graph
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            shapes[info.name] = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in info.type.tensor_type.shape.dim
            ]
    for init in graph.initializer:
        shapes.setdefault(init.name, list(init.dims))
    return shapes


def _static_product(dims) -> int | None:
    if dims is None or any(not isinstance(d, int) or d <= 0 for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64)) if dims else 1


# ---------------------------------------------------------------- targets


@dataclass
class Skipped:
    name: str
    op_type: str
    reason: str


def find_layers(
    model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None
) -> tuple[list[TargetLayer], list[Skipped]]:
    """The compressible layers of a model, and the Conv/Gemm/MatMul nodes that are not (with why)."""
    graph = model.graph
    constants = constant_tensors(graph)
    shapes = infer_shapes(with_input_shapes(model, input_shapes or {}))
    layers, skipped = [], []
    for index, node in enumerate(graph.node):
        if node.op_type not in TARGET_OPS:
            continue
        name = node.name or f"{node.op_type}_{index}"
        builder = {"Conv": _conv_layer, "Gemm": _gemm_layer, "MatMul": _matmul_layer}[node.op_type]
        try:
            layers.append(builder(node, name, index, constants, shapes))
        except _NotTarget as why:
            skipped.append(Skipped(name, node.op_type, str(why)))
    return layers, skipped


class _NotTarget(Exception):
    pass


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _float_weight(value: np.ndarray | None, what: str) -> np.ndarray:
    if value is None:
        raise _NotTarget(f"{what} is not a constant")
    if value.dtype not in (np.float32, np.float64, np.float16):
        raise _NotTarget(f"{what} has dtype {value.dtype}, not a float type")
    return value


def _conv_layer(node, name, index, constants, shapes) -> TargetLayer:
    attrs = _attrs(node)
    weight = _float_weight(constants.get(node.input[1]), "weight")
    if weight.ndim != 4:
        raise _NotTarget(f"{weight.ndim - 2}-D convolution (only 2-D is supported)")
    if attrs.get("group", 1) != 1:
        raise _NotTarget(f"grouped convolution (group={attrs['group']})")
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = constants.get(node.input[2])
        if bias is None:
            raise _NotTarget("bias is not a constant")
    c_out, _, kh, kw = weight.shape
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    geometry = ConvGeometry(
        kernel=(kh, kw),
        strides=tuple(attrs.get("strides", [1, 1])),
        dilations=tuple(attrs.get("dilations", [1, 1])),
        pads=(pads[0], pads[1], pads[2], pads[3]),
        auto_pad=auto_pad,
    )
    out_shape = shapes.get(node.output[0])
    positions = _static_product(out_shape[2:]) if out_shape and len(out_shape) == 4 else None
    return TargetLayer(
        name=name, op_type="Conv", node_index=index, input=node.input[0], output=node.output[0],
        weight=weight.reshape(c_out, -1), bias=bias, conv=geometry, positions=positions, attrs=attrs,
    )


def _gemm_layer(node, name, index, constants, shapes) -> TargetLayer:
    attrs = _attrs(node)
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
        positions = _static_product(x_shape[1:-1])  # rows per sample: every dim but batch and K
    return TargetLayer(
        name=name, op_type="MatMul", node_index=index, input=node.input[0], output=node.output[0],
        weight=b.T, bias=None, positions=positions, attrs={},
    )


# ---------------------------------------------------------------- whole-model costs


def count_params(model: onnx.ModelProto) -> int:
    """Float weights of the model: initializers and Constant-node tensors."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    inputs = {i.name for i in model.graph.input}
    total = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in floats and t.name not in inputs)
    for node in model.graph.node:
        if node.op_type == "Constant":  # Identity copies are not counted again
            value = _constant_node_value(node)
            if value is not None and value.dtype.kind == "f":
                total += value.size
    return int(total)


def count_macs(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None, feed: dict | None = None) -> int | None:
    """Multiply-adds per sample of every Conv, Gemm and MatMul (None if a shape is unknown).

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


def runtime_shapes(model: onnx.ModelProto, feed: dict) -> dict[str, list[int]]:
    """Shapes of the Conv/Gemm/MatMul inputs and outputs, from one onnxruntime run on ``feed``."""
    import onnxruntime as ort

    wanted = {name for node in model.graph.node if node.op_type in TARGET_OPS for name in (node.input[0], node.output[0])}
    wanted -= set(constant_tensors(model.graph))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    fetch = sorted(wanted - set(feed))
    for name in fetch:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        values = session.run(fetch, feed)
    except Exception:  # a float16 model or an exotic graph: shapes stay unknown
        return {}
    shapes = {name: list(value.shape) for name, value in zip(fetch, values)}
    shapes.update({name: list(np.shape(value)) for name, value in feed.items() if name in wanted})
    return shapes


def _macs_from(model: onnx.ModelProto, shapes) -> int | None:
    total = 0
    for node in model.graph.node:
        if node.op_type not in TARGET_OPS:
            continue
        macs = _node_macs(node, shapes)
        if macs is None:
            return None
        total += macs
    return total


def _node_macs(node: onnx.NodeProto, shapes) -> int | None:
    out = shapes.get(node.output[0])
    if node.op_type == "Conv":
        weight = shapes.get(node.input[1])
        per_output = _static_product(weight[1:]) if weight else None
        outputs = _static_product(out[1:]) if out else None
        return None if per_output is None or outputs is None else per_output * outputs
    a = shapes.get(node.input[0])
    if not a or not out:
        return None
    if node.op_type == "Gemm":
        k = a[0] if _attrs(node).get("transA", 0) else a[-1]
        n = out[-1]
        return k * n if isinstance(k, int) and isinstance(n, int) else None
    outputs = _static_product(out[1:]) if len(out) > 1 else _static_product(out)
    k = a[-1]
    return None if outputs is None or not isinstance(k, int) else outputs * k
