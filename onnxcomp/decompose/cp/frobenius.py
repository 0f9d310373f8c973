"""Plain CP-ALS under the Frobenius norm: the data-free baseline and the initial candidates.

For an N-way tensor T with factors F_0..F_{N-1} (n_m x R), the mode-m step is the
least-squares ``F_m = T_(m) KR(F_others) (hadamard of the others' Grams + lam I)^+``;
the product of the unfolding with the Khatri-Rao (MTTKRP) is taken without
forming the Khatri-Rao. After each step of a mode m > 0 its columns are
normalised and the scales moved into F_0. The HOSVD-style start uses the leading
left singular vectors of each unfolding (random columns beyond the mode size).
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module, to_backend
from ..linalg import (
    khatri_rao,
    normalize_into,
    psd_eigh,
    psd_solve,
    ridge_shift,
    unfold,
    vdot,
)


def frobenius_cp(t, r, *, tol, max_iter, ridge, seed=0, report=None):
    """Plain CP-ALS of the N-way tensor ``t`` (mode 0 solved first). Returns (factors, errors
    (reported by ``report(factors)`` per sweep, or Frobenius), iterations, converged)."""
    xp = array_module(t)
    dims = t.shape
    nm = len(dims)
    unf = [unfold(t, m) for m in range(nm)]
    factors = [xp.zeros((dims[0], r))] + _initial_factors(unf[1:], dims[1:], r, np.random.default_rng(seed))
    fro2 = vdot(t, t)
    grams = [None] + [f.T @ f for f in factors[1:]]
    prev = None
    errors, converged, iterations = [], False, 0
    for _ in range(max_iter):
        for m in range(nm):
            factors[m] = _mode_step(unf, dims, factors, grams, m, ridge)
            if m > 0:
                factors[m], factors[0] = normalize_into(factors[m], factors[0])
                grams[0] = factors[0].T @ factors[0]
            grams[m] = factors[m].T @ factors[m]
        iterations += 1
        dt = unf[0] - factors[0] @ khatri_rao(factors[1:]).T
        fro = vdot(dt, dt)
        errors.append(report(factors) if report is not None else fro)
        if prev is not None and (fro >= prev or (prev - fro) / max(prev, 1e-300) < tol):
            converged = True
            break
        if fro <= 1e-26 * max(fro2, 1e-300):
            converged = True
            break
        prev = fro
    return factors, errors, iterations, converged


def _mode_step(unf, dims, factors, grams, m, ridge):
    """The least-squares factor of mode m with the others fixed."""
    xp = array_module(unf[0])
    r = factors[0].shape[1]
    v = xp.ones((r, r))
    for o in range(len(dims)):
        if o != m:
            v = v * grams[o]
    mt = _mttkrp(unf, dims, factors, m)
    lam = ridge_shift(xp.trace(v), r, ridge)
    f, _ = psd_solve(v + lam * xp.eye(r), mt, method="eigh")
    return f


def _initial_factors(unfoldings, dims, r, rng):
    """HOSVD-style start for modes 1.. : leading left singular vectors, random columns beyond the mode size."""
    out = []
    for t, n in zip(unfoldings, dims):
        xp = array_module(t)
        v = psd_eigh(t @ t.T)[1]
        k = min(r, n)
        f = xp.empty((n, r))
        f[:, :k] = v[:, :k]
        if r > k:
            f[:, k:] = to_backend(xp, rng.standard_normal((n, r - k)))
        out.append(f)
    return out


def _mttkrp(unf, dims, factors, m):
    """sum over all modes but m of T times the other factors (n_m x R), without forming
    their Khatri-Rao product: one GEMM with the largest other mode, then elementwise."""
    nm = len(dims)
    others = [o for o in range(nm) if o != m]
    p = max(others, key=lambda o: dims[o])
    r = factors[p].shape[1]
    rest = [o for o in range(nm) if o != p]
    tp = (factors[p].T @ unf[p]).reshape([r] + [dims[o] for o in rest])  # [r, rest modes]
    letters = "abcdefgh"
    ops, subs = [tp], ["z" + "".join(letters[o] for o in rest)]
    for q in others:
        if q != p:
            ops.append(factors[q])
            subs.append(letters[q] + "z")
    return array_module(tp).einsum(",".join(subs) + "->" + letters[m] + "z", *ops)
