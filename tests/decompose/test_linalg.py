"""Dense linear algebra and Krylov solves under the solvers, against direct NumPy references (seeded)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.decompose.krylov import cg
from onnxcomp.decompose.linalg import (
    khatri_rao,
    normalize_into,
    orthonormal_basis,
    psd_solve,
    solve_lower,
    spd_inverse,
    unfold,
)


def test_krylov_on_singular_consistent_system():
    rng = np.random.default_rng(10)
    q = np.linalg.qr(rng.standard_normal((40, 40)))[0]
    lam = np.r_[np.geomspace(1, 1e-3, 30), np.zeros(10)]
    a = (q * lam) @ q.T
    b = a @ rng.standard_normal(40)
    res = cg(lambda v: a @ v, b, np.zeros(40), tol=1e-12, maxiter=500)
    assert np.linalg.norm(a @ res.x - b) <= 1e-10 * np.linalg.norm(b)
    assert res.converged


def test_cg_forcing_stops_at_the_relative_drop():
    """With ``rtol_initial`` CG stops once ||r|| <= rtol_initial * ||b - A x0||, and never raises the quadratic."""
    rng = np.random.default_rng(12)
    f = rng.standard_normal((30, 30))
    a = f @ f.T + 0.1 * np.eye(30)
    b, x0 = rng.standard_normal(30), rng.standard_normal(30)
    res = cg(lambda v: a @ v, b, x0, tol=1e-14, rtol_initial=0.3, maxiter=100)
    r0 = np.linalg.norm(b - a @ x0)
    assert res.converged and np.linalg.norm(b - a @ res.x) <= 0.3 * r0 * (1 + 1e-10)

    def quadratic(x):
        return x @ a @ x - 2 * b @ x

    assert quadratic(res.x) <= quadratic(x0)


def test_psd_solve_matches_pseudo_inverse():
    rng = np.random.default_rng(11)
    f = rng.standard_normal((30, 12))
    a = f @ f.T  # rank 12
    b = rng.standard_normal((5, 30)) @ a  # rows in range(A): consistent
    x, y = psd_solve(a, b)
    np.testing.assert_allclose(x, b @ np.linalg.pinv(a, rcond=1e-10, hermitian=True), atol=1e-9)
    np.testing.assert_allclose(y, b @ np.linalg.pinv(a, rcond=1e-10, hermitian=True) @ b.T, atol=1e-8)
    a2 = a + np.eye(30)  # definite: the Cholesky/LU path
    x2, _ = psd_solve(a2, b)
    np.testing.assert_allclose(x2, b @ np.linalg.inv(a2), atol=1e-10)


@pytest.mark.parametrize("trans", [False, True])
def test_solve_lower_matches_dense_solve(trans):
    rng = np.random.default_rng(13)
    f = rng.standard_normal((50, 60))
    lower = np.linalg.cholesky(f @ f.T / 60 + np.eye(50))
    b = rng.standard_normal((50, 7))
    x = solve_lower(lower, b, trans=trans)
    np.testing.assert_allclose(x, np.linalg.solve(lower.T if trans else lower, b), rtol=1e-12, atol=1e-12)


def test_spd_inverse_and_orthonormal_basis():
    rng = np.random.default_rng(14)
    f = rng.standard_normal((20, 25))
    a = f @ f.T
    np.testing.assert_allclose(spd_inverse(a, floor=0.0) @ a, np.eye(20), atol=1e-9)
    u = rng.standard_normal((40, 6)) @ np.diag(np.geomspace(1, 1e-4, 6))
    q = orthonormal_basis(u)
    np.testing.assert_allclose(q.T @ q, np.eye(6), atol=1e-13)
    np.testing.assert_allclose(q @ (q.T @ u), u, atol=1e-12)  # the same span


def test_tensor_helpers_match_their_definitions():
    rng = np.random.default_rng(15)
    a, b, c = rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), rng.standard_normal((2, 4))
    kr = khatri_rao([a, b, c])
    expected = np.stack([np.kron(np.kron(a[:, r], b[:, r]), c[:, r]) for r in range(4)], axis=1)
    np.testing.assert_array_equal(kr, expected)
    assert khatri_rao([a]) is a
    t = rng.standard_normal((3, 5, 2))
    np.testing.assert_array_equal(unfold(t, 1), np.stack([t[:, j, :].ravel() for j in range(5)]))
    other = rng.standard_normal((6, 4))
    f, scaled = normalize_into(b, other)  # unit columns of b, the product other @ b^T unchanged
    np.testing.assert_allclose(np.linalg.norm(f, axis=0), 1.0, rtol=1e-14)
    np.testing.assert_allclose(scaled @ f.T, other @ b.T, rtol=1e-13)
