"""Load and save ONNX files: one-line errors, atomic writes, external data past 2 GB."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from ..errors import OnnxcompError, first_line
from ..io import staged

_TWO_GB = 2**31


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
    """Check and write a model atomically (see :func:`onnxcomp.io.staged`).

    Models over 2 GB (or any, with ``external_data=True``) go out with their
    tensors in one external data file beside the model (protobuf cannot hold
    more than 2 GB).
    """
    path = Path(path)
    large = external_data if external_data is not None else (
        model.ByteSize() > _TWO_GB - 2**24 if _can_size(model) else True
    )
    with staged(path, "model") as folder:
        target = folder / path.name
        if large:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # saving with external data rewrites the tensors in place
            onnx.save_model(copy, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=1024)
        else:
            onnx.save_model(model, str(target))
        onnx.checker.check_model(str(target), full_check=True)


def _can_size(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses to size messages over 2 GB
        return False
