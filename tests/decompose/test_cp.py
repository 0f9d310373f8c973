"""Data-aware CP solver and its rewrite (seeded, small, < 60 s)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcomp import graph
from onnxcomp.decompose.cp import (
    cp_cost,
    cp_data_error,
    cp_decompose,
    cp_max_rank,
    cp_rank_for_fraction,
    cp_reconstruct,
)
from onnxcomp.decompose.solve import Decomposition
from onnxcomp.errors import OnnxcompError
from onnxcomp.evaluate import make_session
from onnxcomp.passes.common import GraphEditor
from onnxcomp.passes.cp import rewrite_cp

from models import conv_model
from realistic_stats import decaying_conv_weight, realistic_patch_covariance

C_OUT, C_IN, K = 8, 6, 3


@pytest.fixture(scope="module")
def realistic():
    s, _ = realistic_patch_covariance(8, 3, 3, 0)
    w = decaying_conv_weight(12, 8, 3, 3, 1)
    return w, s


def exact_factors(form, rank, c_out=C_OUT, c_in=C_IN, kh=K, kw=K, seed=0):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((c_out, rank)), rng.standard_normal((c_in, rank))
    if form == "4way":
        h, v = rng.standard_normal((kh, rank)), rng.standard_normal((kw, rank))
        return cp_reconstruct(a, b, h, v) / np.sqrt(rank * c_in)
    kernel = rng.standard_normal((rank, kh, kw))
    return cp_reconstruct(a, b, kernel=kernel) / np.sqrt(rank * c_in)


# ---------------------------------------------------------------- solver


@pytest.mark.parametrize("form", ["4way", "3way"])
def test_data_error_monotone_and_below_frobenius(realistic, form):
    w, s = realistic
    res = cp_decompose(w, s, 6, form=form, max_iter=40)
    fro = cp_decompose(w, s, 6, form=form, norm="frobenius")
    errors = np.array([res.initial_error] + res.errors)
    assert np.all(np.diff(errors) <= 1e-10 * res.reference), errors
    assert res.error == pytest.approx(res.errors[-1], rel=1e-8)
    assert res.error == pytest.approx(cp_data_error(w, s, res.weight()), rel=1e-10)
    assert res.error < 0.7 * fro.error  # data-aware beats data-free under the data norm
    assert fro.norm == "frobenius" and res.norm == "data"
    shapes = [res.a.shape, res.b.shape] + ([res.h.shape, res.v.shape] if form == "4way" else [res.kernel.shape])
    want = [(12, 6), (8, 6)] + ([(3, 6), (3, 6)] if form == "4way" else [(6, 3, 3)])
    assert shapes == want


def test_singular_covariance_and_cg_path(realistic):
    w, s = realistic
    # rank-deficient S (fewer samples than d) and a channel system large enough for CG
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, s.shape[0])) @ np.linalg.cholesky(s + 1e-9 * np.eye(s.shape[0])).T
    s_sing = x.T @ x / 40
    from onnxcomp.decompose import cp as cpmod

    old = cpmod.EXACT_CHANNEL_LIMIT
    cpmod.EXACT_CHANNEL_LIMIT = 0
    try:
        res = cp_decompose(w, s_sing, 10, max_iter=15)
    finally:
        cpmod.EXACT_CHANNEL_LIMIT = old
    errors = np.array([res.initial_error] + res.errors)
    assert np.all(np.diff(errors) <= 1e-10 * res.reference)
    assert max(res.cg_iterations) > 0
    assert np.isfinite(res.a).all() and res.error < res.initial_error


@pytest.mark.parametrize("form", ["4way", "3way"])
def test_exact_components_recovered(realistic, form):
    _, s = realistic
    w = exact_factors(form, 5, 12, 8)
    res = cp_decompose(w, s, 5, form=form)
    assert res.relative_error < 1e-12
    assert np.abs(res.weight() - w).max() < 1e-6 * np.abs(w).max()


def test_channel_operator_and_preconditioner_match_the_kronecker_forms(realistic):
    """The CP-structured channel operator (one GEMM through S) and its preconditioner
    equal the generic KronBlockOperator / KronPreconditioner built from the explicit Mb."""
    from onnxcomp.decompose import cp as cpm
    from onnxcomp.decompose.linalg import KronBlockOperator, KronPreconditioner

    w, s = realistic
    c, k, r = 8, 9, 6
    rng = np.random.default_rng(4)
    a, x = rng.standard_normal((12, r)), rng.standard_normal((c, r))
    g = cpm._kr(np, [rng.standard_normal((3, r)), rng.standard_normal((3, r))])  # (K, R)
    ata = a.T @ a
    mb = (ata[:, None, :, None] * g.T[:, :, None, None] * g.T[None, None, :, :]).reshape(r * k, r * k)
    prob = cpm._CPData(w, s, np, "4way", 1e-8)
    op, ref = cpm._ChannelOperator(s, g, ata, c), KronBlockOperator(s, mb, c, k, r)
    scale = np.abs(ref(x)).max()
    assert np.abs(op(x) - ref(x)).max() < 1e-12 * scale
    assert np.abs(op.through_s(s @ cpm._kr(np, [x, g])) - ref(x)).max() < 1e-12 * scale
    assert np.abs(prob.channel_matrix(ata, g) @ x.ravel() - ref(x).ravel()).max() < 1e-12 * scale
    pre, pre_ref = cpm._channel_preconditioner(prob, g, ata), KronPreconditioner(s, mb, c, k, r)
    assert np.abs(pre(x) - pre_ref(x)).max() < 1e-9 * np.abs(pre_ref(x)).max()


@pytest.mark.parametrize("case", ["exact channel step", "cg channel step"])
def test_anderson_acceleration_monotone_and_ahead_of_plain_als(realistic, case, monkeypatch):
    """Anderson candidates are kept only when they lower the error, and on realistic
    statistics they leave plain ALS behind after the same number of sweeps."""
    from onnxcomp.decompose import cp as cpm

    if case == "exact channel step":  # C_in R = 64: the channel system is solved exactly
        w, s = realistic
        r = 8
    else:  # C_in R = 256 > the limit set here: preconditioned CG
        s, _ = realistic_patch_covariance(16, 3, 3, 0)
        w = decaying_conv_weight(20, 16, 3, 3, 1)
        r = 16
        monkeypatch.setattr(cpm, "EXACT_CHANNEL_LIMIT", 100)
    fast = cp_decompose(w, s, r, max_iter=40, tol=0.0)
    plain = cp_decompose(w, s, r, max_iter=40, tol=0.0, accelerate=False)
    assert fast.iterations == plain.iterations == 40
    assert plain.accelerated == (0, 0) and fast.accelerated[0] >= 5
    assert (max(fast.cg_iterations) > 0) == (case == "cg channel step")
    errors = np.array([fast.initial_error] + fast.errors)
    assert np.all(np.diff(errors) <= 1e-10 * fast.reference), errors
    assert fast.error == pytest.approx(cp_data_error(w, s, fast.weight()), rel=1e-10)
    assert fast.initial_error == plain.initial_error  # same start: the gain is the acceleration's
    assert fast.error < 0.98 * plain.error  # measured: 0.966 (exact), 0.951 (cg)
    assert len(fast.error_seconds) == fast.iterations and np.all(np.diff(fast.error_seconds) >= 0)
    assert 0 < fast.initial_seconds <= fast.error_seconds[0]


def test_bad_ranks_and_inputs(realistic):
    w, s = realistic
    for bad in (0, -1, 2.5, "x", cp_max_rank(12, 8, 3, 3) + 1):
        with pytest.raises(OnnxcompError):
            cp_decompose(w, s, bad)
    with pytest.raises(OnnxcompError):
        cp_decompose(w, None, 3)
    with pytest.raises(OnnxcompError):
        cp_decompose(w, s[:-1, :-1], 3)
    with pytest.raises(OnnxcompError):
        cp_decompose(w, s, 3, form="2way")


def test_costs_and_rank_for_fraction():
    assert cp_cost(64, 32, 3, 3, 10, "4way") == (32 * 10 + 30 + 30 + 640, 32 * 10 + 30 + 30 + 640)
    assert cp_cost(64, 32, 3, 3, 10, "3way").params == 320 + 90 + 640
    assert cp_cost(64, 32, 3, 3, 10, "3way", in_positions=4).macs == 4 * 320 + 90 + 640
    dense = 64 * 32 * 9
    for form in ("4way", "3way"):
        r = cp_rank_for_fraction(64, 32, 3, 3, 0.25, form=form)
        assert cp_cost(64, 32, 3, 3, r, form).params <= 0.25 * dense < cp_cost(64, 32, 3, 3, r + 1, form).params
    with pytest.raises(OnnxcompError):
        cp_rank_for_fraction(64, 32, 3, 3, 0.0)


# ---------------------------------------------------------------- rewrite through onnxruntime


def model_with_weight(attrs, w, seed=0):
    model = conv_model(attrs, c_in=C_IN, c_out=C_OUT, k=K, size=11, seed=seed)
    for i, init in enumerate(model.graph.initializer):
        if init.name == "w":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(w.astype(np.float32), "w"))
    return model


def rewrite(model, form, rank, w64=None, s=None):
    layers, _ = graph.find_layers(model)
    (layer,) = layers
    kh, kw = layer.kernel
    w = layer.weight.astype(np.float64).reshape(layer.out_features, -1, kh, kw) if w64 is None else w64
    if s is None:
        s = np.eye(w[0].size)
    res = cp_decompose(w, s, rank, form=form)
    bias = None if layer.bias is None else layer.bias.astype(np.float64)
    editor = GraphEditor(model)
    rewrite_cp(editor, layer, Decomposition("cp", res, bias, (rank,), 0, 0, res.error, None))
    out = editor.export()
    onnx.checker.check_model(out, full_check=True)
    return out, res


def run(model, x):
    return make_session(model).run(None, {"x": x})[0]


CONV_CASES = [
    "pads = [1, 1, 1, 1]",
    "pads = [0, 1, 2, 0]",
    "strides = [2, 2], pads = [0, 1, 2, 1]",
    "strides = [2, 1], dilations = [2, 2], pads = [2, 0, 1, 2]",
    'auto_pad = "SAME_UPPER", strides = [2, 2]',
    'auto_pad = "SAME_UPPER", strides = [2, 1]',  # (onnxruntime rejects dilation with SAME_*)
    'auto_pad = "SAME_LOWER", strides = [1, 2]',
    'auto_pad = "VALID", strides = [1, 2]',
]


@pytest.mark.parametrize("form", ["4way", "3way"])
@pytest.mark.parametrize("attrs", CONV_CASES)
def test_rewrite_exact_cp_matches_original(attrs, form):
    w = exact_factors(form, 4)
    w32 = w.astype(np.float32)
    model = model_with_weight(attrs, w32)
    out, res = rewrite(model, form, 4, w32.astype(np.float64))
    assert res.relative_error < 1e-12
    x = np.random.default_rng(1).standard_normal((2, C_IN, 11, 11)).astype(np.float32)
    expected, got = run(model, x), run(out, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    ops = [(n.op_type, next((a.i for a in n.attribute if a.name == "group"), 1)) for n in out.graph.node]
    depthwise = [("Conv", 4)] * (2 if form == "4way" else 1)
    assert ops == [("Conv", 1), *depthwise, ("Conv", 1), ("Relu", 1)]
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]


def test_rewrite_data_aware_recovers_exact_cp_under_realistic_stats():
    s, _ = realistic_patch_covariance(C_IN, 3, 3, 2)
    w = exact_factors("4way", 5).astype(np.float32)
    model = model_with_weight("pads = [1, 1, 1, 1]", w)
    out, res = rewrite(model, "4way", 5, w.astype(np.float64), s)
    assert res.relative_error < 1e-10
    x = np.random.default_rng(2).standard_normal((1, C_IN, 11, 11)).astype(np.float32)
    expected, got = run(model, x), run(out, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
