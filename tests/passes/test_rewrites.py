"""Rewrites at full rank must reproduce the original layer through onnxruntime."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcomp.decompose.factors import Tucker2Factors
from onnxcomp.decompose.solve import Decomposition
from onnxcomp.decompose.svd import output_spectrum, truncate
from onnxcomp.model import find_layers
from onnxcomp.passes import apply_decompositions
from onnxcomp.runtime import make_session

from checks import assert_same_outputs
from models import conv_model, conv_nd_model, gemm_model, matmul_model


def full_rank_plan(model, bias_shift=None):
    layers, _ = find_layers(model)
    plan = []
    for layer in layers:
        W = layer.weight.astype(np.float64)
        factors = truncate(W, output_spectrum(W, None), min(W.shape))
        bias = None if layer.bias is None else layer.bias.astype(np.float64)
        if bias_shift is not None:
            bias = (0 if bias is None else bias) + bias_shift[: W.shape[0]]
        plan.append((layer, Decomposition("svd", factors, bias, (factors.rank,), 0, 0, None, None)))
    return plan


def run(model, feeds):
    return make_session(model).run(None, feeds)[0]


def check_full_rank(model, feeds):
    compressed = apply_decompositions(model, full_rank_plan(model))
    onnx.checker.check_model(compressed, full_check=True)
    assert [i.name for i in compressed.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in compressed.graph.output] == [o.name for o in model.graph.output]
    assert compressed.opset_import == model.opset_import and compressed.ir_version == model.ir_version
    assert_same_outputs(model, compressed, feeds, rtol=1e-5, atol=1e-5, scale_atol=True)
    return compressed


CONV_CASES = [
    "pads = [1, 1, 1, 1]",
    "strides = [2, 2], pads = [0, 1, 2, 1]",
    "dilations = [2, 2], pads = [2, 0, 1, 2]",
    'auto_pad = "SAME_UPPER", strides = [2, 2]',
    'auto_pad = "SAME_LOWER"',
    'auto_pad = "VALID", strides = [1, 2]',
]


@pytest.mark.parametrize("attrs", CONV_CASES)
def test_conv_full_rank(attrs):
    x = np.random.default_rng(0).standard_normal((2, 6, 11, 11)).astype(np.float32)
    compressed = check_full_rank(conv_model(attrs), {"x": x})
    ops = [n.op_type for n in compressed.graph.node]
    assert ops == ["Conv", "Conv", "Relu"]


@pytest.mark.parametrize("trans_a,trans_b,attrs", [
    (False, False, ""),
    (True, False, "transA = 1"),
    (False, True, "transB = 1, alpha = 0.5, beta = 2.0"),
    (True, True, "transA = 1, transB = 1, alpha = 1.5"),
])
def test_gemm_full_rank(trans_a, trans_b, attrs):
    model = gemm_model(attrs, trans_a=trans_a, trans_b=trans_b)
    shape = (12, 5) if trans_a else (5, 12)
    check_full_rank(model, {"a": np.random.default_rng(1).standard_normal(shape).astype(np.float32)})


def test_matmul_constant_node_full_rank_with_bias():
    model = matmul_model()
    x = np.random.default_rng(2).standard_normal((3, 7, 12)).astype(np.float32)
    check_full_rank(model, {"x": x})
    # A bias correction on a bias-free MatMul becomes an Add after the two MatMuls.
    shift = np.arange(9, dtype=np.float64)
    compressed = apply_decompositions(model, full_rank_plan(model, bias_shift=shift))
    assert [n.op_type for n in compressed.graph.node] == ["MatMul", "MatMul", "Add"]
    np.testing.assert_allclose(run(compressed, {"x": x}), run(model, {"x": x}) + shift, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("attrs", CONV_CASES)
def test_tucker2_full_rank(attrs):
    """Orthogonal factors and the weight as core: the chain is the original conv (the output side,
    at full rank, folded into the core: 1x1 -> kxk)."""
    model = conv_model(attrs)
    layer = find_layers(model)[0][0]
    c_out, c_in, (kh, kw) = layer.out_features, layer.in_channels, layer.kernel
    rng = np.random.default_rng(5)
    q_out, _ = np.linalg.qr(rng.standard_normal((c_out, c_out)))
    q_in, _ = np.linalg.qr(rng.standard_normal((c_in, c_in)))
    W = layer.weight.astype(np.float64).reshape(c_out, c_in, kh, kw)
    core = np.einsum("oa,oikl,ib->abkl", q_out, W, q_in)  # W = q_out . core . q_in^T on each mode
    factors = Tucker2Factors(q_out, core, q_in)
    decomposition = Decomposition("tucker2", factors, layer.bias.astype(np.float64), (c_out, c_in), 0, 0, None, None)
    compressed = apply_decompositions(model, [(layer, decomposition)])
    onnx.checker.check_model(compressed, full_check=True)
    assert [n.op_type for n in compressed.graph.node] == ["Conv", "Conv", "Relu"]
    x = np.random.default_rng(0).standard_normal((2, 6, 11, 11)).astype(np.float32)
    assert_same_outputs(model, compressed, {"x": x}, rtol=1e-5, atol=1e-5, scale_atol=True)


@pytest.mark.parametrize("attrs", CONV_CASES)
@pytest.mark.parametrize("ranks, convs", [((8, 3), 2), ((5, 6), 2), ((5, 3), 3)])
def test_tucker2_chain_computes_its_reconstruction(attrs, ranks, convs):
    """Any ranks: the rewritten conv computes the factors' reconstruction W~ (as a dense conv with W~
    in onnxruntime); a side at full rank (8 of 8 outputs, 6 of 6 inputs) is folded: two convs, and the
    graph holds exactly the weights Tucker2Factors.params counts."""
    model = conv_model(attrs)
    layer = find_layers(model)[0][0]
    (c_out, c_in, kh, kw), (r_out, r_in) = (layer.out_features, layer.in_channels, *layer.kernel), ranks
    rng = np.random.default_rng(7)
    factors = Tucker2Factors(np.linalg.qr(rng.standard_normal((c_out, r_out)))[0], rng.standard_normal(
        (r_out, r_in, kh, kw)) / 4, np.linalg.qr(rng.standard_normal((c_in, r_in)))[0])
    bias = rng.standard_normal(c_out)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    for i, tensor in enumerate(reference.graph.initializer):  # the dense conv with W~ and the bias
        value = {"w": factors.weight(), "b": bias}[tensor.name]
        reference.graph.initializer[i].CopyFrom(numpy_helper.from_array(value.astype(np.float32), tensor.name))
    decomposition = Decomposition("tucker2", factors, bias, ranks, 0, 0, None, None)
    compressed = apply_decompositions(model, [(layer, decomposition)])
    onnx.checker.check_model(compressed, full_check=True)
    assert [n.op_type for n in compressed.graph.node] == ["Conv"] * convs + ["Relu"]
    written = sum(t.dims[0] * int(np.prod(t.dims[1:])) for t in compressed.graph.initializer if len(t.dims) == 4)
    assert written == factors.params
    x = rng.standard_normal((2, 6, 11, 11)).astype(np.float32)
    assert_same_outputs(reference, compressed, {"x": x}, rtol=1e-5, atol=1e-5, scale_atol=True)


ND_CASES = [
    (1, "pads = [1, 2]"),
    (1, "strides = [2], dilations = [3], pads = [2, 0]"),
    (1, 'auto_pad = "SAME_LOWER", strides = [2]'),
    (3, "pads = [1, 0, 1, 1, 1, 0]"),
    (3, 'auto_pad = "SAME_UPPER", strides = [2, 1, 2]'),
    (3, "strides = [1, 2, 1], dilations = [2, 1, 1]"),
]


def _nd_feed(dims, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((2, 4, *[9 if dims == 1 else 6] * dims)).astype(np.float32)}


@pytest.mark.parametrize("dims,attrs", ND_CASES)
def test_conv1d_and_conv3d_full_rank(dims, attrs):
    model = conv_nd_model(dims, attrs, size=9 if dims == 1 else 6, relu=True)
    compressed = check_full_rank(model, _nd_feed(dims))
    assert [n.op_type for n in compressed.graph.node] == ["Conv", "Conv", "Relu"]


@pytest.mark.parametrize("dims,attrs", ND_CASES)
def test_conv1d_and_conv3d_tucker2_chain(dims, attrs):
    """Orthonormal factors (R_out = C_out - 1, R_in = C_in) and the projected weight as the solver's
    1 x K core: the chain, in the conv's own dims, computes the conv with that output direction
    removed (the full input side folded into the k core: two convs)."""
    model = conv_nd_model(dims, attrs, size=9 if dims == 1 else 6, relu=True)
    layer = find_layers(model)[0][0]
    c_out, c_in = layer.out_features, layer.in_channels
    rng = np.random.default_rng(6)
    q_out, _ = np.linalg.qr(rng.standard_normal((c_out, c_out - 1)))  # R_out < C_out: three convs
    q_in, _ = np.linalg.qr(rng.standard_normal((c_in, c_in)))
    W = layer.weight.astype(np.float64).reshape(c_out, c_in, -1)
    projected = np.einsum("oa,pa,pik->oik", q_out, q_out, W)  # W with one output direction removed
    core = np.einsum("oa,oik,ib->abk", q_out, W, q_in).reshape(c_out - 1, c_in, 1, -1)  # the solver's 1 x K
    factors = Tucker2Factors(q_out, core, q_in)
    decomposition = Decomposition("tucker2", factors, layer.bias.astype(np.float64), factors.ranks, 0, 0, None, None)
    compressed = apply_decompositions(model, [(layer, decomposition)])
    onnx.checker.check_model(compressed, full_check=True)
    assert [n.op_type for n in compressed.graph.node] == ["Conv", "Conv", "Relu"]  # the input side folded
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    index = next(i for i, t in enumerate(reference.graph.initializer) if t.name == "w")
    reference.graph.initializer[index].CopyFrom(numpy_helper.from_array(
        projected.reshape(c_out, c_in, *layer.kernel).astype(np.float32), "w"))
    assert_same_outputs(reference, compressed, _nd_feed(dims, 1), rtol=1e-4, atol=1e-5, scale_atol=True)


def test_bias_correction_folds_into_following_add():
    """MatMul + Add(constant) as exporters write Linear: no extra Add node, the shift lands in the bias."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[N, 7, 12] x) => (float[N, 7, 9] y) {
        b = Constant <value = float[9] {1, 2, 3, 4, 5, 6, 7, 8, 9}> ()
        h = MatMul (x, w)
        y = Add (b, h)
    }
    """
    from models import build

    model = build(text, w=(12, 9))
    shift = np.linspace(-1, 1, 9)
    compressed = apply_decompositions(model, full_rank_plan(model, bias_shift=shift))
    assert [n.op_type for n in compressed.graph.node] == ["MatMul", "MatMul", "Add"]
    x = np.random.default_rng(3).standard_normal((2, 7, 12)).astype(np.float32)
    np.testing.assert_allclose(run(compressed, {"x": x}), run(model, {"x": x}) + shift, rtol=1e-5, atol=1e-5)


def test_the_callers_model_is_not_changed():
    """onnx-graphsurgeon's export once wrote names into the Constant tensors it imported: the model
    passed in changed (its fingerprint too, so its statistics were refused by the next compress)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[N, 6, 11, 11] x) => (float[N, 8, 121] y) {
        h = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        s = Constant <value = int64[3] {0, 8, -1}> ()
        y = Reshape (h, s)
    }
    """
    from onnxcomp.model import fingerprint

    from models import build

    model = build(text, w=(8, 6, 3, 3), b=(8,))
    # as onnx.helper writes it (the parser sets the tensor's name to "" itself)
    model.graph.node[1].attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(np.array([0, 8, -1], np.int64)))
    assert not model.graph.node[1].attribute[0].t.HasField("name")
    before, print_before = model.SerializeToString(), fingerprint(model)
    apply_decompositions(model, full_rank_plan(model))
    assert model.SerializeToString() == before and fingerprint(model) == print_before


def test_an_opset_6_matmul_is_fitted_uncentered_and_runs_in_onnxruntime():
    """Before opset 7 onnxruntime has no Add: the chain must not need one. The uncentered data-aware
    optimum is [W S^1/2]_r S^-1/2 with S the raw second moment (a dense NumPy solve)."""
    import onnxcomp

    rng = np.random.default_rng(5)
    weight = rng.standard_normal((6, 4)).astype(np.float32)  # x @ weight
    model = onnx.parser.parse_model("""
        <ir_version: 3, opset_import: ["" : 6]>
        g (float[N, 6] x) => (float[N, 4] y) { y = MatMul(x, w) }
        """)
    model.graph.initializer.append(numpy_helper.from_array(weight, "w"))
    x = (rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6)) + 2.0).astype(np.float32)  # off-centre
    stats = onnxcomp.calibrate(model, x, progress=False, precision="float64")
    small, report = onnxcomp.compress(model, stats=stats, rank=2, norm="data", progress=False, check_latency=False)
    assert "fitted uncentered" in " ".join(report.warnings)
    assert "Add" not in {n.op_type for n in small.graph.node}
    got = make_session(small).run(None, {"x": x})[0]
    second = x.astype(np.float64).T @ x.astype(np.float64) / len(x)
    values, vectors = np.linalg.eigh(second)
    root = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    u, s, vt = np.linalg.svd(weight.T.astype(np.float64) @ root)
    best = (u[:, :2] * s[:2]) @ vt[:2] @ np.linalg.inv(root)
    np.testing.assert_allclose(got, x @ best.T, rtol=1e-4, atol=1e-4 * np.abs(got).max())
