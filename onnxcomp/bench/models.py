"""The two models ``onnxcomp bench`` compares: loaded, their sessions opened, outputs paired, sizes counted."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..errors import OnnxcompError
from ..model import count_macs, count_params, load_model
from ..model.sample_axes import find_sample_axes, parse_batch_axes, with_samples_first
from ..runtime import open_session, run_arrays
from .result import ModelInfo

WHICH = ("original", "compressed")


@dataclass
class ModelPair:
    """The original and the compressed model with their sessions, created once for every measurement."""

    models: tuple[onnx.ModelProto, onnx.ModelProto]
    paths: tuple[str | None, str | None]  # the file each came from (None: a ModelProto)
    sessions: tuple
    output_names: list[str]  # the original's, in its order
    pairing: list[int] | None  # index of each original output among the compressed outputs (None: by position)

    @classmethod
    def open(cls, original, compressed, providers, threads: int | None, batch_axes=None) -> "ModelPair":
        """Both models from .onnx paths or ModelProtos; their inputs must be the same. Where an input
        or output has its samples on another axis than 0 (``batch_axes``: where the graph cannot tell),
        both are compared as working models that have them on axis 0 (:mod:`onnxcomp.model.sample_axes`)."""
        loaded = [_load(model, which) for model, which in zip((original, compressed), WHICH)]
        axes = find_sample_axes(loaded[0][0], parse_batch_axes(batch_axes))
        if axes:
            loaded = [(_samples_first(model, axes), path) for model, path in loaded]
        # A model that came from a file is opened from it (its external data stays where it is).
        sessions = tuple(open_session(path if path is not None and not axes else model, f"the {which} model",
                                      providers, threads)
                         for (model, path), which in zip(loaded, WHICH))
        _check_same_inputs(*sessions)
        return cls(
            models=(loaded[0][0], loaded[1][0]), paths=(loaded[0][1], loaded[1][1]), sessions=sessions,
            output_names=[o.name for o in sessions[0].get_outputs()], pairing=_pair_outputs(*sessions),
        )

    @property
    def reference(self) -> onnx.ModelProto:
        """The original model: the one whose inputs the data is checked against."""
        return self.models[0]

    def run(self, feed: dict) -> tuple[list, list]:
        """Both models' outputs on ``feed``, the compressed ones in the order of the original's."""
        reference = run_arrays(self.sessions[0], None, feed)
        candidate = run_arrays(self.sessions[1], None, feed)
        if self.pairing is not None:
            candidate = [candidate[i] for i in self.pairing]
        return reference, candidate

    def info(self, feeds: dict) -> tuple[ModelInfo, ModelInfo]:
        """Both models' sizes, MACs counted at the data's per-sample input shapes."""
        return tuple(_model_info(model, path, feeds, session)
                     for model, path, session in zip(self.models, self.paths, self.sessions))


def _samples_first(model: onnx.ModelProto, axes) -> onnx.ModelProto:
    working = onnx.ModelProto()
    working.CopyFrom(model)
    with_samples_first(working, axes)
    return working


def _load(model, which: str) -> tuple[onnx.ModelProto, str | None]:
    """The model, and its file path when it came from one."""
    if isinstance(model, onnx.ModelProto):
        return model, None
    if not isinstance(model, (str, os.PathLike)):
        raise OnnxcompError(
            f"the {which} model must be an .onnx path or an onnx.ModelProto, got {type(model).__name__}")
    return load_model(model), str(model)


def _check_same_inputs(original, compressed) -> None:
    a = {i.name: i.type for i in original.get_inputs()}
    b = {i.name: i.type for i in compressed.get_inputs()}
    if a != b:
        raise OnnxcompError(f"the models' inputs differ: original {_describe(a)}, compressed {_describe(b)}")


def _describe(inputs: dict) -> str:
    return "[" + ", ".join(f"{name}: {kind}" for name, kind in inputs.items()) + "]"


def _pair_outputs(original, compressed) -> list[int] | None:
    """Index of each original output among the compressed outputs (None: matched by position)."""
    a = [o.name for o in original.get_outputs()]
    b = [o.name for o in compressed.get_outputs()]
    if sorted(a) == sorted(b):
        return [b.index(name) for name in a]
    if len(a) != len(b):
        raise OnnxcompError(f"the original has outputs {a} but the compressed model has {b}")
    return None


def _model_info(model: onnx.ModelProto, path: str | None, feeds: dict, session) -> ModelInfo:
    shapes = {}
    static = {i.name: i.shape for i in session.get_inputs()}
    for name, value in feeds.items():
        dims = static.get(name) or []
        per_sample = [1, *value.shape[1:]]
        if len(dims) == len(per_sample) and isinstance(dims[0], int) and dims[0] > 0:
            per_sample[0] = dims[0]  # a fixed batch stays fixed, or shape inference may break
        shapes[name] = per_sample
    try:
        macs = count_macs(model, shapes)
    except Exception:  # shape inference trouble: MACs are a help here, not a requirement
        macs = None
    return ModelInfo(path or "<ModelProto>", count_params(model), macs, _file_bytes(model, path))


def _file_bytes(model: onnx.ModelProto, path: str | None) -> int:
    """Bytes on disk: the .onnx file and the external data files it names (a ModelProto: its serialized size)."""
    if path is None:
        try:
            return model.ByteSize()
        except Exception:  # protobuf refuses to size messages over 2 GB
            return sum(len(t.raw_data) for t in model.graph.initializer)
    path = Path(path)
    locations = set()
    for tensor in _all_tensors(onnx.load(str(path), load_external_data=False)):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entry = {e.key: e.value for e in tensor.external_data}
            if "location" in entry:
                locations.add(entry["location"])
    data_files = [path.parent / location for location in sorted(locations)]
    return path.stat().st_size + sum(f.stat().st_size for f in data_files if f.is_file())


def _all_tensors(model: onnx.ModelProto):
    """Every TensorProto of the model: initializers and tensor attributes, subgraphs included."""
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
