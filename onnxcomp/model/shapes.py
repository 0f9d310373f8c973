"""Tensor shapes: user overrides of dynamic inputs, ONNX shape inference, one measured run."""

from __future__ import annotations

import numpy as np
import onnx

from ..errors import OnnxcompError
from .constants import TARGET_OPS, constant_tensors
from .opsets import onnx_opset
from .subgraphs import lift, stacked_levels, walk_graphs, why_not_liftable


def parse_input_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """``["name:1,3,224,224", ...]`` -> ``{"name": [1, 3, 224, 224]}``."""
    shapes = {}
    for spec in specs or []:
        if not isinstance(spec, str):
            raise OnnxcompError(f"bad --input-shape {spec!r}: expected name:d1,d2,... (e.g. input:1,3,224,224)")
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise OnnxcompError(
                f"bad --input-shape {spec!r}: expected name:d1,d2,... (e.g. input:1,3,224,224)") from None
        checked_dims(name, shapes[name])
    return shapes


def checked_dims(name: str, dims) -> list[int]:
    """``dims`` of an ``--input-shape`` (or ``input_shapes={name: dims}``) as ints, each a positive
    size or -1 (dynamic): 0 or -2 would reach onnxruntime as a shape."""
    try:
        values = list(dims)
    except TypeError:
        values = None
    if (values is None or not values
            or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or (d < 1 and d != -1) for d in values)):
        raise OnnxcompError(f"bad --input-shape for {name!r}: {dims!r}: each dimension is a positive size or "
                            "-1 (dynamic)")
    return [int(d) for d in values]


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
        for axis, d in enumerate(dims):
            if d > 0:
                tensor_type.shape.dim.add().dim_value = d
            else:  # -1: this dimension stays dynamic (the batch, usually)
                tensor_type.shape.dim.add().dim_param = f"{name}_dim{axis}"
    return model


def infer_shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Static shapes of every tensor that shape inference can tell (dims may be symbolic), those of
    If/Loop/Scan bodies too (a Loop or Scan body's: of one iteration)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is a help, not a requirement
        inferred = model
    shapes = {}
    for _, graph in walk_graphs(inferred.graph):  # the main graph first: its names win
        for info in list(graph.input) + list(graph.value_info) + list(graph.output):
            if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
                shapes.setdefault(info.name, [
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in info.type.tensor_type.shape.dim
                ])
        for init in graph.initializer:
            shapes.setdefault(init.name, list(init.dims))
    return shapes


def static_product(dims) -> int | None:
    if dims is None or any(not isinstance(d, int) or d <= 0 for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64)) if dims else 1


# The shape runtime_shapes gives the tensors of a body that did not run on its feed (an If branch not
# taken): their nodes did no work for that sample.
NOT_RUN = ["not run"]


def runtime_shapes(model: onnx.ModelProto, feed: dict) -> dict[str, list[int]]:
    """Shapes of the Conv/Gemm/MatMul inputs and outputs, from one onnxruntime run on ``feed`` (in
    If/Loop/Scan bodies too: a Loop's of one iteration; :data:`NOT_RUN` where the body did not run)."""
    from ..runtime import make_session  # onnxruntime only when shapes must be measured

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    opset = onnx_opset(model)
    wanted, lifted = set(), []
    for scope, graph in walk_graphs(model.graph):
        names = {name for node in graph.node if node.op_type in TARGET_OPS for name in (node.input[0], node.output[0])}
        names -= set(constant_tensors(graph))
        if not scope:
            wanted = names
        elif why_not_liftable(scope, opset) is None:
            lifted += [(name, scope) for name in sorted(names)]
    existing = {o.name for o in probe.graph.output}
    fetch = sorted(wanted - set(feed))
    for name in fetch:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    carried = lift(probe, [(name, scope, onnx.TensorProto.FLOAT) for name, scope in lifted])
    try:
        session = make_session(probe, quiet=True)
        values = session.run(fetch + carried, feed)
    except Exception:  # a float16 model or an exotic graph: shapes stay unknown
        return {}
    shapes = {name: list(value.shape) for name, value in zip(fetch, values)}
    for (name, scope), value in zip(lifted, values[len(fetch):]):
        levels = stacked_levels(scope)
        shapes.setdefault(name, NOT_RUN if value.size == 0 else list(value.shape[levels:]))
    shapes.update({name: list(np.shape(value)) for name, value in feed.items() if name in wanted})
    return shapes
