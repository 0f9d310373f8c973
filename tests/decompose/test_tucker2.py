"""Data-aware Tucker-2 solver: exactness, monotonicity, baselines, ranks, errors (seeded, < 60 s)."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from onnxcomp.decompose.kron import KronBlockOperator
from onnxcomp.decompose.krylov import cg
from onnxcomp.decompose.linalg import prepare_psd
from onnxcomp.decompose.objective import data_error
from onnxcomp.decompose.ranks import dense_cost
from onnxcomp.decompose.tucker2 import (
    balanced_ranks,
    energy_ranks,
    evbmf,
    evbmf_ranks,
    search_ranks,
    tucker2,
    tucker2_cost,
)
from onnxcomp.decompose.tucker2.problem import Tucker2Problem
from onnxcomp.errors import OnnxcompError

from realistic_stats import (
    decaying_conv_weight,
    im2col_stats,
    realistic_activations,
    realistic_patch_covariance,
)

LAYERS = [(24, 16, 3, 3), (16, 24, 3, 3), (20, 12, 3, 1)]


def layer(shape, seed):
    c_out, c_in, kh, kw = shape
    w = decaying_conv_weight(c_out, c_in, kh, kw, seed)
    s, _ = realistic_patch_covariance(c_in, kh, kw, seed + 100)
    return w, s


def singular_stats(c_in, kh, kw, seed, *, dead=(0,), indefinite=0.0):
    """Rank-deficient S: 64 patches for d = c_in*kh*kw > 64, dead (always-zero) channels,
    and optionally one negative eigenvalue of rounding size (``indefinite`` * ||S||)."""
    acts = realistic_activations(c_in, seed, n_images=4, size=4)
    acts += 0.05 * np.random.default_rng(seed).random(acts.shape)  # every other channel is live
    acts[:, list(dead)] = 0.0
    rows, total, gram = im2col_stats(acts, kh, kw)
    mean = total / rows
    s = gram / rows - np.outer(mean, mean)
    s = 0.5 * (s + s.T)
    if indefinite:
        live = np.any(s != 0, axis=1)
        w, v = np.linalg.eigh(s[np.ix_(live, live)])
        assert abs(w[0]) < 1e-12 * w[-1]  # a null direction of the live block
        v0 = np.zeros(len(s))
        v0[live] = v[:, 0]
        s = s - indefinite * w[-1] * np.outer(v0, v0)
    return s


# ----------------------------------------------------------------------------- ALS


@pytest.mark.parametrize("shape", LAYERS)
def test_errors_never_increase_and_beat_frobenius(shape):
    w, s = layer(shape, seed=1)
    ranks = (max(1, shape[0] // 3), max(1, shape[1] // 3))
    res = tucker2(w, s, ranks, tol=1e-7, max_iter=60)
    errs = [res.initial_error] + res.errors
    assert len(res.errors) == res.iterations >= 2
    assert all(b <= a * (1 + 1e-12) for a, b in pairwise(errs)), errs
    # the data-aware ALS at equal ranks beats the Frobenius baselines under the data norm
    hosvd = tucker2(w, s, ranks, norm="frobenius", max_iter=0)
    hooi = tucker2(w, s, ranks, norm="frobenius", tol=1e-10)
    assert res.error < 0.9 * hosvd.error, (res.error, hosvd.error)
    assert res.error < 0.9 * hooi.error, (res.error, hooi.error)
    assert res.converged


@pytest.mark.parametrize("shape", LAYERS[:2])
def test_reported_error_is_the_direct_evaluation(shape):
    w, s = layer(shape, seed=2)
    res = tucker2(w, s, (5, 4), tol=1e-6)
    direct = data_error(w, s, res.factors.weight())
    assert res.error == pytest.approx(direct, rel=1e-12)
    assert res.errors[-1] == pytest.approx(direct, rel=1e-9)  # closed-form error of the last sweep
    assert res.reference == pytest.approx(data_error(w, s, np.zeros_like(w)), rel=1e-12)
    # the factors are what the result says they are
    f = res.factors
    assert f.u_out.shape == (shape[0], 5) and f.u_in.shape == (shape[1], 4)
    assert f.core.shape == (5, 4, shape[2], shape[3])
    np.testing.assert_allclose(f.u_out.T @ f.u_out, np.eye(5), atol=1e-12)
    np.testing.assert_allclose(f.u_in.T @ f.u_in, np.eye(4), atol=1e-12)


def test_full_ranks_reproduce_the_weight():
    w, s = layer((12, 8, 3, 3), seed=3)
    res = tucker2(w, s, (12, 8))
    assert res.relative_error < 1e-12
    assert np.linalg.norm(res.factors.weight() - w) < 1e-8 * np.linalg.norm(w)
    fro = tucker2(w, s, (12, 8), norm="frobenius")
    assert np.linalg.norm(fro.factors.weight() - w) < 1e-12 * np.linalg.norm(w)


def test_full_input_rank_is_the_data_aware_svd():
    """R_in = C_in: Tucker-2 is the data-aware SVD, whose error is the sum of the
    discarded eigenvalues of W S W^T (exact, also for singular S)."""
    w = decaying_conv_weight(14, 10, 3, 3, 4)
    for s in (layer((14, 10, 3, 3), 4)[1], singular_stats(10, 3, 3, 5)):
        lam = np.linalg.eigvalsh(w.reshape(14, -1) @ s @ w.reshape(14, -1).T)[::-1]
        for r in (3, 7):
            res = tucker2(w, s, (r, 10))
            assert res.error == pytest.approx(lam[r:].sum(), rel=1e-9, abs=1e-12 * lam.sum())


@pytest.mark.parametrize("indefinite", [0.0, 1e-13])
def test_singular_and_slightly_indefinite_stats(indefinite):
    shape = (16, 12, 3, 3)
    w = decaying_conv_weight(*shape, 6)
    s = singular_stats(12, 3, 3, 7, dead=(0, 5), indefinite=indefinite)
    assert np.linalg.matrix_rank(s) <= 64 < s.shape[0] - 2 * 9  # 64 patches: singular beyond the dead rows
    res = tucker2(w, s, (6, 5), tol=1e-5)
    errs = [res.initial_error] + res.errors
    assert all(b <= a * (1 + 1e-12) for a, b in pairwise(errs))
    assert np.isfinite(res.factors.core).all() and np.isfinite(res.factors.u_in).all()
    s_psd, info = prepare_psd(s)
    assert info.support == s.shape[0] - 2 * 9  # the dead channels' rows are identically zero
    assert not info.positive_definite and info.projected  # singular: Cholesky fails, eigh + clip
    if indefinite:
        assert info.clipped >= 1 and info.min_eigenvalue < -0.5 * indefinite * np.abs(s).max()
        assert np.linalg.eigvalsh(s_psd)[0] > -1e-12 * np.abs(s).max()
    assert res.error == pytest.approx(data_error(w, s_psd, res.factors.weight()), rel=1e-9)
    assert res.error <= tucker2(w, s, (6, 5), norm="frobenius").error


# ----------------------------------------------------------------------------- input step vs dense


def dense_normal_matrix(s, g, c, k, r):
    """The (C*R)^2 normal matrix sum_{kk'} S_{kk'} (x) M_{kk'}, M = G^T G, built explicitly."""
    m = g.reshape(g.shape[0], -1)
    m = m.T @ m
    a = np.einsum("akbl,rksl->arbs", s.reshape(c, k, c, k), m.reshape(r, k, r, k))
    return a.reshape(c * r, c * r)


def input_step_system(shape, r_out, r_in, seed):
    """The product's input step at a random orthonormal U_in: (W, S, U_in, U_out, G, (op, rhs, precond, r0))."""
    w, s = layer(shape, seed=seed)
    prob = Tucker2Problem(w, s)
    u_in = np.linalg.qr(np.random.default_rng(seed + 1).standard_normal((shape[1], r_in)))[0]
    u_out, g, _, _ = prob.output_step(u_in, r_out)
    return w, s, u_in, u_out, g, prob.input_system(u_out, g, r_in, u_in)


def test_matrix_free_input_step_matches_dense_solve():
    c_out, c_in, kh, kw = 10, 7, 3, 3
    k, r_out, r_in = 9, 4, 3
    w, s, u_in0, u_out, g, (op, rhs, pre, _) = input_step_system((c_out, c_in, kh, kw), r_out, r_in, seed=8)
    core = g.reshape(r_out, r_in, kh, kw)
    a = dense_normal_matrix(s, core, c_in, k, r_in)
    # right-hand side: b[c, r] = sum_{o,k} (W S)[o, c, k] (U_out G)[o, r, k]
    ws = (w.reshape(c_out, -1) @ s).reshape(c_out, c_in, k)
    h = (u_out @ core.reshape(r_out, -1)).reshape(c_out, r_in, k)
    b = np.einsum("ock,ork->cr", ws, h)
    np.testing.assert_allclose(rhs, b, rtol=0, atol=1e-13 * np.abs(b).max())
    x_dense = np.linalg.solve(a, b.ravel()).reshape(c_in, r_in)
    # the operator itself
    m = core.reshape(r_out, -1).T @ core.reshape(r_out, -1)
    ref = KronBlockOperator(s, m, c_in, k, r_in)
    x = np.random.default_rng(9).standard_normal((c_in, r_in))
    np.testing.assert_allclose(ref(x).ravel(), a @ x.ravel(), rtol=0, atol=1e-13 * np.abs(a).sum(1).max())
    np.testing.assert_allclose(op(x).ravel(), a @ x.ravel(), rtol=0, atol=1e-13 * np.abs(a).sum(1).max())
    for precond in (pre, None):
        sol = cg(op, rhs, x0=u_in0, precond=precond, tol=1e-15, maxiter=2000)
        assert np.linalg.norm(sol.x - x_dense) <= 1e-8 * np.linalg.norm(x_dense), precond


def test_first_residual_from_the_output_step_is_exact():
    """The input step's first residual b - A U_in, taken from the output step's P^T S, is the plain one."""
    _, _, u_in, _, _, (op, rhs, _, res0) = input_step_system((12, 9, 3, 3), 5, 4, seed=21)
    assert res0 is not None
    np.testing.assert_allclose(res0, rhs - op(u_in), rtol=0, atol=1e-12 * np.abs(rhs).max())


def test_kronecker_preconditioner_pays():
    """Fewer CG products to the same residual on a realistic (non-separable) S."""
    _, _, u0, _, _, (op, rhs, pre, _) = input_step_system((32, 24, 3, 3), 8, 8, seed=18)
    plain = cg(op, rhs, x0=u0, tol=1e-8, maxiter=5000)
    prec = cg(op, rhs, x0=u0, precond=pre, tol=1e-8, maxiter=5000)
    assert prec.converged and plain.converged
    assert prec.iterations < 0.25 * plain.iterations, (prec.iterations, plain.iterations)


# ----------------------------------------------------------------------------- ranks


def test_cost_formula_and_balanced_pair():
    assert tucker2_cost(64, 32, 3, 3, 16, 8) == (32 * 8 + 8 * 16 * 9 + 16 * 64, 32 * 8 + 8 * 16 * 9 + 16 * 64)
    assert tucker2_cost(64, 32, 3, 3, 16, 8, in_positions=4).macs == 4 * 32 * 8 + 8 * 16 * 9 + 16 * 64
    for f in (0.1, 0.25, 0.5):
        r_out, r_in = balanced_ranks(64, 32, 3, 3, f)
        assert tucker2_cost(64, 32, 3, 3, r_out, r_in).params <= f * dense_cost(64, 32, 3, 3).params
        assert abs(r_out / r_in - 2.0) < 0.35


@pytest.mark.parametrize("shape,fraction", [((32, 24, 3, 3), 0.25), ((24, 32, 3, 3), 0.4)])
def test_rank_search_respects_budget_and_beats_balanced(shape, fraction):
    w, s = layer(shape, seed=12)
    pick = search_ranks(w, s, fraction, grid=6, refine=2)
    assert pick.cost <= fraction * dense_cost(*shape).params
    assert pick.proxy_error <= pick.balanced_proxy_error
    chosen = tucker2(w, s, pick.ranks, tol=1e-5)
    balanced = tucker2(w, s, pick.balanced, tol=1e-5)
    assert chosen.error <= balanced.error * (1 + 1e-9), (pick.ranks, pick.balanced, chosen.error, balanced.error)
    assert chosen.error <= pick.proxy_error * (1 + 1e-12)  # ALS only improves on the proxy


def test_rank_search_macs_with_stride_and_multiples():
    shape, fraction = (16, 12, 3, 3), 0.3
    w, s = layer(shape, seed=20)
    pick = search_ranks(w, s, fraction, measure="macs", in_positions=4.0, multiple=2, grid=5, refine=0)
    r_out, r_in = pick.ranks
    assert tucker2_cost(*shape, r_out, r_in, in_positions=4.0).macs <= fraction * dense_cost(*shape).macs
    assert r_in % 2 == 0 and (r_out % 2 == 0 or r_out == shape[0])
    assert all(row[1] % 2 == 0 for row in pick.table)


def test_energy_and_evbmf_ranks():
    w, s = layer((24, 16, 3, 3), seed=13)
    assert energy_ranks(w, s, 1.0) == (24, 16)
    lo, hi = energy_ranks(w, s, 0.5), energy_ranks(w, s, 0.99)
    assert 1 <= lo[0] <= hi[0] <= 24 and 1 <= lo[1] <= hi[1] <= 16
    assert energy_ranks(w, None, 0.9, method="entropy")[0] >= 1
    # the data-aware output spectrum: its threshold rank keeps tau of tr(W S W^T)
    r_out, _ = energy_ranks(w, s, 0.9)
    lam = np.linalg.eigvalsh(w.reshape(24, -1) @ s @ w.reshape(24, -1).T)[::-1]
    assert lam[:r_out].sum() >= 0.9 * lam.sum() > lam[: r_out - 1].sum()
    # EVBMF finds the rank of a low-rank matrix in noise
    rng = np.random.default_rng(14)
    y = rng.standard_normal((40, 7)) @ rng.standard_normal((7, 300)) + 0.3 * rng.standard_normal((40, 300))
    assert evbmf(y)[0] == 7
    assert evbmf(y.T)[0] == 7
    core = np.zeros((30, 20, 3, 3))
    core[:6, :4] = rng.standard_normal((6, 4, 3, 3))
    u = np.linalg.qr(rng.standard_normal((30, 30)))[0]
    v = np.linalg.qr(rng.standard_normal((20, 20)))[0]
    wl = np.einsum("oa,cb,abij->ocij", u, v, core) + 0.01 * rng.standard_normal((30, 20, 3, 3))
    assert evbmf_ranks(wl) == (6, 4)


# ----------------------------------------------------------------------------- user errors


def test_bad_input_raises_onnxcomp_error():
    w, s = layer((8, 6, 3, 3), seed=15)
    for ranks in [(0, 2), (2, 0), (9, 2), (2, 7), (-1, 3), "ab", (1,)]:
        with pytest.raises(OnnxcompError):
            tucker2(w, s, ranks)
    with pytest.raises(OnnxcompError):
        tucker2(w, s[:-1, :-1], (2, 2))  # statistics of another layer
    with pytest.raises(OnnxcompError):
        tucker2(w, None, (2, 2))  # norm="data" needs S
    with pytest.raises(OnnxcompError):
        tucker2(w.reshape(8, -1), s, (2, 2))  # not a conv weight
    with pytest.raises(OnnxcompError):
        tucker2(w, s, (2, 2), norm="spectral")
    with pytest.raises(OnnxcompError):
        search_ranks(w, s, 1.5)
    with pytest.raises(OnnxcompError):
        search_ranks(w, s, 1e-4)  # not even ranks (1, 1) fit
    with pytest.raises(OnnxcompError):
        energy_ranks(w, s, 0.0)


def test_frobenius_without_stats_and_explicit_backend():
    w = decaying_conv_weight(12, 10, 3, 3, 16)
    res = tucker2(w, None, (4, 3), norm="frobenius", xp=np)
    # HOOI never loses to its HOSVD start
    assert res.error <= res.initial_error * (1 + 1e-12)
    f = res.factors
    assert res.error == pytest.approx(np.linalg.norm(w - f.weight()) ** 2, rel=1e-9)
    # W~ = U_out . G . (U_in kron I)^T, summed out directly
    np.testing.assert_allclose(f.weight(), np.einsum("oa,abij,cb->ocij", f.u_out, f.core, f.u_in), atol=1e-14)


def test_cupy_backend_if_available():
    cupy = pytest.importorskip("cupy")
    from onnxcomp.decompose.backend import cupy_or_none

    if cupy_or_none() is None:
        pytest.skip("no CUDA device")
    w, s = layer((16, 12, 3, 3), seed=17)
    a = tucker2(w, s, (5, 4), xp=cupy, tol=1e-8)
    b = tucker2(w, s, (5, 4), xp=np, tol=1e-8)
    assert isinstance(a.factors.core, np.ndarray)
    assert a.error == pytest.approx(b.error, rel=1e-6)
