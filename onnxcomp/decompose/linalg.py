"""Backend-neutral dense linear algebra for the data-aware solvers (Tucker-2, CP).

Every function takes arrays of one module (numpy or cupy, found with
:func:`~.backend.array_module`) and uses only functions both provide
(``eigh``, ``cholesky``, ``inv``, ``qr``, ``matmul``), or SciPy's through
:func:`~.backend.scipy_linalg` (``khatri_rao``), so the same code runs on a GPU
unchanged.

Contents
- PSD handling, exact and without jitter: :func:`psd_eigh` (eigendecomposition
  with tiny negative eigenvalues clipped to 0: the exact projection onto the
  PSD cone), :func:`prepare_psd` (cheap Cholesky check, projection only where
  needed), :func:`psd_solve` (the minimum-norm/pseudo-inverse solve ``B A^+``),
  :func:`solve_lower` (GEMM-blocked triangular solves), :func:`spd_inverse` (for
  preconditioners), :func:`orthonormal_basis` (CholeskyQR2).
- Tensor helpers: :func:`unfold` (mode-n unfolding), :func:`khatri_rao`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import reduce

import numpy as np

from .backend import array_module, scipy_linalg


def vdot(a, b) -> float:
    """<a, b> over all entries, as a Python float (one device sync on cupy)."""
    return float(array_module(a).vdot(a.ravel(), b.ravel()))


def symmetrize(a):
    return 0.5 * (a + a.T)


def eps_cutoff(w, n: int, rcond: float | None = None) -> float:
    """Numerical-rank cutoff for the eigenvalues ``w`` of an n x n PSD matrix.

    Eigenvalues at or below ``max|w| * n * eps`` are indistinguishable from
    rounding: the pseudo-inverse treats them as exact zeros (as numpy's
    ``matrix_rank`` / ``pinv`` do).
    """
    xp = array_module(w)
    top = float(xp.max(xp.abs(w))) if w.size else 0.0
    if rcond is None:
        rcond = n * np.finfo(np.float64).eps
    return top * rcond


# ----------------------------------------------------------------------------- PSD


def psd_eigh(a, *, descending: bool = True):
    """Eigendecomposition of the PSD projection of the symmetric part of ``a``.

    Returns ``(w, V)`` with ``w >= 0`` (negative eigenvalues clipped to 0, which is
    exactly the nearest PSD matrix in Frobenius norm) and orthonormal ``V``;
    largest first by default.
    """
    xp = array_module(a)
    w, v = xp.linalg.eigh(symmetrize(a))
    w = xp.maximum(w, 0.0)
    if descending:
        w = w[::-1]
        v = v[:, ::-1]
    return w, v


def top_eigenvectors(gram, r: int):
    """The ``r`` leading eigenvectors of a symmetric PSD matrix, as contiguous columns."""
    return array_module(gram).ascontiguousarray(psd_eigh(gram)[1][:, :r])


def psd_sqrt(a):
    """``A^{1/2}`` of the PSD projection of a symmetric matrix."""
    w, v = psd_eigh(a)
    return (v * array_module(a).sqrt(w)) @ v.T


def cholesky_or_none(a):
    """Lower Cholesky factor of ``a``, or None when it is not (numerically) positive definite.

    NumPy raises on failure; CuPy may instead return NaNs (its default
    ``linalg`` error mode is 'ignore'): both read as failure here.
    """
    xp = array_module(a)
    try:
        if xp is np:
            lower = np.linalg.cholesky(a)
        else:  # make cuSOLVER's failure flag raise instead of leaving garbage behind
            import cupyx

            with cupyx.errstate(linalg="raise"):
                lower = xp.linalg.cholesky(a)
    except np.linalg.LinAlgError:  # CuPy raises NumPy's LinAlgError too
        return None
    if not bool(xp.isfinite(lower).all()):
        return None
    return lower


def solve_lower(lower, b, *, trans: bool = False, block: int = 64):
    """Solve ``L X = B`` (or ``L^T X = B`` with ``trans``) for lower-triangular ``L`` (n x n), B (n x m).

    Blocked recursion whose work is GEMMs (n^2 m multiply-adds in all); diagonal
    blocks of at most ``block`` rows are inverted explicitly, which is accurate for
    the well-conditioned factors it is used on (Cholesky factors with cond <= 1e5).
    Why not SciPy's ``solve_triangular`` (one trsm): measured on the 2-core machine with
    OpenBLAS's default threads, each small trsm (the CP systems: L 4x4 to 171x171, B with
    32 columns) paid 2-8 ms of thread wake-up, making the CP candidate curves of the digits
    example 2.7x slower (4.0-4.7 s against 1.5-1.8 s) and tests/test_cp_budget.py 3x (20 s
    against 7 s); GEMMs below OpenBLAS's threading threshold run on the calling thread.
    With one BLAS thread both are equally fast (the Tucker-2 512-channel benchmark: the
    output solves take 4.3 s with trsm, 4.7-5.0 s with this).
    """
    xp = array_module(lower)
    n = lower.shape[0]
    if n <= block:
        inv = xp.linalg.inv(lower)
        return (inv.T if trans else inv) @ b
    h = n // 2
    l11, l21, l22 = lower[:h, :h], lower[h:, :h], lower[h:, h:]
    if not trans:  # [L11 0; L21 L22] [X1; X2] = [B1; B2]
        x1 = solve_lower(l11, b[:h], block=block)
        x2 = solve_lower(l22, b[h:] - l21 @ x1, block=block)
    else:  # [L11^T L21^T; 0 L22^T] [X1; X2] = [B1; B2]
        x2 = solve_lower(l22, b[h:], trans=True, block=block)
        x1 = solve_lower(l11, b[:h] - l21.T @ x2, trans=True, block=block)
    return xp.concatenate([x1, x2], axis=0)


@dataclass
class PSDInfo:
    """What :func:`prepare_psd` did to a statistic matrix."""

    dim: int
    support: int  # rows/columns that are not identically zero
    positive_definite: bool  # Cholesky of the support succeeded: used as is
    projected: bool  # eigendecomposed and clipped to the PSD cone
    min_eigenvalue: float | None = None  # before clipping (only when projected)
    clipped: int = 0  # number of negative eigenvalues set to 0
    seconds: float = 0.0


def prepare_psd(s, *, check: bool = True):
    """Symmetrise ``s`` and make it exactly PSD without adding any jitter.

    Rows/columns that are identically zero (dead channels, always-padded taps) are
    left alone: they are PSD already. On the remaining support a Cholesky
    factorisation (1/3 n^3) is tried: if it succeeds the matrix is positive
    definite up to rounding and is returned unchanged. Otherwise (singular, or
    slightly indefinite from rounding) it is eigendecomposed and its negative
    eigenvalues are clipped to 0, the exact projection onto the PSD cone.
    Returns ``(s_psd, PSDInfo)``.
    """
    t0 = time.perf_counter()
    xp = array_module(s)
    s = symmetrize(s)
    n = s.shape[0]
    idx = xp.nonzero(xp.any(s != 0, axis=1))[0]
    m = int(idx.shape[0])
    info = PSDInfo(dim=n, support=m, positive_definite=False, projected=False)
    if m > 0 and check:
        sub = s[idx][:, idx] if m < n else s
        info.positive_definite = cholesky_or_none(sub) is not None
        if not info.positive_definite:
            s = _project_support(s, sub, idx, info)
    info.seconds = time.perf_counter() - t0
    return s, info


def _project_support(s, sub, idx, info: PSDInfo):
    """``s`` with its support block ``sub`` projected onto the PSD cone (recorded in ``info``)."""
    xp = array_module(s)
    w, v = xp.linalg.eigh(sub)
    info.min_eigenvalue = float(w[0])
    info.clipped = int(xp.count_nonzero(w < 0))
    info.projected = True
    if not info.clipped:
        return s
    sub = symmetrize((v * xp.maximum(w, 0.0)) @ v.T)
    if sub.shape[0] == s.shape[0]:
        return sub
    out = xp.zeros_like(s)
    out[xp.ix_(idx, idx)] = sub
    return out


def psd_solve(a, b, *, method: str = "auto", cond_limit: float = 1e10):
    """``X = B A^+`` for a symmetric PSD ``A`` (n x n) and ``B`` (m x n), exactly.

    Returns ``(X, Y)`` with ``Y = X A X^T = B A^+ B^T`` (m x m, symmetric).
    ``method="eigh"``: the pseudo-inverse from the eigendecomposition (eigenvalues
    at rounding level are exact zeros; tiny negative ones are clipped), exact for
    singular A. ``"auto"``: a Cholesky factorisation ``A = L L^T`` decides: if A is
    positive definite with a moderate condition estimate ``(max diag L / min diag
    L)^2 < cond_limit``, ``Z = B L^-T``, ``Y = Z Z^T`` and ``X = Z L^-1`` come from two
    triangular solves (about 1/8 of the cost of eigh), otherwise from the
    eigendecomposition.
    """
    if method not in ("auto", "eigh"):
        raise ValueError(f"unknown method {method!r}")
    a = symmetrize(a)
    if method == "auto":
        lower = _well_conditioned_cholesky(a, cond_limit)
        if lower is not None:
            zt = solve_lower(lower, b.T)  # Z^T = L^-1 B^T
            x = solve_lower(lower, zt, trans=True).T  # X^T = L^-T Z^T
            return x, symmetrize(zt.T @ zt)
    xp = array_module(a)
    w, v = xp.linalg.eigh(a)
    keep = w > eps_cutoff(w, a.shape[0])
    vk = v[:, keep] / xp.sqrt(w[keep])
    z = b @ vk  # B A^{+1/2}
    return z @ vk.T, symmetrize(z @ z.T)


def _well_conditioned_cholesky(a, cond_limit: float):
    """The Cholesky factor of ``a`` when it exists and ``(max diag L / min diag L)^2 < cond_limit``."""
    lower = cholesky_or_none(a)
    if lower is None:
        return None
    dl = array_module(a).abs(lower.diagonal())
    lo, hi = float(dl.min()), float(dl.max())
    return lower if lo > 0 and (hi / lo) ** 2 < cond_limit else None


def spd_inverse(a, floor: float = 1e-10):
    """Inverse of a symmetric (nearly) positive definite matrix, for preconditioning.

    Cholesky of ``a + floor * max|diag| * I`` and GEMM-based triangular solves; if that fails
    (indefinite), the eigendecomposition with eigenvalues floored at
    ``floor * max``. Always returns an SPD matrix.
    """
    xp = array_module(a)
    n = a.shape[0]
    top = float(xp.max(xp.abs(xp.diagonal(a)))) if n else 0.0
    shift = floor * top if top > 0 else 1.0
    eye = xp.eye(n)
    lower = cholesky_or_none(a + shift * eye)
    if lower is not None:
        li = solve_lower(lower, eye)
        return li.T @ li
    w, v = xp.linalg.eigh(a)
    wmax = float(xp.max(xp.abs(w)))
    w = xp.maximum(w, floor * wmax if wmax > 0 else 1.0)
    return (v / w) @ v.T


def orthonormal_basis(u):
    """Orthonormal columns spanning range(u) (n x r, full column rank expected).

    CholeskyQR2: twice (Gram, Cholesky, triangular solve), all GEMMs, accurate
    to rounding for cond(u) up to ~1e7; Householder QR when the Gram is not
    numerically positive definite.
    """
    xp = array_module(u)
    q = u
    for _ in range(2):
        lower = cholesky_or_none(symmetrize(q.T @ q))
        if lower is None:
            return xp.linalg.qr(u)[0]
        q = solve_lower(lower, q.T).T
    return xp.ascontiguousarray(q)


# ----------------------------------------------------------------------------- tensors


def unfold(t, mode: int):
    """Mode-``mode`` unfolding: (n_mode, product of the other sizes), the others in C order."""
    xp = array_module(t)
    return xp.ascontiguousarray(xp.moveaxis(t, mode, 0)).reshape(t.shape[mode], -1)


def khatri_rao(factors):
    """Column-wise Kronecker product of (n_i x R) matrices: rows (i_0, i_1, ...) in C order, columns r."""
    return reduce(scipy_linalg(factors[0]).khatri_rao, factors)


def unit_columns(f):
    """``f`` with unit-norm columns (zero columns left as they are)."""
    return f / _safe_column_norms(f)[None, :]


def normalize_into(f, a):
    """Unit-norm columns of ``f``, the scales moved into ``a``: the product ``a f^T`` is unchanged.
    Returns (f, a)."""
    norms = _safe_column_norms(f)
    return f / norms[None, :], a * norms[None, :]


def _safe_column_norms(f):
    xp = array_module(f)
    norms = xp.sqrt((f * f).sum(axis=0))
    return xp.where(norms > 0, norms, 1.0)


def ridge_shift(diag_sum, n: int, ridge: float) -> float:
    """Tikhonov shift ``ridge`` times the mean diagonal (``diag_sum / n``) of an n x n PSD system."""
    return ridge * max(float(diag_sum), 0.0) / max(n, 1)
