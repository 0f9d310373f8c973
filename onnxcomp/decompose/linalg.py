"""Backend-neutral linear algebra for the data-aware solvers (Tucker-2, CP).

Everything here takes arrays of one module ``xp`` (numpy or cupy) and uses only
functions both provide: ``xp.linalg.eigh``, ``cholesky``, ``inv``, ``qr``,
``matmul``. No SciPy, so the same code runs on a GPU unchanged.

Contents
- PSD handling, exact and without jitter: :func:`psd_eigh` (eigendecomposition
  with tiny negative eigenvalues clipped to 0: the exact projection onto the
  PSD cone), :func:`prepare_psd` (cheap Cholesky check, projection only where
  needed), :func:`psd_solve` (the minimum-norm/pseudo-inverse solve ``B A^+``),
  :func:`solve_lower` (GEMM-blocked triangular solves; NumPy has none).
- Matrix-free Krylov solvers on arrays of any shape: :func:`cg` (preconditioned
  conjugate gradients) and :func:`minres` (preconditioned MINRES), both with a
  warm start and a relative-residual tolerance.
- The operator family both ALS solvers meet on their input side,
  ``X -> sum_{k,k'} S_{kk'} X M_{kk'}^T`` (:class:`KronBlockOperator`), with
  its nearest-Kronecker-product preconditioner (:class:`KronPreconditioner`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

# ----------------------------------------------------------------------------- helpers


def xp_of(a):
    """numpy or cupy, whichever owns ``a`` (local copy of backend.array_module, no import cycle)."""
    module = type(a).__module__.split(".")[0]
    if module == "cupy":
        import cupy

        return cupy
    return np


def vdot(xp, a, b) -> float:
    """<a, b> over all entries, as a Python float (one device sync on cupy)."""
    return float(xp.vdot(a.ravel(), b.ravel()))


def symmetrize(a):
    return 0.5 * (a + a.T)


def eps_cutoff(w, n: int, rcond: float | None = None) -> float:
    """Numerical-rank cutoff for the eigenvalues ``w`` of an n x n PSD matrix.

    Eigenvalues at or below ``max|w| * n * eps`` are indistinguishable from
    rounding: the pseudo-inverse treats them as exact zeros (as numpy's
    ``matrix_rank`` / ``pinv`` do).
    """
    xp = xp_of(w)
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
    xp = xp_of(a)
    w, v = xp.linalg.eigh(symmetrize(a))
    w = xp.maximum(w, 0.0)
    if descending:
        w = w[::-1]
        v = v[:, ::-1]
    return w, v


def cholesky_or_none(a):
    """Lower Cholesky factor of ``a``, or None when it is not (numerically) positive definite.

    NumPy raises on failure; CuPy may instead return NaNs (its default
    ``linalg`` error mode is 'ignore'): both read as failure here.
    """
    xp = xp_of(a)
    try:
        if xp is np:
            l = np.linalg.cholesky(a)
        else:  # make cuSOLVER's failure flag raise instead of leaving garbage behind
            import cupyx

            with cupyx.errstate(linalg="raise"):
                l = xp.linalg.cholesky(a)
    except Exception:  # numpy.linalg.LinAlgError, cupy's LinAlgError
        return None
    if not bool(xp.isfinite(l).all()):
        return None
    return l


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


@dataclass(kw_only=True)
class SolverRecord:
    """What an alternating-least-squares solver reports besides its factors.

    ``errors[i]`` is the data error under S after sweep i+1 (under S = I when no
    S was given); ``initial_error`` the error of the chosen initialisation;
    ``error`` the final error, evaluated directly as ``tr(dW S dW^T)``;
    ``reference = tr(W S W^T)`` (relative error = error / reference).
    """

    error: float
    initial_error: float
    errors: list[float]
    reference: float
    iterations: int
    converged: bool
    seconds: float
    norm: str = "data"
    init: str = ""
    init_errors: dict = field(default_factory=dict)  # initial candidate -> error after its first closed-form step
    cg_iterations: list[int] = field(default_factory=list)  # per sweep
    timings: dict = field(default_factory=dict)  # seconds per phase
    psd: PSDInfo | None = None

    @property
    def relative_error(self) -> float:
        return self.error / self.reference if self.reference > 0 else 0.0


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
    import time

    t0 = time.perf_counter()
    xp = xp_of(s)
    s = symmetrize(s)
    n = s.shape[0]
    nonzero = xp.any(s != 0, axis=1)
    idx = xp.nonzero(nonzero)[0]
    m = int(idx.shape[0])
    info = PSDInfo(dim=n, support=m, positive_definite=False, projected=False)
    if m == 0 or not check:
        info.seconds = time.perf_counter() - t0
        return s, info
    sub = s[idx][:, idx] if m < n else s
    if cholesky_or_none(sub) is not None:
        info.positive_definite = True
        info.seconds = time.perf_counter() - t0
        return s, info
    w, v = xp.linalg.eigh(sub)
    info.min_eigenvalue = float(w[0])
    neg = w < 0
    info.clipped = int(xp.count_nonzero(neg))
    info.projected = True
    if info.clipped:
        w = xp.maximum(w, 0.0)
        sub = symmetrize((v * w) @ v.T)
        if m < n:
            out = xp.zeros_like(s)
            out[xp.ix_(idx, idx)] = sub
            s = out
        else:
            s = sub
    info.seconds = time.perf_counter() - t0
    return s, info


def solve_lower(l, b, *, trans: bool = False, block: int = 64):
    """Solve ``L X = B`` (or ``L^T X = B`` with ``trans``) for lower-triangular ``L`` (n x n), B (n x m).

    Blocked recursion whose work is GEMMs (n^2 m multiply-adds in all); diagonal
    blocks of at most ``block`` rows are inverted explicitly, which is accurate for
    the well-conditioned factors it is used on (Cholesky factors with cond <= 1e5).
    NumPy has no triangular solve and CuPy's lives in cupyx.scipy: this runs on both.
    """
    xp = xp_of(l)
    n = l.shape[0]
    if n <= block:
        inv = xp.linalg.inv(l)
        return (inv.T if trans else inv) @ b
    h = n // 2
    l11, l21, l22 = l[:h, :h], l[h:, :h], l[h:, h:]
    if not trans:  # [L11 0; L21 L22] [X1; X2] = [B1; B2]
        x1 = solve_lower(l11, b[:h], block=block)
        x2 = solve_lower(l22, b[h:] - l21 @ x1, block=block)
    else:  # [L11^T L21^T; 0 L22^T] [X1; X2] = [B1; B2]
        x2 = solve_lower(l22, b[h:], trans=True, block=block)
        x1 = solve_lower(l11, b[:h] - l21.T @ x2, trans=True, block=block)
    return xp.concatenate([x1, x2], axis=0)


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
    xp = xp_of(a)
    a = symmetrize(a)
    n = a.shape[0]
    if method == "auto":
        l = cholesky_or_none(a)
        if l is not None:
            dl = xp.abs(xp.diagonal(l))
            lo, hi = float(dl.min()), float(dl.max())
            if lo > 0 and (hi / lo) ** 2 < cond_limit:
                zt = solve_lower(l, b.T)  # Z^T = L^-1 B^T
                x = solve_lower(l, zt, trans=True).T  # X^T = L^-T Z^T
                return x, symmetrize(zt.T @ zt)
        method = "eigh"
    if method != "eigh":
        raise ValueError(f"unknown method {method!r}")
    w, v = xp.linalg.eigh(a)
    keep = w > eps_cutoff(w, n)
    vk = v[:, keep] / xp.sqrt(w[keep])
    z = b @ vk  # B A^{+1/2}
    x = z @ vk.T
    y = z @ z.T
    return x, symmetrize(y)


# ----------------------------------------------------------------------------- Krylov


@dataclass
class KrylovResult:
    x: object  # solution, same shape as b
    iterations: int
    residual: float  # final ||b - A x|| / ||b|| (recomputed, not the recursion's estimate)
    initial_residual: float  # ||b - A x0|| / ||b||
    converged: bool
    history: list = field(default_factory=list)  # relative residual (estimate) per iteration


def _identity(r):
    return r


def cg(
    apply_a: Callable,
    b,
    x0=None,
    *,
    r0=None,
    precond: Callable | None = None,
    tol: float = 1e-8,
    rtol_initial: float | None = None,
    maxiter: int | None = None,
    check_every: int = 0,
) -> KrylovResult:
    """Preconditioned conjugate gradients for a symmetric PSD operator.

    ``apply_a(x)`` and ``precond(r)`` (an SPD approximation of A^-1) act on
    arrays of b's shape. Stops when ``||r|| <= tol * ||b||``, or, when
    ``rtol_initial`` is given, also when ``||r|| <= rtol_initial * ||r0||`` (a
    forcing term for inexact inner solves of an outer iteration), or after
    ``maxiter`` products. The system may be singular if it is consistent
    (b in range(A)): CG then converges to a solution. Each iteration decreases
    the quadratic ``<x, A x> - 2 <b, x>`` monotonically, so stopping early never
    makes the iterate worse than the warm start. ``r0 = b - A x0`` may be passed
    when the caller has it more cheaply than one product.
    """
    xp = xp_of(b)
    m_inv = precond or _identity
    bnorm = float(xp.linalg.norm(b.ravel()))
    if maxiter is None:
        maxiter = max(10, b.size)
    if x0 is None:
        x = xp.zeros_like(b)
        r = b.copy()
    else:
        x = x0.copy()
        r = b - apply_a(x) if r0 is None else r0.copy()
    if bnorm == 0.0:
        return KrylovResult(xp.zeros_like(b), 0, 0.0, 0.0, True)
    rnorm = float(xp.linalg.norm(r.ravel()))
    r0 = rnorm / bnorm
    target = tol * bnorm
    if rtol_initial is not None:
        target = max(target, rtol_initial * rnorm)
    history = [r0]
    if rnorm <= target:
        return KrylovResult(x, 0, r0, r0, True, history)
    z = m_inv(r)
    p = z.copy()
    rz = vdot(xp, r, z)
    it = 0
    converged = False
    while it < maxiter:
        q = apply_a(p)
        pq = vdot(xp, p, q)
        if pq <= 0.0:  # only on a singular/inconsistent direction: p is A-null
            break
        alpha = rz / pq
        x += alpha * p
        r -= alpha * q
        it += 1
        if check_every and it % check_every == 0:  # refresh the recursive residual
            r = b - apply_a(x)
        rnorm = float(xp.linalg.norm(r.ravel()))
        history.append(rnorm / bnorm)
        if rnorm <= target:
            converged = True
            break
        z = m_inv(r)
        rz_new = vdot(xp, r, z)
        beta = rz_new / rz
        rz = rz_new
        p = z + beta * p
    return KrylovResult(x, it, rnorm / bnorm, r0, converged, history)


def minres(
    apply_a: Callable,
    b,
    x0=None,
    *,
    precond: Callable | None = None,
    tol: float = 1e-8,
    rtol_initial: float | None = None,
    maxiter: int | None = None,
) -> KrylovResult:
    """Preconditioned MINRES (Paige & Saunders) for a symmetric, possibly indefinite
    or singular operator; ``precond`` must be SPD.

    Minimises the preconditioned residual norm over the Krylov space. The
    stopping test uses the recursion's estimate of ``||r||_{M^-1}`` relative to
    ``||b||_{M^-1}`` (or to the initial residual with ``rtol_initial``); the
    reported final residual is recomputed in the plain 2-norm.
    """
    xp = xp_of(b)
    m_inv = precond or _identity
    bnorm = float(xp.linalg.norm(b.ravel()))
    if maxiter is None:
        maxiter = max(10, 5 * b.size)
    x = xp.zeros_like(b) if x0 is None else x0.copy()
    if bnorm == 0.0:
        return KrylovResult(xp.zeros_like(b), 0, 0.0, 0.0, True)
    r1 = b - apply_a(x) if x0 is not None else b.copy()
    r0 = float(xp.linalg.norm(r1.ravel())) / bnorm
    y = m_inv(r1)
    beta1 = vdot(xp, r1, y)
    if beta1 < 0:
        raise ValueError("minres: preconditioner is not positive definite")
    beta1 = np.sqrt(beta1)
    bm = np.sqrt(max(vdot(xp, b, m_inv(b)), 0.0)) if x0 is not None else beta1
    target = tol * bm
    if rtol_initial is not None:
        target = max(target, rtol_initial * beta1)
    history = [r0]
    if beta1 <= target:
        return KrylovResult(x, 0, r0, r0, True, history)
    oldb, beta, dbar, epsln, phibar = 0.0, beta1, 0.0, 0.0, beta1
    cs, sn = -1.0, 0.0
    w = xp.zeros_like(b)
    w2 = xp.zeros_like(b)
    r2 = r1
    eps = np.finfo(np.float64).eps
    it = 0
    converged = False
    while it < maxiter:
        it += 1
        v = y / beta
        y = apply_a(v)
        if it >= 2:
            y = y - (beta / oldb) * r1
        alfa = vdot(xp, v, y)
        y = y - (alfa / beta) * r2
        r1 = r2
        r2 = y
        y = m_inv(r2)
        oldb = beta
        beta2 = vdot(xp, r2, y)
        if beta2 < 0:
            raise ValueError("minres: preconditioner is not positive definite")
        beta = np.sqrt(beta2)
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = max(np.hypot(gbar, beta), eps)
        cs = gbar / gamma
        sn = beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1 = w2
        w2 = w
        w = (v - oldeps * w1 - delta * w2) / gamma
        x += phi * w
        history.append(phibar / bm if bm else 0.0)
        if phibar <= target:
            converged = True
            break
        if beta <= eps * beta1:  # Krylov space exhausted (exact solution reached)
            converged = True
            break
    rfinal = float(xp.linalg.norm((b - apply_a(x)).ravel())) / bnorm
    return KrylovResult(x, it, rfinal, r0, converged, history)


# ----------------------------------------------------------------------------- Kronecker-block operator


class KronBlockOperator:
    """``X (C x R) -> sum_{k,k'} S_{kk'} X M_{kk'}^T``, i.e. the (C*R)^2 matrix
    ``sum_{k,k'} S_{kk'} (x) M_{kk'}`` applied matrix-free.

    ``S`` is (C*K, C*K) ordered (c, k) and ``M`` is (R*K, R*K) ordered (r, k):
    ``S_{kk'} = S4[:, k, :, k']``. This is the normal operator of every
    "input-channel factor" step of the Tucker-2 and CP ALS under a data norm
    (S = patch covariance, M = Gram of the other factors). One product costs two
    GEMMs: ``K*C*R*K*R`` multiply-adds (X with M) plus ``(C*K)^2 * R`` (S with
    the result), and ``K*C*K*R`` doubles of workspace. The big matrix is never
    formed.
    """

    def __init__(self, s, m, c: int, k: int, r: int):
        xp = xp_of(s)
        self.xp = xp
        self.c, self.k, self.r = c, k, r
        self.s_flat = s.reshape(c, k * c * k)  # rows c, columns (k, c', k'): S's native layout
        # mb[k][r', (k', r)] = M4[r, k, r', k']
        m4 = m.reshape(r, k, r, k)
        self.mb = xp.ascontiguousarray(m4.transpose(1, 2, 3, 0)).reshape(k, r, k * r)
        self.products = 0

    @property
    def flops(self) -> float:
        """Floating-point operations of one product (2 per multiply-add)."""
        c, k, r = self.c, self.k, self.r
        return 2.0 * (k * c * r * k * r + c * (k * c * k) * r)

    def __call__(self, x):
        xp = self.xp
        c, k, r = self.c, self.k, self.r
        q = xp.matmul(x, self.mb)  # (K, C, K*R) = [k, c', k', r]
        self.products += 1
        return self.s_flat @ q.reshape(k * c * k, r)


def kron_blocks(s, c: int, k: int):
    """The K^2 spatial blocks of ``S`` ((C*K)^2, ordered (c, k)) as rows: (K*K, C*C),
    row (k, k') = vec(S_{kk'}). One copy of S."""
    xp = xp_of(s)
    return xp.ascontiguousarray(s.reshape(c, k, c, k).transpose(1, 3, 0, 2)).reshape(k * k, c * c)


def kron_block_gram(s, c: int, k: int, blocks=None):
    """Gram matrix ``<S_{kk'}, S_{ll'}>_F`` of the K^2 blocks of ``S`` ((C*K)^2, ordered (c,k)).

    (K^2 x K^2); with it, the nearest Kronecker product of any block-Kronecker
    sum with these S blocks costs only small dense algebra. ``C^2 K^4`` multiply-adds.
    """
    if blocks is None:
        blocks = kron_blocks(s, c, k)
    return blocks @ blocks.T


def nearest_kron_coefficients(gs, gm):
    """Coefficients of the nearest Kronecker product ``X (x) Y`` to ``sum_j S_j (x) M_j``.

    With ``gs = [<S_i, S_j>]`` and ``gm = [<M_i, M_j>]`` (J x J), the best rank-one
    approximation of the rearranged operator is ``X = sum_j alpha_j S_j``,
    ``Y = sum_j beta_j M_j`` (Van Loan & Pitsianis). Returns (alpha, beta) as
    numpy vectors, scaled so that ``X (x) Y`` is the best approximation itself.
    """
    gs = np.asarray(gs, dtype=np.float64)
    gm = np.asarray(gm, dtype=np.float64)
    ws, es = np.linalg.eigh(0.5 * (gs + gs.T))
    wm, em = np.linalg.eigh(0.5 * (gm + gm.T))
    ks = ws > eps_cutoff(ws, len(ws))
    km = wm > eps_cutoff(wm, len(wm))
    es, ws = es[:, ks], ws[ks]
    em, wm = em[:, km], wm[km]
    core = (np.sqrt(ws)[:, None] * (es.T @ em)) * np.sqrt(wm)[None, :]
    u, sig, vt = np.linalg.svd(core)
    alpha = es @ (u[:, 0] / np.sqrt(ws))
    beta = em @ (vt[0] / np.sqrt(wm))
    return alpha * sig[0], beta


class KronPreconditioner:
    """Inverse of the nearest Kronecker product ``X (x) Y`` of a :class:`KronBlockOperator`.

    ``X = sum alpha_{kk'} S_{kk'}`` (C x C), ``Y = sum beta_{kk'} M_{kk'}`` (R x R),
    both symmetrised, signs fixed and inverted by :func:`spd_inverse` (a relative
    diagonal shift ``floor`` keeps them positive definite: it only shapes the
    preconditioner, never the solution). Applying it is two GEMMs,
    ``C^2 R + C R^2`` multiply-adds. It is exact when S is separable
    (``S = Sc (x) Sk``: then the operator itself is a Kronecker product).
    """

    def __init__(self, s, m, c: int, k: int, r: int, *, s_blocks=None, gs=None, floor: float = 1e-10):
        xp = xp_of(m)
        self.xp = xp
        if s_blocks is None:
            s_blocks = kron_blocks(s, c, k)
        if gs is None:
            gs = kron_block_gram(s, c, k, s_blocks)
        m_blocks = kron_blocks(m, r, k)
        alpha, beta = nearest_kron_coefficients(_host(gs), _host(m_blocks @ m_blocks.T))
        x = symmetrize((xp.asarray(alpha)[None, :] @ s_blocks).reshape(c, c))
        y = symmetrize((xp.asarray(beta)[None, :] @ m_blocks).reshape(r, r))
        if float(xp.trace(x)) < 0:  # X (x) Y is unchanged by flipping both signs
            x, y = -x, -y
        self.x_inv = spd_inverse(x, floor)
        self.y_inv = spd_inverse(y, floor)

    def __call__(self, rhs):
        return (self.x_inv @ rhs) @ self.y_inv


def spd_inverse(a, floor: float = 1e-10):
    """Inverse of a symmetric (nearly) positive definite matrix, for preconditioning.

    Cholesky of ``a + floor * max|diag| * I`` and GEMM-based triangular solves;
    if that fails (indefinite), the eigendecomposition with eigenvalues floored
    at ``floor * max``. Always returns an SPD matrix.
    """
    xp = xp_of(a)
    n = a.shape[0]
    top = float(xp.max(xp.abs(xp.diagonal(a)))) if n else 0.0
    shift = floor * top if top > 0 else 1.0
    eye = xp.eye(n)
    l = cholesky_or_none(a + shift * eye)
    if l is not None:
        li = solve_lower(l, eye)
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
    xp = xp_of(u)
    q = u
    for _ in range(2):
        l = cholesky_or_none(symmetrize(q.T @ q))
        if l is None:
            return xp.linalg.qr(u)[0]
        q = solve_lower(l, q.T).T
    return xp.ascontiguousarray(q)


def _host(a):
    if xp_of(a) is np:
        return np.asarray(a)
    return a.get()
