"""Load and save ONNX files: one-line errors, atomic writes, external data past 2 GB."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
from onnx import numpy_helper

from ..errors import OnnxcompError, first_line
from ..io import check_readable, staged

_TWO_GB = 2**31
# Models past this size go out with their tensors in an external data file (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = _TWO_GB - 2**24


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load a model file (with its external data), or raise a one-line error."""
    path = check_readable(path, "model")
    for data_file in external_data_files(path):  # a FIFO there would block the load as well
        if data_file.exists():  # a missing one: onnx.load says which
            check_readable(data_file, "model's external data")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # protobuf's DecodeError, missing external data, ...
        raise OnnxcompError(f"cannot read ONNX model {path}: {first_line(exc)}") from None
    if not model.graph.node:
        raise OnnxcompError(f"{path} holds no ONNX graph (empty or not an ONNX model)")
    check_model(model, path)
    return model


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external data files a model file refers to (none if it cannot be read: loading says why)."""
    path = Path(path)
    if not path.is_file():  # missing, a folder, a FIFO (reading one would block): loading says why
        return []
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return []
    tensors = [*model.graph.initializer,
               *(a.t for node in model.graph.node for a in node.attribute if a.HasField("t"))]
    locations = {entry.value for tensor in tensors if tensor.data_location == onnx.TensorProto.EXTERNAL
                 for entry in tensor.external_data if entry.key == "location"}
    return [path.parent / location for location in sorted(locations)]


def external_data_file(path: str | os.PathLike) -> Path:
    """The file :func:`save_model` puts a large model's tensors in."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def check_model(model: onnx.ModelProto, path: Path | None = None) -> None:
    """ONNX's own checker, as a one-line error: a damaged or invalid model is refused before any work
    (protobuf parses many damaged files into structures that break later, far from the cause)."""
    try:
        try:
            # full_check: shape inference too, as save_model checks the compressed model
            onnx.checker.check_model(model, full_check=True)
        except ValueError:  # over 2 GB: only the file can be checked
            if path is None:
                raise
            onnx.checker.check_model(str(path), full_check=True)
        for tensor in model.graph.initializer:
            numpy_helper.to_array(tensor)  # raw data of the size its dims say
    except Exception as exc:
        where = f" {path}" if path is not None else ""
        raise OnnxcompError(f"not a valid ONNX model{where}: {first_line(exc)}") from None
    if not all(isinstance(text, str) for text in _names(model)):
        where = f" {path}" if path is not None else ""
        raise OnnxcompError(f"not a valid ONNX model{where}: it holds names that are not UTF-8 text")


def _names(model: onnx.ModelProto):
    """Every name of the main graph (protobuf hands over damaged UTF-8 as bytes instead of failing)."""
    graph = model.graph
    yield graph.name
    for node in graph.node:
        yield node.name
        yield node.op_type
        yield from node.input
        yield from node.output
    for info in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
        yield info.name


def as_model(model_or_path) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        _refuse_unloaded_external_data(model_or_path)
        return model_or_path
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise OnnxcompError(f"expected an onnx.ModelProto or a model path, got {type(model_or_path).__name__}")
    return load_model(model_or_path)


def _refuse_unloaded_external_data(model: onnx.ModelProto) -> None:
    """A ModelProto loaded with ``load_external_data=False`` names files relative to a folder it no
    longer knows: say so, instead of onnx's error from wherever the process runs."""
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and not tensor.HasField("raw_data"):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise OnnxcompError(f"the model's tensor {tensor.name!r} is external data that was not loaded (file "
                                f"{location!r}): pass the model's path, or load it with onnx.load(path) "
                                "(load_external_data=True)")


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> None:
    """Check and write a model atomically (see :func:`onnxcomp.io.staged`).

    Models over 2 GB (or any, with ``external_data=True``) go out with their
    tensors in one external data file beside the model (protobuf cannot hold
    more than 2 GB).
    """
    path = Path(path)
    large = external_data if external_data is not None else (
        model.ByteSize() > EXTERNAL_DATA_BYTES if _can_size(model) else True
    )
    with staged(path, "model") as folder:
        target = folder / path.name
        if large:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # saving with external data rewrites the tensors in place
            onnx.save_model(copy, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=external_data_file(path).name, size_threshold=1024)
        else:
            onnx.save_model(model, str(target))
        onnx.checker.check_model(str(target), full_check=True)


def _can_size(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses to size messages over 2 GB
        return False


def fingerprint(model: onnx.ModelProto) -> str:
    """What identifies a model's function: its nodes (ops, wiring, attribute values) and its weights, hashed.

    Statistics record the fingerprint of the model they were collected on, so that they are not
    used with (or merged into) statistics of another one whose tensor names happen to match. Values
    are hashed, not protobuf bytes: tools (onnxruntime, onnx-graphsurgeon) may set an empty field
    explicitly, which changes the bytes and not the model.
    """
    digest = hashlib.sha256()
    for node in model.graph.node:
        digest.update(repr((node.domain, node.op_type, list(node.input), list(node.output))).encode())
        for attribute in sorted(node.attribute, key=lambda a: a.name):
            digest.update(attribute.name.encode())
            digest.update(_attribute_bytes(attribute))
    for tensor in sorted(model.graph.initializer, key=lambda t: t.name):
        digest.update(tensor.name.encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()[:16]


def _tensor_bytes(tensor: onnx.TensorProto) -> bytes:
    value = numpy_helper.to_array(tensor)
    return repr((value.dtype.str, value.shape)).encode() + value.tobytes()


def _attribute_bytes(attribute: onnx.AttributeProto) -> bytes:
    if attribute.HasField("t"):
        return _tensor_bytes(attribute.t)
    if attribute.HasField("g") or attribute.graphs:  # subgraphs: their serialised form is good enough
        return attribute.SerializeToString(deterministic=True)
    return repr(onnx.helper.get_attribute_value(attribute)).encode()
