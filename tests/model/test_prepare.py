"""Initializers listed as inputs taken as constants, layer weights folded from constant subgraphs."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import onnxcomp
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import find_layers
from onnxcomp.model.prepare import prepare_model

RNG = np.random.default_rng(0)


def _run(model, feed):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)


def _ir3_mlp():
    """x -> Gemm(W1, b1) -> Relu -> Gemm(W2) with every initializer also a graph input (IR 3, opset 8)."""
    w1, b1, w2 = RNG.standard_normal((16, 12)), RNG.standard_normal(16), RNG.standard_normal((6, 16))
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in ((w1, "W1"), (b1, "b1"), (w2, "W2"))]
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2", "zero"], ["y"], transB=1)]
    inits.append(numpy_helper.from_array(np.zeros(6, np.float32), "zero"))
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 12])]
    inputs += [helper.make_tensor_value_info(t.name, onnx.TensorProto.FLOAT, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "ir3", inputs, [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 6])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=3)


def test_ir3_initializer_inputs_are_constants_and_the_signature_is_kept():
    model = _ir3_mlp()
    data = RNG.standard_normal((96, 12)).astype(np.float32)
    exact, report = onnxcomp.compress(model, data, keep=1.0, progress=False, check_latency=False)
    assert any("listed as graph inputs" in w for w in report.warnings)
    np.testing.assert_allclose(_run(exact, {"x": data})[0], _run(model, {"x": data})[0], rtol=1e-5, atol=1e-5)
    assert [i.name for i in exact.graph.input] == [i.name for i in model.graph.input]

    small, _ = onnxcomp.compress(model, data, rank=2, progress=False, check_latency=False)
    onnx.checker.check_model(small, full_check=True)
    names = [i.name for i in small.graph.input]
    assert names[0] == "x" and "W1" not in names and "W2" not in names  # the replaced weights left the list
    assert small.ir_version == 4  # IR 3 would list every factor as an input
    assert np.isfinite(_run(small, {"x": data})[0]).all()


def test_refuse_keeps_initializer_inputs_overridable():
    data, model = RNG.standard_normal((40, 12)).astype(np.float32), _ir3_mlp()
    with pytest.raises(OnnxcompError, match="graph input with a default"):
        onnxcomp.compress(model, data, rank=2, initializer_inputs="refuse", progress=False, check_latency=False,
                          fail_if_unchanged=True)
    unchanged, report = onnxcomp.compress(model, data, rank=2, initializer_inputs="refuse", progress=False,
                                          check_latency=False)
    assert unchanged == model and "written unchanged" in report.warnings[-1]


def _folded_model():
    """Transpose(W) -> MatMul (older torch Linear) and a ConstantOfShape conv weight."""
    w = RNG.standard_normal((5, 8)).astype(np.float32)
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 3, 6, 6] x, float[N, 7, 8] t) => (float[N, 4, 4, 4] y, float[N, 7, 5] z) {
        shape = Constant <value = int64[4] {4, 3, 3, 3}> ()
        wc = ConstantOfShape <value = float[1] {0.5}> (shape)
        y = Conv (x, wc)
        wt = Transpose <perm = [1, 0]> (w)
        z = MatMul (t, wt)
    }
    """
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(numpy_helper.from_array(w, "w"))
    return model, w


def test_weights_of_constant_subgraphs_are_folded_and_nothing_else_changes():
    model, w = _folded_model()
    prepared = prepare_model(model)
    layers, skipped = find_layers(prepared.model)
    assert not skipped and {layer.op_type for layer in layers} == {"Conv", "MatMul"}
    matmul = next(layer for layer in layers if layer.op_type == "MatMul")
    np.testing.assert_array_equal(matmul.weight, w)  # W of y = W x is the un-transposed weight
    conv = next(layer for layer in layers if layer.op_type == "Conv")
    np.testing.assert_array_equal(conv.weight, np.full((4, 27), 0.5, np.float32))
    assert {n.op_type for n in prepared.model.graph.node} == {"Conv", "MatMul"}  # the folded cones went
    feed = {"x": RNG.standard_normal((2, 3, 6, 6)).astype(np.float32),
            "t": RNG.standard_normal((2, 7, 8)).astype(np.float32)}
    for got, want in zip(_run(prepared.model, feed), _run(model, feed)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert len(model.graph.node) == 5  # the caller's model is untouched


def test_a_dequantized_weight_is_refused_by_name():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 8] x) => (float[N, 4] y) {
        q = Constant <value = int8[8, 4] {1,2,3,4,5,6,7,8,1,2,3,4,5,6,7,8,1,2,3,4,5,6,7,8,1,2,3,4,5,6,7,8}> ()
        s = Constant <value = float {0.1}> ()
        w = DequantizeLinear (q, s)
        y = MatMul (x, w)
    }
    """
    _, skipped = find_layers(prepare_model(onnx.parser.parse_model(text)).model)
    assert len(skipped) == 1 and "DequantizeLinear: a quantized model" in skipped[0].reason


def test_an_unread_ir3_initializer_input_does_not_break_the_working_model():
    """Caffe2-converted zoo models list an initializer no node reads: the working model (no longer
    listing it as an input) must be IR 4, where onnxruntime accepts that."""
    model = _ir3_mlp()
    unread = numpy_helper.from_array(np.zeros((1, 1), np.float32), "queue_0")
    model.graph.initializer.append(unread)
    model.graph.input.append(helper.make_tensor_value_info("queue_0", onnx.TensorProto.FLOAT, [1, 1]))
    data = RNG.standard_normal((40, 12)).astype(np.float32)
    small, _ = onnxcomp.compress(model, data, rank=2, progress=False, check_latency=False)
    names = [i.name for i in small.graph.input]
    assert names[0] == "x" and names[-1] == "queue_0"  # the replaced weights left, the rest in order
    x = data[:5]
    assert np.isfinite(_run(small, {"x": x})[0]).all()
