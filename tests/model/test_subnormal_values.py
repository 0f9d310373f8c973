"""Subnormal weights: counted and flushed exactly as NumPy's own definition says, in every tensor of a model."""

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcomp.model import count_subnormals, flush_model
from onnxcomp.model.denormals import flush_subnormals


def subnormals(array) -> int:
    """The reference: non-zero values below the smallest normal number of the array's float type."""
    tiny = np.finfo(np.float32 if array.dtype == ml_dtypes.bfloat16 else array.dtype).smallest_normal
    magnitude = np.abs(array.astype(np.float64))
    return int(((magnitude > 0) & (magnitude < tiny)).sum())


@pytest.mark.parametrize("dtype, tiny", [(np.float32, 1e-39), (np.float16, 1e-6), (np.float64, 1e-310),
                                         (ml_dtypes.bfloat16, 1e-39)])
def test_flush_sets_exactly_the_subnormals_to_zero(dtype, tiny):
    rng = np.random.default_rng(0)
    values = rng.standard_normal(200)
    values[::7] *= tiny  # subnormal in this dtype (some round to 0, which is not subnormal)
    array = values.astype(dtype)
    expected = subnormals(array)
    assert expected > 10
    flushed, count = flush_subnormals(array)
    assert count == expected and subnormals(flushed) == 0
    normal = np.abs(array.astype(np.float64)) >= np.finfo(np.float32 if dtype == ml_dtypes.bfloat16 else dtype).tiny
    np.testing.assert_array_equal(flushed[normal], array[normal])  # every normal value untouched
    assert (flushed[~normal].astype(np.float64) == 0).all()
    assert subnormals(array) == expected  # the input is not modified
    same, none = flush_subnormals(flushed)
    assert same is flushed and none == 0  # nothing to flush: no copy


def test_integer_and_float8_tensors_are_left_alone():
    for array in (np.arange(5, dtype=np.int64), np.zeros(3, dtype=ml_dtypes.float8_e4m3fn)):
        same, count = flush_subnormals(array)
        assert same is array and count == 0


def _model_with_subnormals():
    """An initializer, a Constant node and a Constant inside an If branch, each with subnormal values."""
    w = np.full((2, 3), 1e-40, np.float32)
    w[0, 0] = 1.0
    c = np.array([1e-39, 2.0, -3e-40], np.float32)
    inner = np.array([5e-41, 1.0], np.float32)
    branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(inner))], "branch", [],
        [onnx.helper.make_tensor_value_info("k", onnx.TensorProto.FLOAT, [2])])
    nodes = [
        onnx.helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(c)),
        onnx.helper.make_node("MatMul", ["x", "w"], ["y0"]),
        onnx.helper.make_node("Add", ["y0", "c"], ["y"]),
        onnx.helper.make_node("If", ["flag"], ["z"], then_branch=branch, else_branch=branch),
    ]
    graph = onnx.helper.make_graph(
        nodes, "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2]),
         onnx.helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, [])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3]),
         onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.arange(3, dtype=np.int64), "ints")])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), (w, c, inner)


def test_model_counts_and_flushes_every_weight_tensor():
    model, arrays = _model_with_subnormals()
    w, c, inner = arrays
    expected = subnormals(w) + subnormals(c) + 2 * subnormals(inner)  # both branches of the If hold a copy
    assert expected == 5 + 2 + 2
    found = count_subnormals(model)
    assert (found.values, found.tensors) == (expected, 4)
    flushed, done = flush_model(model)
    assert (done.values, done.tensors) == (expected, 4)
    assert count_subnormals(flushed).values == 0 and count_subnormals(model).values == expected  # a copy
    onnx.checker.check_model(flushed, full_check=True)
    names = [t.name for t in flushed.graph.initializer]
    assert names == ["w", "ints"] and numpy_helper.to_array(flushed.graph.initializer[0])[0, 0] == 1.0
