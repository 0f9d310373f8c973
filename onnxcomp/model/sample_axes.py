"""Which axis of each input and output holds the samples, and a working model where it is axis 0.

Every stage splits, joins and counts samples along axis 0. Real models do not all batch there: a
recurrent state ``[2, batch, 128]`` batches on axis 1, a sample rate ``sr`` is a scalar that every
batch shares, a fixed tensor has no sample axis at all. The sample axis of each input is read from
the model's symbolic dims (the dim name the inputs share on their batch axis), or given by the user
(``--batch-axis NAME:AXIS|none``) where the graph cannot tell; outputs follow the same dim name.

The working model takes every input and gives every output with its samples on axis 0: a
``Transpose`` in front of each input batched elsewhere, a ``Gather`` of sample 0 in front of each
input without a sample axis (the data's one value is repeated for every sample, so batches split and
join like any other input), a ``Transpose`` behind each output batched elsewhere.
:func:`restore_layout` takes them out of a compressed model again. The layout travels in the working
model's metadata, so that the data readers put every batch into it on their own.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import OnnxcompError
from .subgraphs import bodies

METADATA_KEY = "onnxcomp.sample_axes"
_PREFIX = "onnxcomp_sample_axis"  # names of the nodes and tensors this module adds
HELD = None  # the sample axis of an input that has none: its one value serves every sample


@dataclass(frozen=True)
class SampleAxes:
    """The sample axis of each input (an int, or ``None``: no sample axis) and of each output,
    listing only those not on axis 0."""

    inputs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.inputs or self.outputs)

    def describe(self) -> str:
        parts = [f"{name} on axis {axis}" if axis is not HELD else f"{name} without one (its one value serves "
                 "every sample)" for name, axis in {**self.inputs, **self.outputs}.items()]
        return "sample axes: " + ", ".join(parts)

    def to_json(self) -> str:
        return json.dumps({"inputs": self.inputs, "outputs": self.outputs}, sort_keys=True)

    @classmethod
    def of_model(cls, model: onnx.ModelProto) -> "SampleAxes":
        """The layout a working model was given (empty for any other model)."""
        for prop in model.metadata_props:
            if prop.key == METADATA_KEY:
                data = json.loads(prop.value)
                return cls(data["inputs"], data["outputs"])
        return cls()

    def canonical_array(self, name: str, value: np.ndarray, samples: int | None) -> np.ndarray:
        """One input's array (as the original model takes it) with its samples on axis 0; an input
        without a sample axis repeated for ``samples`` samples (a read-only broadcast view)."""
        if name not in self.inputs:
            return value
        axis = self.inputs[name]
        if axis is HELD:
            return np.broadcast_to(value, (samples or 1, *np.shape(value)))
        if np.ndim(value) <= axis:
            raise OnnxcompError(f"input {name!r} has its samples on axis {axis}, but the data has shape "
                                f"{np.shape(value)} (rank {np.ndim(value)})")
        return np.moveaxis(value, axis, 0)

    def samples_of(self, arrays: dict) -> int | None:
        """How many samples a batch or set of arrays in the original layout holds (None: no input has
        a sample axis among them)."""
        for name, value in arrays.items():
            axis = self.inputs.get(name, 0)
            if axis is not HELD and np.ndim(value) > axis:
                return int(np.shape(value)[axis])
        return None

    def canonical_feed(self, feed: dict) -> dict:
        """A batch in the original layout, in the working model's."""
        if not self.inputs:
            return feed
        samples = self.samples_of(feed)
        return {name: self.canonical_array(name, np.asarray(value), samples) for name, value in feed.items()}


def find_sample_axes(model: onnx.ModelProto, given: dict | None = None) -> SampleAxes:
    """Each input's and output's sample axis: ``given`` (name -> axis or None) where the user said,
    else from the graph."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = {i.name: _dims(i) for i in graph.input if i.name not in initializers}
    outputs = {o.name: _dims(o) for o in graph.output}
    given = dict(given or {})
    _check_given(given, inputs, outputs)
    symbol = _batch_symbol(inputs, outputs)
    batched = any(_named_axis(dims, symbol) is not None or dims and dims[0] is None
                  for dims in inputs.values() if dims is not None)
    found_inputs = {name: given[name] if name in given else _input_axis(dims, symbol, batched)
                    for name, dims in inputs.items()}
    found_outputs = {name: given[name] if name in given else _output_axis(dims, symbol)
                     for name, dims in outputs.items()}
    if any(axis is HELD for axis in found_outputs.values()):
        name = next(n for n, a in found_outputs.items() if a is HELD)
        raise OnnxcompError(f"--batch-axis {name}:none: an output must have a sample axis")
    return SampleAxes({n: a for n, a in found_inputs.items() if a != 0},
                      {n: a for n, a in found_outputs.items() if a != 0})


def parse_batch_axes(specs) -> dict:
    """``NAME:AXIS`` / ``NAME:none`` strings (or a dict already) -> name -> axis or None."""
    if isinstance(specs, dict):
        return {name: _axis_value(str(name), axis) for name, axis in specs.items()}
    if isinstance(specs, str):
        specs = [specs]
    if specs is not None and not isinstance(specs, (list, tuple)):
        raise OnnxcompError(f"batch_axes must be a dict name -> axis or a list of 'NAME:AXIS', got {specs!r}")
    parsed = {}
    for spec in specs or ():
        name, sep, axis = str(spec).rpartition(":")
        if not sep or not name:
            raise OnnxcompError(f"--batch-axis expects NAME:AXIS or NAME:none, got {spec!r}")
        parsed[name] = _axis_value(name, axis)
    return parsed


def _axis_value(name: str, axis) -> int | None:
    if axis is None or str(axis).lower() == "none":
        return HELD
    if isinstance(axis, bool):
        raise OnnxcompError(f"--batch-axis {name}: the axis must be an integer >= 0 or none, got {axis!r}")
    try:
        value = int(axis)
    except (TypeError, ValueError):
        raise OnnxcompError(f"--batch-axis {name}: the axis must be an integer >= 0 or none, got {axis!r}") from None
    if value < 0:
        raise OnnxcompError(f"--batch-axis {name}: the axis must be an integer >= 0 or none, got {axis!r}")
    return value


def _check_given(given: dict, inputs: dict, outputs: dict) -> None:
    for name, axis in given.items():
        if name not in inputs and name not in outputs:
            raise OnnxcompError(f"--batch-axis {name!r}: the model has no input or output of that name "
                                f"(inputs {list(inputs)}, outputs {list(outputs)})")
        dims = inputs.get(name, outputs.get(name))
        if axis is not HELD and dims is not None and axis >= len(dims):
            raise OnnxcompError(f"--batch-axis {name}:{axis}: {name!r} has rank {len(dims)}")


def _dims(info: onnx.ValueInfoProto) -> list | None:
    """The declared dims: an int, a dim name, or None (dynamic, unnamed); None when the rank is unknown."""
    tensor = info.type.tensor_type
    if not info.type.HasField("tensor_type") or not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
            for d in tensor.shape.dim]


def _batch_symbol(inputs: dict, outputs: dict) -> str | None:
    """The dim name most inputs (else outputs) carry on axis 0: the batch's."""
    for group in (inputs, outputs):
        names = Counter(dims[0] for dims in group.values() if dims and isinstance(dims[0], str))
        if names:
            return names.most_common(1)[0][0]
    return None


def _named_axis(dims: list, symbol: str | None) -> int | None:
    return dims.index(symbol) if symbol is not None and symbol in dims else None


def _input_axis(dims: list | None, symbol: str | None, others_batched: bool) -> int | None:
    if dims is None:
        return 0
    if not dims:
        return HELD  # a scalar
    named = _named_axis(dims, symbol)
    if named is not None:
        return named
    if not isinstance(dims[0], int):
        return 0
    dynamic = [axis for axis, d in enumerate(dims) if not isinstance(d, int)]
    if len(dynamic) == 1:
        return dynamic[0]
    # Every dim fixed: a tensor beside batched inputs has no sample axis; a model whose inputs are
    # all fixed has a fixed batch on axis 0.
    return HELD if not dynamic and others_batched else 0


def _output_axis(dims: list | None, symbol: str | None) -> int:
    named = _named_axis(dims, symbol) if dims else None
    return named if named is not None else 0


# ---------------------------------------------------------------- the working model


def with_samples_first(model: onnx.ModelProto, axes: SampleAxes) -> None:
    """Give ``model`` (in place) inputs and outputs with their samples on axis 0, and its layout as metadata."""
    if not axes:
        return
    graph = model.graph
    nodes = []
    for info in graph.input:
        if info.name in axes.inputs:
            nodes.append(_input_adapter(graph, info, axes.inputs[info.name]))
    for info in graph.output:
        if info.name in axes.outputs:
            graph.node.append(_output_adapter(graph, info, axes.outputs[info.name]))
    for node in reversed(nodes):
        graph.node.insert(0, node)
    model.metadata_props.add(key=METADATA_KEY, value=axes.to_json())


def _input_adapter(graph: onnx.GraphProto, info: onnx.ValueInfoProto, axis: int | None) -> onnx.NodeProto:
    """The node that turns the working model's input ``info.name`` back into what the graph reads."""
    inner = f"{_PREFIX}/{info.name}"
    _rename_reads(graph, info.name, inner)
    dims = info.type.tensor_type.shape.dim
    if axis is HELD:
        index = numpy_helper.from_array(np.array(0, dtype=np.int64), f"{_PREFIX}/zero/{info.name}")
        graph.initializer.append(index)
        new = onnx.TensorShapeProto.Dimension(dim_param=f"{_PREFIX}_samples")
        dims.insert(0, new)
        return onnx.helper.make_node("Gather", [info.name, index.name], [inner], name=inner, axis=0)
    rank = len(dims)
    moved = [dims[axis]] + [d for i, d in enumerate(dims) if i != axis]
    copies = [onnx.TensorShapeProto.Dimension() for _ in moved]
    for copy, dim in zip(copies, moved):
        copy.CopyFrom(dim)
    del dims[:]
    dims.extend(copies)
    perm = [i + 1 for i in range(axis)] + [0] + list(range(axis + 1, rank))
    return onnx.helper.make_node("Transpose", [info.name], [inner], name=inner, perm=perm)


def _output_adapter(graph: onnx.GraphProto, info: onnx.ValueInfoProto, axis: int) -> onnx.NodeProto:
    inner = f"{_PREFIX}/{info.name}"
    _rename_everywhere(graph, info.name, inner)
    dims = info.type.tensor_type.shape.dim
    rank = len(dims)
    perm = [axis] + [i for i in range(rank) if i != axis]
    moved = [dims[i] for i in perm]
    copies = [onnx.TensorShapeProto.Dimension() for _ in moved]
    for copy, dim in zip(copies, moved):
        copy.CopyFrom(dim)
    del dims[:]
    dims.extend(copies)
    return onnx.helper.make_node("Transpose", [inner], [info.name], name=f"{inner}/out", perm=perm)


def restore_layout(compressed: onnx.ModelProto, axes: SampleAxes, inputs, outputs) -> None:
    """Take the adapters out of a model derived from a working model (in place): its inputs and
    outputs take the original's layout and declarations (``inputs``, ``outputs``: ValueInfoProto) again."""
    if not axes:
        return
    graph = compressed.graph
    adapters = [n for n in graph.node if n.name.startswith(f"{_PREFIX}/")]
    for node in adapters:
        graph.node.remove(node)
    for name in axes.inputs:
        _rename_reads(graph, f"{_PREFIX}/{name}", name)
    for name in axes.outputs:
        _rename_everywhere(graph, f"{_PREFIX}/{name}", name)
    kept = [t for t in graph.initializer if not t.name.startswith(f"{_PREFIX}/")]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    declared = {i.name: i for i in (*inputs, *outputs)}
    for info in (*graph.input, *graph.output):
        if info.name in axes.inputs or info.name in axes.outputs:
            info.CopyFrom(declared[info.name])
    props = [p for p in compressed.metadata_props if p.key != METADATA_KEY]
    del compressed.metadata_props[:]
    compressed.metadata_props.extend(props)


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every node (in subgraphs too) that reads ``old`` reads ``new`` instead."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for _, body in bodies(node):
            if old not in {i.name for i in body.input} | {o for n in body.node for o in n.output}:
                _rename_reads(body, old, new)  # unless the body defines a name of its own that shadows it


def _rename_everywhere(graph: onnx.GraphProto, old: str, new: str) -> None:
    """The tensor ``old`` (its producer, its readers, its value_info) is called ``new``."""
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for info in graph.value_info:
        if info.name == old:
            info.name = new
    _rename_reads(graph, old, new)

