"""Data-aware CP solver (seeded, small, < 60 s); its rewrite is tested in tests/passes/test_cp_rewrite.py."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.decompose.cp import (
    EXACT_CHANNEL_LIMIT,
    cp_cost,
    cp_decompose,
    cp_max_rank,
    cp_rank_for_fraction,
)
from onnxcomp.decompose.cp.problem import (
    ChannelOperator,
    CPProblem,
    channel_preconditioner,
)
from onnxcomp.decompose.kron import KronBlockOperator, KronPreconditioner
from onnxcomp.decompose.linalg import khatri_rao
from onnxcomp.decompose.objective import data_error
from onnxcomp.errors import OnnxcompError

from realistic_stats import (
    decaying_conv_weight,
    exact_cp_weight,
    realistic_patch_covariance,
)

C_OUT, C_IN, K = 8, 6, 3


@pytest.fixture(scope="module")
def realistic():
    s, _ = realistic_patch_covariance(8, 3, 3, 0)
    w = decaying_conv_weight(12, 8, 3, 3, 1)
    return w, s


def exact_factors(form, rank, c_out=C_OUT, c_in=C_IN, kh=K, kw=K, seed=0):
    return exact_cp_weight(form, rank, c_out, c_in, kh, kw, seed)


# ---------------------------------------------------------------- solver


@pytest.mark.parametrize("form", ["4way", "3way"])
def test_data_error_monotone_and_below_frobenius(realistic, form):
    w, s = realistic
    res = cp_decompose(w, s, 6, form=form, max_iter=40)
    fro = cp_decompose(w, s, 6, form=form, norm="frobenius")
    errors = np.array([res.initial_error] + res.errors)
    assert np.all(np.diff(errors) <= 1e-10 * res.reference), errors
    assert res.error == pytest.approx(res.errors[-1], rel=1e-8)
    assert res.error == pytest.approx(data_error(w, s, res.factors.weight()), rel=1e-10)
    assert res.error < 0.7 * fro.error  # data-aware beats data-free under the data norm
    assert fro.norm == "frobenius" and res.norm == "data"
    f = res.factors
    shapes = [f.a.shape, f.b.shape] + ([f.h.shape, f.v.shape] if form == "4way" else [f.kernel.shape])
    want = [(12, 6), (8, 6)] + ([(3, 6), (3, 6)] if form == "4way" else [(6, 3, 3)])
    assert shapes == want


def test_singular_covariance_and_cg_path(realistic):
    w, s = realistic
    # rank-deficient S (fewer samples than d) and a channel system large enough for CG
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, s.shape[0])) @ np.linalg.cholesky(s + 1e-9 * np.eye(s.shape[0])).T
    s_sing = x.T @ x / 40
    res = cp_decompose(w, s_sing, 10, max_iter=15, exact_channel_limit=0)
    errors = np.array([res.initial_error] + res.errors)
    assert np.all(np.diff(errors) <= 1e-10 * res.reference)
    assert max(res.cg_iterations) > 0
    assert np.isfinite(res.factors.a).all() and res.error < res.initial_error


@pytest.mark.parametrize("form", ["4way", "3way"])
def test_exact_components_recovered(realistic, form):
    _, s = realistic
    w = exact_factors(form, 5, 12, 8)
    res = cp_decompose(w, s, 5, form=form)
    assert res.relative_error < 1e-12
    assert np.abs(res.factors.weight() - w).max() < 1e-6 * np.abs(w).max()


def test_channel_operator_and_preconditioner_match_the_kronecker_forms(realistic):
    """The CP-structured channel operator (one GEMM through S) and its preconditioner
    equal the generic KronBlockOperator / KronPreconditioner built from the explicit Mb."""
    w, s = realistic
    c, k, r = 8, 9, 6
    rng = np.random.default_rng(4)
    a, x = rng.standard_normal((12, r)), rng.standard_normal((c, r))
    g = khatri_rao([rng.standard_normal((3, r)), rng.standard_normal((3, r))])  # (K, R)
    ata = a.T @ a
    mb = (ata[:, None, :, None] * g.T[:, :, None, None] * g.T[None, None, :, :]).reshape(r * k, r * k)
    prob = CPProblem(w, s, "4way", 1e-8)
    op, ref = ChannelOperator(s, g, ata, c), KronBlockOperator(s, mb, c, k, r)
    scale = np.abs(ref(x)).max()
    assert np.abs(op(x) - ref(x)).max() < 1e-12 * scale
    assert np.abs(op.through_s(s @ khatri_rao([x, g])) - ref(x)).max() < 1e-12 * scale
    assert np.abs(prob.channel_matrix(ata, g) @ x.ravel() - ref(x).ravel()).max() < 1e-12 * scale
    pre, pre_ref = channel_preconditioner(prob, g, ata), KronPreconditioner(s, mb, c, k, r)
    assert np.abs(pre(x) - pre_ref(x)).max() < 1e-9 * np.abs(pre_ref(x)).max()


@pytest.mark.parametrize("case", ["exact channel step", "cg channel step"])
def test_anderson_acceleration_monotone_and_ahead_of_plain_als(realistic, case):
    """Anderson candidates are kept only when they lower the error, and on realistic
    statistics they leave plain ALS behind after the same number of sweeps."""
    if case == "exact channel step":  # C_in R = 64: the channel system is solved exactly
        w, s = realistic
        r, limit = 8, EXACT_CHANNEL_LIMIT
    else:  # C_in R = 256 > the limit set here: preconditioned CG
        s, _ = realistic_patch_covariance(16, 3, 3, 0)
        w = decaying_conv_weight(20, 16, 3, 3, 1)
        r, limit = 16, 100
    fast = cp_decompose(w, s, r, max_iter=40, tol=0.0, exact_channel_limit=limit)
    plain = cp_decompose(w, s, r, max_iter=40, tol=0.0, accelerate=False, exact_channel_limit=limit)
    assert fast.iterations == plain.iterations == 40
    assert plain.accelerated == (0, 0) and fast.accelerated[0] >= 5
    assert (max(fast.cg_iterations) > 0) == (case == "cg channel step")
    errors = np.array([fast.initial_error] + fast.errors)
    assert np.all(np.diff(errors) <= 1e-10 * fast.reference), errors
    assert fast.error == pytest.approx(data_error(w, s, fast.factors.weight()), rel=1e-10)
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


@pytest.mark.parametrize("form", ["4way", "3way"])
def test_warm_start_from_factors_continues(realistic, form):
    """``init=CPFactors`` (what a budget's candidate leaves behind) starts where that solve stopped:
    its first closed-form A step can only lower the error, and the sweeps go on from there."""
    w, s = realistic
    first = cp_decompose(w, s, 6, form=form, max_iter=3, tol=0.0)
    warm = cp_decompose(w, s, 6, form=form, init=first.factors, max_iter=3, tol=0.0)
    assert warm.init == "given" and list(warm.init_errors) == ["given"]
    assert warm.initial_error <= first.error * (1 + 1e-10)
    assert warm.error <= warm.initial_error
    assert warm.error == pytest.approx(data_error(w, s, warm.factors.weight()), rel=1e-10)
    other = "3way" if form == "4way" else "4way"
    with pytest.raises(OnnxcompError, match="form"):
        cp_decompose(w, s, 6, form=other, init=first.factors)
    with pytest.raises(OnnxcompError, match="shapes"):
        cp_decompose(w, s, 5, form=form, init=first.factors)
    with pytest.raises(OnnxcompError, match="unknown init"):
        cp_decompose(w, s, 6, form=form, init=(first.factors.a, first.factors.b))

