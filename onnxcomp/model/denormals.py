"""Subnormal ("denormal") float weights: found, counted, set to zero.

A float is subnormal when it is non-zero and below the smallest normal number of its type
(float32: 1.18e-38, float16: 6.1e-5, bfloat16 as float32, float64: 2.2e-308). Paddle exports
often carry dead channels whose weights are subnormal (PP-OCRv4 rec: 31,350 float32 values in
10 tensors); the eigenvectors of a data-aware fit inherit near-zero components for such channels,
which fall below the normal range when the factors are cast to the model's dtype. Many CPUs
compute with subnormal operands through a slow microcode path: one rewritten 1x1 conv of PP-OCRv4
rec took 20.9 ms where a dense conv of its shape took 0.39 ms (reported on a user's CPU; this
project's AMD EPYC machine shows no such penalty).

Setting a float32 subnormal to zero changes the weight by less than 1.2e-38: nothing a model can
see. So everything onnxcomp writes is flushed (:func:`flush_subnormals`, called by the rewrite
passes' ``GraphEditor.constant``); the rest of a model only with ``--flush-denormals``
(:func:`flush_model`). A float16 subnormal is up to 6.1e-5 and is flushed too (the factors of a
float16 model): the same order as float16's rounding of a weight of 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .subgraphs import walk_graphs

# Tensor types whose subnormals are counted and flushed (float8 types are left alone: their
# subnormals are a large part of their range).
FLUSHED_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                 onnx.TensorProto.BFLOAT16}


def smallest_normal(dtype) -> float | None:
    """The smallest positive normal number of a float dtype (None: not a float type onnxcomp flushes)."""
    dtype = np.dtype(dtype)
    if dtype in (np.float16, np.float32, np.float64):
        return float(np.finfo(dtype).smallest_normal)
    if dtype.name == "bfloat16":
        return float(np.finfo(np.float32).smallest_normal)  # bfloat16 has float32's exponent range
    return None


def subnormal_mask(array: np.ndarray) -> np.ndarray | None:
    """Where ``array`` holds non-zero subnormal values (None: not a float type onnxcomp flushes)."""
    tiny = smallest_normal(array.dtype)
    if tiny is None:
        return None
    magnitude = np.abs(array.astype(np.float64, copy=False)) if array.dtype.name == "bfloat16" else np.abs(array)
    return (magnitude < tiny) & (magnitude > 0)


def flush_subnormals(array: np.ndarray) -> tuple[np.ndarray, int]:
    """``array`` with its subnormal values set to (signed) zero, and how many there were.
    The array itself when it has none; a copy otherwise."""
    mask = subnormal_mask(array)
    count = 0 if mask is None else int(mask.sum())
    if not count:
        return array, 0
    flushed = array.copy()
    flushed[mask] = 0
    return flushed, count


@dataclass
class Subnormals:
    """How many subnormal values a model's weights hold, and in how many tensors."""

    values: int = 0
    tensors: int = 0

    def to_dict(self) -> dict:
        return {"values": self.values, "tensors": self.tensors}


def count_subnormals(model: onnx.ModelProto) -> Subnormals:
    """The subnormal values of every float initializer and Constant tensor (subgraphs included)."""
    found = Subnormals()
    for tensor in _weight_tensors(model.graph):
        mask = subnormal_mask(numpy_helper.to_array(tensor))
        count = 0 if mask is None else int(mask.sum())
        found.values += count
        found.tensors += bool(count)
    return found


def flush_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Subnormals]:
    """A copy of ``model`` whose weights hold no subnormal values, and what was flushed."""
    flushed = onnx.ModelProto()
    flushed.CopyFrom(model)
    found = Subnormals()
    for tensor in _weight_tensors(flushed.graph):
        value, count = flush_subnormals(numpy_helper.to_array(tensor))
        if count:
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
            found.values += count
            found.tensors += 1
    return flushed, found


def _weight_tensors(graph: onnx.GraphProto):
    """The float TensorProtos of the graph's initializers and Constant nodes, subgraphs included."""
    for _, g in walk_graphs(graph):
        yield from (t for t in g.initializer if t.data_type in FLUSHED_TYPES)
        for node in g.node:
            for attribute in node.attribute:
                if attribute.HasField("t") and attribute.t.data_type in FLUSHED_TYPES:
                    yield attribute.t


def flush_written(original: onnx.ModelProto, compressed: onnx.ModelProto, flush: bool
                  ) -> tuple[onnx.ModelProto, dict]:
    """The compressed model (``flush``: with every subnormal weight set to 0, ``--flush-denormals``)
    and the report's account: subnormal values in the original, in the written model, flushed."""
    flushed = None
    if flush:
        compressed, flushed = flush_model(compressed)
    return compressed, {"original": count_subnormals(original).to_dict(),
                        "compressed": count_subnormals(compressed).to_dict(),
                        "flushed": None if flushed is None else flushed.to_dict()}
