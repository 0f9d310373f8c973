"""ConvTranspose: the plain conv over its zero-stuffed input, its statistics, solves and rewrites."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcomp import compress
from onnxcomp.calibration.collect import collect_statistics
from onnxcomp.calibration.patches import im2col
from onnxcomp.config import CompressConfig
from onnxcomp.decompose.factors import CPFactors, Tucker2Factors
from onnxcomp.decompose.solve import Decomposition, layer_problem, solve_layer
from onnxcomp.decompose.svd import output_spectrum, truncate
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import count_macs, find_layers
from onnxcomp.model.transposed import flip_transpose
from onnxcomp.passes import apply_decompositions
from onnxcomp.runtime import make_session

from checks import assert_same_outputs
from models import build


def convtranspose_model(attrs: str, c_in=5, c_out=4, k=(3, 3), size=(5, 6), bias=True, seed=0):
    inputs = "(x, w, b)" if bias else "(x, w)"
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[N, {c_in}, {size[0]}, {size[1]}] x) => (float[N, ?, ?, ?] y) {{
        h = ConvTranspose <{attrs}> {inputs}
        y = Relu (h)
    }}
    """
    weights = {"w": (c_in, c_out, *k)} | ({"b": (c_out,)} if bias else {})
    return build(text, seed, **weights)


CASES = [
    "strides = [2, 3], pads = [1, 0, 2, 1], output_padding = [1, 2], dilations = [1, 2]",
    'strides = [2, 2], auto_pad = "SAME_UPPER"',
    'strides = [3, 2], auto_pad = "SAME_LOWER"',
    'strides = [3, 3], auto_pad = "VALID", output_padding = [1, 0]',
    "strides = [2, 2], output_shape = [9, 10]",  # smaller than the natural 11 x 13: pads from it
    "strides = [2, 2], output_shape = [12, 14]",  # larger: the extra rows and columns at the end
    "pads = [3, 3, 3, 3]",  # pads beyond the kernel's reach: the stuffed input is cropped
]


def _input(n=3, c=5, size=(5, 6), seed=1):
    return np.random.default_rng(seed).standard_normal((n, c, *size)).astype(np.float32)


def _pre_activation(model):
    """The model's ConvTranspose output itself (the Relu hides negative errors)."""
    model.graph.output[0].name = "h"
    return model


@pytest.mark.parametrize("attrs", CASES)
def test_stuffed_conv_equals_convtranspose(attrs):
    model = _pre_activation(convtranspose_model(attrs))
    layer = find_layers(model)[0][0]
    x = _input()
    want = make_session(model).run(None, {"x": x})[0]
    patches = im2col(layer.transposed.stuffed(x.astype(np.float64)), layer.conv)
    got = patches @ layer.weight.T.astype(np.float64) + layer.bias
    n, c_out, h, w = want.shape
    assert patches.shape[0] == n * h * w
    np.testing.assert_allclose(got.reshape(n, h, w, c_out).transpose(0, 3, 1, 2), want, rtol=1e-5, atol=1e-5)


def test_statistics_and_svd_are_the_dense_optimum_of_the_stacked_patches():
    """The collected sums are those of the stuffed input's patches, and the data-aware SVD at rank 2
    is the best rank-2 weight for those patches (centered, the bias corrected), by a dense solve."""
    model = convtranspose_model(CASES[0], c_in=3, c_out=4, k=(2, 2))
    layer = find_layers(model)[0][0]
    x = _input(n=6, c=3)
    stats = collect_statistics(model, [layer], {"x": x}, progress=False, precision="float64")[layer.stats_key]
    patches = im2col(layer.transposed.stuffed(x), layer.conv)
    np.testing.assert_allclose(stats.gram, patches.T @ patches, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(stats.total, patches.sum(axis=0), rtol=1e-10, atol=1e-9)
    assert stats.rows == len(patches)

    solve = CompressConfig.from_options(rank=2).solve
    result = solve_layer(layer_problem(layer, stats), solve)
    W = layer.weight.astype(np.float64)
    centered = patches - patches.mean(axis=0)
    q, r = np.linalg.qr(centered)  # ||centered dW^T|| = ||r dW^T||
    u, s, vt = np.linalg.svd(r @ W.T, full_matrices=False)
    best = np.linalg.lstsq(r, (u[:, :2] * s[:2]) @ vt[:2], rcond=None)[0].T
    np.testing.assert_allclose(result.factors.matrix(), best, rtol=1e-7, atol=1e-8)
    # The corrected bias keeps the output mean: b + (W - W~) mu.
    np.testing.assert_allclose(result.bias, layer.bias + (W - best) @ patches.mean(axis=0), rtol=1e-7, atol=1e-8)


def _full_rank_svd(layer):
    W = layer.weight.astype(np.float64)
    factors = truncate(W, output_spectrum(W, None), min(W.shape))
    bias = None if layer.bias is None else layer.bias.astype(np.float64)
    return Decomposition("svd", factors, bias, (factors.rank,), 0, 0, None, None)


def _full_rank_tucker2(layer, seed=5):
    """Orthogonal factors at full rank, the weight as core: the chain is the original layer."""
    c_out, c_in, (kh, kw) = layer.out_features, layer.in_channels, layer.kernel
    rng = np.random.default_rng(seed)
    q_out, _ = np.linalg.qr(rng.standard_normal((c_out, c_out)))
    q_in, _ = np.linalg.qr(rng.standard_normal((c_in, c_in)))
    W = layer.weight.astype(np.float64).reshape(c_out, c_in, kh, kw)
    core = np.einsum("oa,oikl,ib->abkl", q_out, W, q_in)
    bias = None if layer.bias is None else layer.bias.astype(np.float64)
    return Decomposition("tucker2", Tucker2Factors(q_out, core, q_in), bias, (c_out, c_in), 0, 0, None, None)


@pytest.mark.parametrize("attrs", CASES)
@pytest.mark.parametrize("method", ["svd", "tucker2"])
def test_full_rank_rewrite_equals_the_original(attrs, method):
    model = _pre_activation(convtranspose_model(attrs))
    layer = find_layers(model)[0][0]
    decomposition = (_full_rank_svd if method == "svd" else _full_rank_tucker2)(layer)
    compressed = apply_decompositions(model, [(layer, decomposition)])
    onnx.checker.check_model(compressed, full_check=True)
    ops = [n.op_type for n in compressed.graph.node]
    assert ops == (["ConvTranspose", "Conv"] if method == "svd" else ["Conv", "ConvTranspose"])  # the Relu is cut off
    assert_same_outputs(model, compressed, {"x": _input()}, rtol=1e-4, atol=1e-4, scale_atol=True)


@pytest.mark.parametrize("method", ["svd", "tucker2"])
@pytest.mark.parametrize("bias", [True, False])
def test_rank_reduced_rewrite_is_a_valid_model(method, bias):
    model = convtranspose_model(CASES[1], c_in=8, c_out=8, bias=bias)
    x = _input(n=40, c=8)
    compressed, report = compress(model, {"x": x}, keep=0.5, method=method, progress=False)
    onnx.checker.check_model(compressed, full_check=True)
    assert "ConvTranspose" in [n.op_type for n in compressed.graph.node]
    assert [r.status for r in report.layers] == ["compressed"]
    before, after = make_session(model).run(None, {"x": x[:4]}), make_session(compressed).run(None, {"x": x[:4]})
    assert [o.name for o in compressed.graph.output] == [o.name for o in model.graph.output]
    assert [a.shape for a in after] == [b.shape for b in before]
    assert all(np.isfinite(a).all() for a in after)
    assert report.totals["macs_after"] < report.totals["macs_before"]


def test_macs_count_every_input_pixel_times_the_weight():
    model = convtranspose_model(CASES[0])
    assert count_macs(model, {"x": [1, 5, 5, 6]}) == 5 * 6 * (5 * 4 * 3 * 3)


def test_grouped_and_1d_convtranspose_are_skipped_with_their_reason():
    grouped = build("""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[N, 4, 5, 5] x) => (float[N, ?, ?, ?] y) {
        y = ConvTranspose <group = 2, strides = [2, 2]> (x, w)
    }
    """, w=(4, 3, 3, 3))
    layers, skipped = find_layers(grouped)
    assert layers == [] and [s.reason for s in skipped] == ["grouped ConvTranspose (group=2)"]
    one_d = build("""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[N, 4, 5] x) => (float[N, ?, ?] y) {
        y = ConvTranspose <strides = [2]> (x, w)
    }
    """, w=(4, 3, 3))
    assert [s.reason for s in find_layers(one_d)[1]] == ["1-D ConvTranspose (only 2-D is supported)"]


@pytest.mark.parametrize("attrs", CASES)
@pytest.mark.parametrize("form", ["3way", "4way"])
def test_cp_chain_computes_its_reconstruction(attrs, form):
    """Random CP factors: the chain equals the dense ConvTranspose with the reconstruction's weight
    mapped back (flip_transpose), the bias included. 4way refuses an output_shape."""
    model = _pre_activation(convtranspose_model(attrs))
    layer = find_layers(model)[0][0]
    (c_out, c_in, (kh, kw)), rank = (layer.out_features, layer.in_channels, layer.kernel), 3
    rng = np.random.default_rng(3)
    spatial = {"h": rng.standard_normal((kh, rank)), "v": rng.standard_normal((kw, rank))} if form == "4way" \
        else {"kernel": rng.standard_normal((rank, kh, kw))}
    factors = CPFactors(form, rng.standard_normal((c_out, rank)), rng.standard_normal((c_in, rank)), **spatial)
    bias = rng.standard_normal(c_out)
    decomposition = Decomposition("cp", factors, bias, (rank,), 0, 0, None, None)
    if form == "4way" and "output_shape" in attrs:
        with pytest.raises(OnnxcompError, match="use --cp-form 3way"):
            apply_decompositions(model, [(layer, decomposition)])
        return
    compressed = apply_decompositions(model, [(layer, decomposition)])
    onnx.checker.check_model(compressed, full_check=True)
    middle = ["ConvTranspose"] * (2 if form == "4way" else 1)
    assert [n.op_type for n in compressed.graph.node] == ["Conv", *middle, "Conv"]
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    for i, tensor in enumerate(reference.graph.initializer):
        value = {"w": flip_transpose(factors.weight()), "b": bias}[tensor.name]
        reference.graph.initializer[i].CopyFrom(numpy_helper.from_array(value.astype(np.float32), tensor.name))
    assert_same_outputs(reference, compressed, {"x": _input()}, rtol=1e-4, atol=1e-4, scale_atol=True)


def test_cp_compresses_a_convtranspose():
    model = convtranspose_model(CASES[1], c_in=8, c_out=8)
    x = _input(n=40, c=8)
    compressed, report = compress(model, {"x": x}, keep=0.5, method="cp", progress=False)
    onnx.checker.check_model(compressed, full_check=True)
    assert [r.status for r in report.layers] == ["compressed"]
    assert all(np.isfinite(a).all() for a in make_session(compressed).run(None, {"x": x[:4]}))


def test_latency_models_of_a_convtranspose_and_its_chain_run():
    """A latency budget times the layer alone and each candidate's chain: both are ConvTranspose models."""
    from onnxcomp.budget.candidates import Candidate
    from onnxcomp.budget.latency import layer_model

    layer = find_layers(convtranspose_model(CASES[0]))[0][0]
    x = {"x": _input()}
    dense = layer_model(layer, [3, 5, 5, 6])
    chain = layer_model(layer, [3, 5, 5, 6], Candidate("tucker2", (2, 3), 0, 0, 0.0))
    assert [n.op_type for n in dense.graph.node] == ["ConvTranspose"]
    assert [n.op_type for n in chain.graph.node] == ["Conv", "ConvTranspose", "Conv"]
    assert make_session(dense).run(None, x)[0].shape == make_session(chain).run(None, x)[0].shape


def test_mac_budget_with_auto_compresses_a_convtranspose():
    model = convtranspose_model(CASES[1], c_in=16, c_out=16)
    x = _input(n=40, c=16)
    compressed, report = compress(model, {"x": x}, target_macs=0.5, method="auto", progress=False)
    onnx.checker.check_model(compressed, full_check=True)
    assert [r.status for r in report.layers] == ["compressed"]
    assert all(np.isfinite(a).all() for a in make_session(compressed).run(None, {"x": x[:4]}))
