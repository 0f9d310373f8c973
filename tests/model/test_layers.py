"""Finding target layers, their matrices and costs; loading and saving files."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcomp.errors import OnnxcompError
from onnxcomp.model import (
    ConvGeometry,
    count_macs,
    count_params,
    find_layers,
    load_model,
    parse_input_shapes,
    save_model,
    with_input_shapes,
)
from onnxcomp.runtime import make_session

from models import build, conv_model, gemm_model, matmul_model


def test_gemm_matrix_matches_onnxruntime():
    """y = W x + b for every row, with transA/transB/alpha/beta folded in."""
    model = gemm_model("transA = 1, transB = 1, alpha = 0.5, beta = 2.0", trans_a=True, trans_b=True)
    layer = find_layers(model)[0][0]
    a = np.random.default_rng(0).standard_normal((12, 5)).astype(np.float32)
    expected = make_session(model).run(None, {"a": a})[0]
    np.testing.assert_allclose(a.T @ layer.weight.T + layer.bias, expected, rtol=1e-5, atol=1e-5)
    assert layer.trans_a and layer.stats_key == "a|rows T"


def test_matmul_weight_from_constant_node_and_positions():
    layer = find_layers(matmul_model())[0][0]
    assert layer.weight.shape == (9, 12) and layer.positions == 7 and layer.macs() == 7 * 9 * 12


def test_conv_layer_geometry_and_macs():
    model = conv_model("strides = [2, 2], pads = [0, 1, 2, 1]")
    layer = find_layers(model)[0][0]
    assert layer.weight.shape == (8, 6 * 9) and layer.kernel == (3, 3)
    assert layer.conv.output_size(11, 11) == (6, 6) and layer.positions == 36
    assert count_macs(model) == 8 * 54 * 36


def test_same_upper_pads_match_onnx_rule():
    geometry = ConvGeometry(kernel=(3, 3), strides=(2, 2), auto_pad="SAME_UPPER")
    assert geometry.resolve_pads(10, 11) == (0, 1, 1, 1)
    assert ConvGeometry((4, 4), auto_pad="SAME_LOWER").resolve_pads(5, 5) == (2, 2, 1, 1)


def test_unsupported_layers_are_listed_with_reasons():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 4, 8, 8] x, float[1, 8, 8, 4] z) => (float[1, 4, 8, 8] y, float[1, 8, 8, 8] u) {
        y = Conv <group = 4, pads = [1, 1, 1, 1]> (x, wg)
        t = Transpose <perm = [0, 2, 3, 1]> (y)
        u = MatMul (z, t2)
        t2 = Identity (t3)
        t3 = Transpose <perm = [0, 1, 3, 2]> (t)
    }
    """
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "wg"))
    layers, skipped = find_layers(model)
    assert layers == []
    reasons = {s.op_type: s.reason for s in skipped}
    assert "depthwise" in reasons["Conv"] and "not a constant" in reasons["MatMul"]


# A MatMul whose weight reaches it through an Identity (as some exporters write shared weights).
WEIGHT_BEHIND_IDENTITY = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[2, 6] x) => (float[2, 4] y) {
    wi = Identity (w)
    y = MatMul (x, wi)
}
"""


def test_weight_behind_identity_is_constant():
    layer = find_layers(build(WEIGHT_BEHIND_IDENTITY, w=(6, 4)))[0][0]
    assert layer.weight.shape == (4, 6)


def test_shared_weights_are_left_alone_with_a_reason():
    """Compressing one user of a shared weight keeps the weight and adds a chain: more params, not fewer."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] z) {
        y = Conv <pads = [1, 1, 1, 1]> (x, w)
        wi = Identity (w)
        z = Conv <pads = [1, 1, 1, 1]> (y, wi)
    }
    """
    layers, skipped = find_layers(build(text, w=(4, 4, 3, 3)))
    assert layers == [] and len(skipped) == 2
    assert all("shared with 1 other node input" in s.reason for s in skipped)


def test_constant_first_operand_and_convtranspose_are_listed_and_a_branch_layer_found():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[6, 3] x, float[1, 4, 5, 5] img, bool c) => (float[4, 3] y, float[1, 2, 7, 7] t, float[1, 4, 5, 5] s) {
        y = MatMul (w, x)
        t = ConvTranspose <group = 2> (img, wt)
        s = If (c) <
            then_branch = g1 () => (float[1, 4, 5, 5] a) { a = Conv <pads = [1, 1, 1, 1]> (img, wc) },
            else_branch = g2 () => (float[1, 4, 5, 5] b) { b = Identity (img) }
        >
    }
    """
    model = build(text, w=(4, 6), wt=(4, 1, 3, 3), wc=(4, 4, 3, 3))
    layers, skipped = find_layers(model)
    reasons = {s.op_type: s.reason for s in skipped}
    assert [(layer.name, layer.scope[0].describe()) for layer in layers] == [("s/Conv_0", "If 's' then_branch")]
    assert "first operand (W @ x)" in reasons["MatMul"]
    assert reasons["ConvTranspose"] == "grouped ConvTranspose (group=2)"


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(OnnxcompError, match="not found"):
        load_model(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01 definitely not protobuf \xff" * 10)
    with pytest.raises(OnnxcompError, match="cannot read|no ONNX graph"):
        load_model(bad)


def test_save_with_external_data_round_trip(tmp_path):
    model = conv_model()
    target = tmp_path / "m.onnx"
    save_model(model, target, external_data=True)
    assert (tmp_path / "m.onnx.data").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    loaded = load_model(target)
    weights = [numpy_helper.to_array(m.graph.initializer[0]) for m in (loaded, model)]
    assert np.array_equal(*weights)


def test_invalid_model_leaves_no_file(tmp_path):
    model = conv_model()
    model.graph.node[0].input[1] = "missing_weight"
    target = tmp_path / "out.onnx"
    with pytest.raises(onnx.checker.ValidationError):
        save_model(model, target)
    assert list(tmp_path.iterdir()) == []


def test_input_shape_overrides():
    assert parse_input_shapes(["x:1,3,8,8"]) == {"x": [1, 3, 8, 8]}
    with pytest.raises(OnnxcompError, match="bad --input-shape"):
        parse_input_shapes(["x=1,3"])
    with pytest.raises(OnnxcompError, match="model's inputs"):
        with_input_shapes(conv_model(), {"nope": [1]})


def test_params_count_each_weight_once():
    assert count_params(build(WEIGHT_BEHIND_IDENTITY, w=(6, 4))) == 24


def test_macs_of_runtime_reshape_measured_with_onnxruntime():
    """Opset 12 cannot propagate Shape -> Slice -> Concat -> Reshape; one run on a sample can."""
    text = """
    <ir_version: 8, opset_import: ["" : 12]>
    g (float[N, 8, 1, 4] x) => (float[N, 4, 2] y) {
      s = Shape (x)
      st = Constant <value = int64[1] {0}> ()
      en = Constant <value = int64[1] {2}> ()
      h = Slice (s, st, en, st)
      k = Constant <value = int64[1] {-1}> ()
      shp = Concat <axis = 0> (h, k)
      f = Reshape (x, shp)
      t = Transpose <perm = [0, 2, 1]> (f)
      y = MatMul (t, w)
    }
    """
    model = build(text, w=(8, 2))
    assert count_macs(model, {"x": [1, 8, 1, 4]}) is None
    sample = {"x": np.zeros((1, 8, 1, 4), np.float32)}
    assert count_macs(model, {"x": [1, 8, 1, 4]}, sample) == 4 * 8 * 2
