"""Data-aware CP decomposition of a conv weight (pure linear algebra, no ONNX).

Problem (DESIGN.md §1-2). W is (C_out, C_in, kh, kw), d = C_in*kh*kw, S (d x d) the
(possibly singular) covariance of the conv's input patches ordered (c, i, j).
Minimise the data error ``E = tr(dW S dW^T)``, ``dW = (W - W~).reshape(C_out, d)``, over

- ``form="4way"`` (Lebedev et al. 2015): ``W~[o,c,i,j] = sum_r A[o,r] B[c,r] H[i,r] V[j,r]``
  (rewrite: 1x1 C_in -> R, depthwise kh x 1, depthwise 1 x kw, 1x1 R -> C_out);
- ``form="3way"``: ``W~[o,c,i,j] = sum_r A[o,r] B[c,r] K[r,i,j]``
  (rewrite: 1x1 C_in -> R, depthwise kh x kw, 1x1 R -> C_out).

The patch index is a product of "patch modes": (c, i, j) for 4-way, (c, k) with
k = (i, j) for 3-way, each with a factor F_m (n_m x R); ``M^T = KR(F_0, F_1, ...)``
(d x R, Khatri-Rao) and ``W~ = A M``.

Alternating least squares under S, one block at a time, each block's exact
quadratic evaluated before and after its step (a step that would raise the
error is reverted, so the error never increases):

- A (C_out x R): closed form ``A = W S M^T (M S M^T + lam I)^+`` (an R x R system);
- B (channel mode, C_in x R): the normal operator is ``sum_{k,k'} S_kk' (x) Mb_kk'``
  with ``Mb[(r,k),(r',k')] = (A^T A)[r,r'] G[r,k] G[r',k']`` (G = spatial factors);
  a (C_in*R)^2 system: formed and solved exactly when small, else matrix-free
  preconditioned CG (:class:`_ChannelOperator`: one ``d^2 R`` product with S per
  step thanks to the rank-one structure of Mb; nearest-Kronecker preconditioner)
  warm-started at the current B, its first product taken from the A step's ``S M^T``;
- H, V (or K): small normal equations ``N = (P^T S P) .* (A^T A)`` of size
  (n_m*R)^2, formed directly (one ``d^2 R`` product of S with the Khatri-Rao
  of the other patch factors).

``lam = ridge * mean diagonal`` of each system guards against CP degeneracy.
After each factor step its columns are normalised and the scales moved into A.
After each sweep an Anderson-accelerated candidate (:class:`_Anderson`, mixing the
last sweeps' steps) replaces the sweep's result when its exact error is lower: on
a high-rank layer (256 -> 256 3x3, R = 256) plain ALS creeps, still gaining 3e-4
per sweep after 300 sweeps; accelerated it converges in several times fewer sweeps
(benchmarks/cp_layer.py compares both in one run).
Initialisation: Frobenius CP-ALS (the data-free baseline, also ``norm="frobenius"``)
and CP of the data-aware Tucker-2 core, both stopped when their sweeps stop paying
(INIT_TOL); each is followed by the closed-form A step and the better one is kept.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..errors import OnnxcompError
from .backend import to_backend, to_numpy
from .linalg import (
    SolverRecord,
    cg,
    kron_block_gram,
    kron_blocks,
    nearest_kron_coefficients,
    prepare_psd,
    psd_solve,
    spd_inverse,
    symmetrize,
    vdot,
)

__all__ = [
    "CPResult",
    "cp_decompose",
    "cp_reconstruct",
    "cp_data_error",
    "cp_frobenius_als",
    "CPCost",
    "cp_cost",
    "cp_max_rank",
    "cp_rank_for_fraction",
]

FORMS = ("4way", "3way")

# the channel-mode system is formed explicitly (and solved exactly) up to this size
EXACT_CHANNEL_LIMIT = 1024

# The Frobenius CP-ALS behind each initial candidate stops once a sweep gains less
# than INIT_TOL (relative), at most INIT_ITER sweeps: that is where it leaves its fast
# phase (sweep ~14 on the 256-channel benchmark layer). Going deeper into the
# Frobenius optimum does not help the data-aware sweeps (measured: 10-20 init sweeps
# lead to a slightly lower data error 45 sweeps later than 100 or 200 do), but an
# exactly low-rank W keeps gaining ~80% per sweep down to rounding, so it is still
# recovered exactly (which the data error, at ~1e-16 relative resolution, cannot do).
INIT_TOL = 1e-2
INIT_ITER = 100

# sweeps mixed by the Anderson acceleration
ANDERSON_WINDOW = 10


# ============================================================================ result


@dataclass(kw_only=True)
class CPResult(SolverRecord):
    """Factors (NumPy float64) and the solver's record (see :class:`SolverRecord`)."""

    form: str
    a: np.ndarray  # (C_out, R)
    b: np.ndarray  # (C_in, R)
    h: np.ndarray | None  # (kh, R) for 4way
    v: np.ndarray | None  # (kw, R) for 4way
    kernel: np.ndarray | None  # (R, kh, kw) for 3way
    reverted: int = 0  # block steps rejected because they would have raised the error
    error_seconds: list[float] = field(default_factory=list)  # time since the call began at each errors[i]
    initial_seconds: float = 0.0  # setup and initialisation (when initial_error was known)
    accelerated: tuple[int, int] = (0, 0)  # Anderson candidates (kept, tried)

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def weight(self) -> np.ndarray:
        """The approximation W~ (C_out, C_in, kh, kw)."""
        if self.form == "4way":
            return cp_reconstruct(self.a, self.b, self.h, self.v)
        return cp_reconstruct(self.a, self.b, kernel=self.kernel)


def cp_reconstruct(a, b, h=None, v=None, *, kernel=None):
    """``sum_r A[o,r] B[c,r] H[i,r] V[j,r]`` (4way) or ``sum_r A[o,r] B[c,r] K[r,i,j]`` (3way)."""
    if kernel is None:
        return np.einsum("or,cr,ir,jr->ocij", a, b, h, v, optimize=True)
    return np.einsum("or,cr,rij->ocij", a, b, kernel, optimize=True)


def cp_data_error(W, S, W_approx) -> float:
    """tr(dW S dW^T), dW = (W - W~).reshape(C_out, -1); Frobenius when S is None."""
    dw = (np.asarray(W, np.float64) - np.asarray(W_approx, np.float64)).reshape(W.shape[0], -1)
    if S is None:
        return float(np.vdot(dw, dw))
    return float(np.vdot(dw @ np.asarray(S, np.float64), dw))


# ============================================================================ costs and ranks


class CPCost(NamedTuple):
    """Parameters and multiply-adds per output position (bias excluded)."""

    params: int
    macs: float


def _check_form(form):
    if form not in FORMS:
        raise OnnxcompError(f"unknown CP form {form!r}: use '4way' or '3way'")


def cp_cost(C_out, C_in, kh, kw, R, form="4way", in_positions: float = 1.0) -> CPCost:
    """Cost of the CP chain.

    4way: ``params = C_in*R + R*kh + R*kw + R*C_out``; 3way: ``C_in*R + R*kh*kw + R*C_out``.
    MACs per output position are the same except that the first 1x1 conv runs at the
    input resolution (``in_positions`` input positions per output position, e.g.
    stride_h*stride_w) and, for 4way, the vertical depthwise conv at output height
    but input width (counted as ``sqrt(in_positions)``, exact for equal strides).
    """
    _check_form(form)
    if form == "4way":
        params = C_in * R + R * kh + R * kw + R * C_out
        macs = in_positions * C_in * R + math.sqrt(in_positions) * R * kh + R * kw + R * C_out
    else:
        params = C_in * R + R * kh * kw + R * C_out
        macs = in_positions * C_in * R + R * kh * kw + R * C_out
    return CPCost(int(params), float(macs))


def cp_max_rank(C_out, C_in, kh, kw, form="4way") -> int:
    """Largest rank accepted: the trivial CP-rank bound prod(dims) / max(dims)
    (any tensor of these dimensions is exactly a sum of that many components)."""
    _check_form(form)
    dims = (C_out, C_in, kh, kw) if form == "4way" else (C_out, C_in, kh * kw)
    return int(np.prod(dims) // max(dims))


def cp_rank_for_fraction(C_out, C_in, kh, kw, fraction, *, form="4way", measure="params",
                         in_positions: float = 1.0) -> int:
    """Largest R whose chain keeps at most ``fraction`` of the dense layer's params (or MACs);
    at least 1, at most :func:`cp_max_rank`."""
    if not (0.0 < float(fraction) <= 1.0):
        raise OnnxcompError(f"the fraction of {measure} kept must be in (0, 1], got {fraction!r}")
    if measure not in ("params", "macs"):
        raise OnnxcompError(f"unknown cost measure {measure!r}: use 'params' or 'macs'")
    budget = float(fraction) * C_out * C_in * kh * kw
    one = cp_cost(C_out, C_in, kh, kw, 1, form, in_positions)  # cost is linear in R
    per_rank = one.params if measure == "params" else one.macs
    r = int(math.floor(budget / per_rank + 1e-9))
    return max(1, min(r, cp_max_rank(C_out, C_in, kh, kw, form)))


# ============================================================================ validation


def _check_rank(shape, rank, form) -> int:
    try:
        r = int(rank)
        if r != rank:
            raise ValueError
    except (TypeError, ValueError):
        raise OnnxcompError(f"CP rank must be an integer, got {rank!r}") from None
    top = cp_max_rank(*shape, form)
    if r < 1 or r > top:
        raise OnnxcompError(
            f"CP rank {r} out of range for a {'x'.join(map(str, shape))} conv ({form}): need 1 <= R <= {top}"
        )
    return r


def _check_inputs(w, s):
    if w.ndim != 4:
        raise OnnxcompError(f"CP needs a conv weight (C_out, C_in, kh, kw), got shape {tuple(w.shape)}")
    if min(w.shape) < 1:
        raise OnnxcompError(f"empty conv weight of shape {tuple(w.shape)}")
    if s is not None:
        d = w.shape[1] * w.shape[2] * w.shape[3]
        if tuple(s.shape) != (d, d):
            raise OnnxcompError(
                f"input statistics of shape {tuple(s.shape)} do not match the conv weight {tuple(w.shape)}: "
                f"need ({d}, {d}) = C_in*kh*kw squared"
            )
        if not bool(np.isfinite(to_numpy(s.diagonal())).all()):
            raise OnnxcompError("input statistics contain NaN or inf")


# ============================================================================ helpers


def _kr(xp, factors):
    """Khatri-Rao product: rows (a, b, ...) in C order, columns r."""
    out = factors[0]
    r = out.shape[1]
    for f in factors[1:]:
        out = (out[:, None, :] * f[None, :, :]).reshape(-1, r)
    return out


def _normalize_into(xp, f, a):
    """Unit-norm columns of f, the scales moved into a (W~ unchanged). Returns (f, a)."""
    norms = xp.sqrt((f * f).sum(axis=0))
    safe = xp.where(norms > 0, norms, 1.0)
    return f / safe[None, :], a * safe[None, :]


def _ridge(xp, diag_sum, n, ridge):
    return ridge * max(float(diag_sum), 0.0) / max(n, 1)


def _initial_factors(xp, unfoldings, dims, r, rng):
    """HOSVD-style start for modes 1.. : leading left singular vectors, random columns beyond the mode size."""
    out = []
    for t, n in zip(unfoldings, dims):
        gram = t @ t.T
        w, v = xp.linalg.eigh(0.5 * (gram + gram.T))
        v = v[:, ::-1]
        k = min(r, n)
        f = xp.empty((n, r))
        f[:, :k] = v[:, :k]
        if r > k:
            f[:, k:] = to_backend(xp, rng.standard_normal((n, r - k)))
        out.append(f)
    return out


def _mttkrp(xp, unf, dims, factors, m):
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
    return xp.einsum(",".join(subs) + "->" + letters[m] + "z", *ops)


def _unfold(xp, t, mode):
    return xp.ascontiguousarray(xp.moveaxis(t, mode, 0)).reshape(t.shape[mode], -1)


# ============================================================================ Frobenius CP-ALS


def _frobenius_cp(xp, t, r, *, tol, max_iter, ridge, seed=0, report=None):
    """Plain CP-ALS of the N-way tensor ``t`` (mode 0 solved first). Returns (factors, errors
    (reported by ``report(factors)`` per sweep, or Frobenius), iterations, converged)."""
    dims = t.shape
    nm = len(dims)
    rng = np.random.default_rng(seed)
    unf = [_unfold(xp, t, m) for m in range(nm)]
    factors = [None] + _initial_factors(xp, unf[1:], dims[1:], r, rng)
    factors[0] = xp.zeros((dims[0], r))
    fro2 = vdot(xp, t, t)
    grams = [None] + [f.T @ f for f in factors[1:]]
    prev = None
    errors, converged, iterations = [], False, 0
    for _ in range(max_iter):
        for m in range(nm):
            v = xp.ones((r, r))
            for o in range(nm):
                if o != m:
                    v = v * grams[o]
            mt = _mttkrp(xp, unf, dims, factors, m)
            lam = _ridge(xp, xp.trace(v), r, ridge)
            f, _ = psd_solve(v + lam * xp.eye(r), mt, method="eigh")
            if m > 0:
                f, factors[0] = _normalize_into(xp, f, factors[0])
                grams[0] = factors[0].T @ factors[0]
            factors[m] = f
            grams[m] = f.T @ f
        iterations += 1
        dt = unf[0] - factors[0] @ _kr(xp, factors[1:]).T
        fro = vdot(xp, dt, dt)
        errors.append(report(factors) if report is not None else fro)
        if prev is not None:
            if fro >= prev or (prev - fro) / max(prev, 1e-300) < tol:
                converged = True
                break
        if fro <= 1e-26 * max(fro2, 1e-300):
            converged = True
            break
        prev = fro
    return factors, errors, iterations, converged


def cp_frobenius_als(W, rank, *, form="4way", tol=1e-6, max_iter=200, ridge=1e-10, seed=0, xp=np):
    """Frobenius CP-ALS of a conv weight: (a, patch factors list) as NumPy arrays.
    Patch factors are [B, H, V] (4way) or [B, K (kh*kw, R)] (3way)."""
    w = to_backend(xp, to_numpy(W))
    c_out, c_in, kh, kw = w.shape
    t = w if form == "4way" else w.reshape(c_out, c_in, kh * kw)
    f, _, _, _ = _frobenius_cp(xp, t, rank, tol=tol, max_iter=max_iter, ridge=ridge, seed=seed)
    return to_numpy(f[0]), [to_numpy(x) for x in f[1:]]


# ============================================================================ the data-norm problem


class _CPData:
    """W, S and the products every block step needs, on the backend ``xp``."""

    def __init__(self, w, s, xp, form, ridge, *, check_psd=True):
        t0 = time.perf_counter()
        self.xp = xp
        self.ridge = ridge
        c_out, c_in, kh, kw = w.shape
        self.c_out, self.c_in, self.kh, self.kw = c_out, c_in, kh, kw
        self.k = kh * kw
        self.d = d = c_in * self.k
        self.dims = [c_in, kh, kw] if form == "4way" else [c_in, self.k]
        self.w = w.reshape(c_out, d)
        self.s, self.psd = prepare_psd(s, check=check_psd)
        self.ws = self.w @ self.s
        self.reference = max(vdot(xp, self.w, self.ws), 0.0)
        self.s_diag_per_k = xp.diagonal(self.s).reshape(c_in, self.k).sum(axis=0)
        self._s_mode = {}
        self._ws_mode = {}
        self._kron = None
        self.timings = {"setup": time.perf_counter() - t0}

    def tick(self, name, t0):
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------ layouts
    def _perm(self, m):
        p = len(self.dims)
        others = [o for o in range(p) if o != m]
        return others, [m] + others

    def s_mode(self, m):
        """S with rows (m, rest) and columns (m', rest'), as ((n_m*rest*n_m), rest) for one GEMM."""
        if m not in self._s_mode:
            xp = self.xp
            p = len(self.dims)
            others, order = self._perm(m)
            s6 = self.s.reshape(self.dims + self.dims)
            axes = order + [p + o for o in order]
            n = self.dims[m]
            rest = self.d // n
            self._s_mode[m] = xp.ascontiguousarray(s6.transpose(axes)).reshape(n * rest * n, rest)
        return self._s_mode[m]

    def ws_mode(self, m):
        if m not in self._ws_mode:
            xp = self.xp
            _, order = self._perm(m)
            ws = self.ws.reshape([self.c_out] + self.dims)
            n = self.dims[m]
            self._ws_mode[m] = xp.ascontiguousarray(ws.transpose([0] + [1 + o for o in order])).reshape(
                self.c_out, n, self.d // n)
        return self._ws_mode[m]

    @property
    def kron(self):
        if self._kron is None:
            t0 = time.perf_counter()
            blocks = kron_blocks(self.s, self.c_in, self.k)
            self._kron = (blocks, kron_block_gram(self.s, self.c_in, self.k, blocks))
            self.tick("kron_gram", t0)
        return self._kron

    # ------------------------------------------------------------ A step
    def a_system(self, patch):
        """(G = M S M^T (R x R), W S M^T (C_out x R), S M^T (d x R)).

        ``S M^T`` is returned too: the next channel step gets its operator at the
        current B from it instead of from one more d^2 R product."""
        t0 = time.perf_counter()
        mt = _kr(self.xp, patch)  # (d, R)
        sm = self.s @ mt
        g = mt.T @ sm
        g = 0.5 * (g + g.T)
        wsm = self.ws @ mt
        self.tick("a_system", t0)
        return g, wsm, sm

    def a_error(self, a, g, wsm):
        xp = self.xp
        return self.reference - 2.0 * vdot(xp, a, wsm) + vdot(xp, a @ g, a)

    def a_solve(self, g, wsm):
        xp = self.xp
        r = g.shape[0]
        lam = _ridge(xp, xp.trace(g), r, self.ridge)
        a, _ = psd_solve(g + lam * xp.eye(r), wsm)
        return a

    def fit_a(self, patch):
        """The closed-form A for these patch factors, as an :class:`_Iterate`."""
        g, wsm, sm = self.a_system(patch)
        a = self.a_solve(g, wsm)
        return _Iterate(a, list(patch), max(self.a_error(a, g, wsm), 0.0), sm)

    # ------------------------------------------------------------ small patch modes
    def small_system(self, m, a, patch):
        """Normal matrix N ((n_m R)^2, ordered (m, r)) and right-hand side (n_m, R) of patch mode m."""
        xp = self.xp
        t0 = time.perf_counter()
        others, _ = self._perm(m)
        n = self.dims[m]
        r = a.shape[1]
        fr = _kr(xp, [patch[o] for o in others])  # (rest, R)
        rest = fr.shape[0]
        sp = (self.s_mode(m) @ fr).reshape(n, rest, n * r)  # [m, t, (m', r')]
        sp = xp.ascontiguousarray(sp.transpose(1, 0, 2)).reshape(rest, n * n * r)
        q = (fr.T @ sp).reshape(r, n, n, r)  # [r, m, m', r']
        ata = a.T @ a
        nmat = (q.transpose(1, 0, 2, 3) * ata[None, :, None, :]).reshape(n * r, n * r)
        nmat = 0.5 * (nmat + nmat.T)
        z = (a.T @ self.ws_mode(m).reshape(self.c_out, -1)).reshape(r, n, rest)
        rhs = xp.einsum("rmt,tr->mr", z, fr)
        self.tick("small_system", t0)
        return nmat, rhs

    def quad(self, nmat, rhs, x):
        xp = self.xp
        xf = x.reshape(-1)
        return self.reference - 2.0 * vdot(xp, rhs, x) + float(xf @ (nmat @ xf))

    def small_solve(self, nmat, rhs):
        xp = self.xp
        size = nmat.shape[0]
        lam = _ridge(xp, xp.trace(nmat), size, self.ridge)
        x, _ = psd_solve(nmat + lam * xp.eye(size), rhs.reshape(1, -1))
        return x.reshape(rhs.shape)

    # ------------------------------------------------------------ channel mode
    # Its normal operator is sum_{k,k'} S_kk' (x) Mb_kk' with
    # Mb[(r,k),(r',k')] = (A^T A)[r,r'] G[k,r] G[k',r'], G = KR(H, V) (K x R).
    def channel_rhs(self, a, g):
        """Right-hand side (C_in, R) of the B step."""
        r = a.shape[1]
        z = (a.T @ self.ws).reshape(r, self.c_in, self.k)
        return self.xp.einsum("rck,kr->cr", z, g)

    def channel_lam(self, ata, g):
        """Ridge of the B step: ``ridge`` times the mean diagonal of the (C_in R)^2 system."""
        xp = self.xp
        mb_diag_per_k = (g * g) @ xp.diagonal(ata)  # sum_r (A^T A)[r,r] G[k,r]^2
        return _ridge(xp, vdot(xp, self.s_diag_per_k, mb_diag_per_k), self.c_in * ata.shape[0], self.ridge)

    def channel_matrix(self, ata, g):
        """The (C_in R)^2 normal matrix, ordered (c, r) (only for small systems)."""
        xp = self.xp
        c, k, r = self.c_in, self.k, ata.shape[0]
        s4 = self.s.reshape(c, k, c, k)
        gt = g.T  # (R, K)
        m4 = ata[:, None, :, None] * gt[:, :, None, None] * gt[None, None, :, :]  # [r, k, r', k']
        big = xp.tensordot(s4, m4, axes=([1, 3], [1, 3]))  # (c, c', r, r')
        big = big.transpose(0, 2, 1, 3).reshape(c * r, c * r)
        return 0.5 * (big + big.T)


class _ChannelOperator:
    """The B step's normal operator ``X -> sum_{k,k'} S_kk' X Mb_kk'^T`` applied through S.

    With ``Mb_kk' = (A^T A) .* (g_k g_k'^T)`` it is ``X -> sum_k G[k] .* ((S KR(X, G)) A^T A)[(., k)]``:
    one d^2 R GEMM and d R^2 (about half of :class:`~.linalg.KronBlockOperator`'s two
    GEMMs, which do not use the rank-one structure of Mb). Given ``S KR(X, G)`` from the
    A step (:meth:`through_s`), the product costs only the d R^2 part.
    """

    def __init__(self, s, g, ata, c):
        self.s, self.g, self.ata, self.c = s, g, ata, c

    def through_s(self, sm):
        k, r = self.g.shape
        y = (sm @ self.ata).reshape(self.c, k, r)
        return (y * self.g[None, :, :]).sum(axis=1)

    def __call__(self, x):
        k, r = self.g.shape
        mx = (x[:, None, :] * self.g[None, :, :]).reshape(self.c * k, r)
        return self.through_s(self.s @ mx)


def _channel_preconditioner(prob, g, ata, floor=1e-10):
    """Inverse of the nearest Kronecker product ``X (x) Y`` of the channel operator
    (as :class:`~.linalg.KronPreconditioner`), the Mb side taken from the CP structure:
    ``<Mb_kk', Mb_ll'> = sum_rr' (A^T A)^2 G[k]G[l] G[k']G[l']`` and
    ``sum beta_kk' Mb_kk' = (A^T A) .* (G^T beta G)``, K^2 R^2 work instead of K^2 R^4."""
    xp = prob.xp
    k = g.shape[0]
    c = prob.c_in
    blocks, gs = prob.kron
    pairs = (g[:, None, :] * g[None, :, :]).reshape(k * k, -1)  # [(k, l), r] = G[k,r] G[l,r]
    q = (pairs @ (ata * ata)) @ pairs.T  # [(k, l), (k', l')]
    gm = q.reshape(k, k, k, k).transpose(0, 2, 1, 3).reshape(k * k, k * k)  # [(k, k'), (l, l')]
    alpha, beta = nearest_kron_coefficients(to_numpy(gs), to_numpy(gm))
    x = symmetrize((to_backend(xp, alpha)[None, :] @ blocks).reshape(c, c))
    y = symmetrize(ata * (g.T @ to_backend(xp, beta.reshape(k, k)) @ g))
    if float(xp.trace(x)) < 0:  # X (x) Y is unchanged by flipping both signs
        x, y = -x, -y
    x_inv, y_inv = spd_inverse(x, floor), spd_inverse(y, floor)
    return lambda rhs: (x_inv @ rhs) @ y_inv


# ============================================================================ iterates and steps


@dataclass
class _Iterate:
    """Factors with A optimal (or at least checked) for the patch factors, their error,
    and ``S M^T`` for these patch factors (None once a patch factor has moved)."""

    a: object
    patch: list
    err: float
    sm: object = None


@dataclass
class _SweepStats:
    cg_iterations: int = 0
    reverted: int = 0


def _channel_step(prob, it, stats, *, exact, cg_forcing, cg_maxiter):
    """B step. Returns (candidate B, its error or None when unchecked (inexact CG: the next
    block step's quadratic checks it for free), the error at the current B)."""
    xp = prob.xp
    a, b0 = it.a, it.patch[0]
    g = _kr(xp, it.patch[1:])  # (K, R)
    ata = a.T @ a
    rhs = prob.channel_rhs(a, g)
    lam = prob.channel_lam(ata, g)
    if exact:
        big = prob.channel_matrix(ata, g)
        x, _ = psd_solve(big + lam * xp.eye(big.shape[0]), rhs.reshape(1, -1))
        x = x.reshape(b0.shape)
        return x, prob.quad(big, rhs, x), prob.quad(big, rhs, b0)
    op = _ChannelOperator(prob.s, g, ata, prob.c_in)
    ab0 = op.through_s(it.sm) if it.sm is not None else op(b0)
    e_cur = prob.reference - 2.0 * vdot(xp, rhs, b0) + vdot(xp, b0, ab0)
    pre = _channel_preconditioner(prob, g, ata)
    sol = cg(lambda y: op(y) + lam * y, rhs, x0=b0, r0=rhs - ab0 - lam * b0, precond=pre,
             tol=1e-14, rtol_initial=cg_forcing, maxiter=cg_maxiter)
    stats.cg_iterations += sol.iterations
    return sol.x, None, e_cur


def _als_sweep(prob, it, *, exact_channel, cg_forcing, cg_maxiter):
    """One sweep B, (H, V | K), A; every block step is kept only if it does not raise the
    error. Returns (new _Iterate, _SweepStats)."""
    xp = prob.xp
    stats = _SweepStats()
    slack = 1e-13 * max(prob.reference, 1e-300)
    a, patch = it.a, list(it.patch)
    # ---- channel factor B
    t0 = time.perf_counter()
    x, e_new, e_before = _channel_step(prob, it, stats, exact=exact_channel, cg_forcing=cg_forcing,
                                       cg_maxiter=cg_maxiter)
    saved = (patch[0], a)
    if e_new is None or e_new <= e_before:
        patch[0], a = _normalize_into(xp, x, a)
    else:
        stats.reverted += 1
    prob.tick("channel_step", t0)
    # ---- spatial factors (H, V) or K
    t0 = time.perf_counter()
    for m in range(1, len(patch)):
        nmat, rhs = prob.small_system(m, a, patch)
        e_cur = prob.quad(nmat, rhs, patch[m])
        if m == 1 and e_new is None and e_cur > e_before + slack:  # the inexact B step raised E
            stats.reverted += 1
            patch[0], a = saved
            nmat, rhs = prob.small_system(m, a, patch)
            e_cur = prob.quad(nmat, rhs, patch[m])
        x = prob.small_solve(nmat, rhs)
        e_new = prob.quad(nmat, rhs, x)
        if e_new <= e_cur:
            patch[m], a = _normalize_into(xp, x, a)
        else:
            stats.reverted += 1
    prob.tick("spatial_steps", t0)
    # ---- output factor A (closed form)
    t0 = time.perf_counter()
    g, wsm, sm = prob.a_system(patch)
    e_cur = prob.a_error(a, g, wsm)
    x = prob.a_solve(g, wsm)
    e_new = prob.a_error(x, g, wsm)
    if e_new <= e_cur:
        a, err = x, e_new
    else:
        stats.reverted += 1
        err = e_cur
    prob.tick("a_step", t0)
    return _Iterate(a, patch, err, sm), stats


# ============================================================================ acceleration


def _unit_columns(xp, f):
    norms = xp.sqrt((f * f).sum(axis=0))
    return f / xp.where(norms > 0, norms, 1.0)[None, :]


class _Anderson:
    """Anderson acceleration (type II, Walker & Ni 2011) of the sweep map on the patch factors.

    One ALS sweep is a map ``x -> G(x)`` on the patch factors x (unit columns; A is
    eliminated: always the closed form for them). On a high-rank CP, ALS creeps along
    a flat valley in steps that barely change direction; Anderson mixing of the last
    ``window`` steps extrapolates along it (the idea of De Sterck's nonlinear GMRES for
    CP, 2012). Each candidate gets its closed-form A and exact error (one d^2 R
    product, whose S M^T also serves the next channel step) and replaces the sweep's
    result only when its error is lower, so the error never increases. Not a
    guarantee of a lower error after every given number of sweeps (the path differs).
    """

    def __init__(self, window: int, reg: float = 1e-10):
        self.window = window
        self.reg = reg
        self.starts: list = []  # x_i, flattened
        self.ends: list = []  # G(x_i), flattened
        self.tried = 0
        self.accepted = 0

    def __call__(self, prob, start, end):
        """The better of the sweep's result ``end`` and the Anderson candidate."""
        t0 = time.perf_counter()
        xp = prob.xp
        self.starts.append(xp.concatenate([p.reshape(-1) for p in start.patch]))
        self.ends.append(xp.concatenate([p.reshape(-1) for p in end.patch]))
        del self.starts[:-(self.window + 1)], self.ends[:-(self.window + 1)]
        if len(self.starts) < 2:
            return end
        x, patch, offset = self._mixed(xp), [], 0
        for p in end.patch:
            patch.append(_unit_columns(xp, x[offset:offset + p.size].reshape(p.shape)))
            offset += p.size
        cand = prob.fit_a(patch)
        self.tried += 1
        better = cand.err < end.err
        self.accepted += int(better)
        prob.tick("acceleration", t0)
        return cand if better else end

    def _mixed(self, xp):
        """``G(x_k) - dG gamma`` with gamma the least-squares fit of the residual ``f_k = G(x_k) - x_k``
        by the residual differences (a tiny relative ridge keeps near-collinear steps harmless)."""
        res = [e - s for s, e in zip(self.starts, self.ends)]
        df = xp.stack([b - a for a, b in zip(res[:-1], res[1:])], axis=1)
        dg = xp.stack([b - a for a, b in zip(self.ends[:-1], self.ends[1:])], axis=1)
        gram = df.T @ df
        lam = self.reg * float(xp.trace(gram)) + 1e-300
        gamma = xp.linalg.solve(gram + lam * xp.eye(gram.shape[0]), df.T @ res[-1])
        return self.ends[-1] - dg @ gamma


# ============================================================================ initialisation


def _tucker_candidate(w_host, s_host, r, form, xp, ridge, seed, *, tucker_iter, cp_iter):
    """CP (Frobenius) of the data-aware Tucker-2 core, mapped back through U_out, U_in."""
    from .tucker2 import tucker2

    c_out, c_in, kh, kw = w_host.shape
    tk = tucker2(w_host, s_host, (min(r, c_out), min(r, c_in)), xp=xp, tol=1e-3, max_iter=tucker_iter)
    core = to_backend(xp, tk.core)
    r_out, r_in = core.shape[:2]
    t = core if form == "4way" else core.reshape(r_out, r_in, kh * kw)
    f, _, _, _ = _frobenius_cp(xp, t, r, tol=INIT_TOL, max_iter=cp_iter, ridge=ridge, seed=seed)
    a = to_backend(xp, tk.u_out) @ f[0]
    patch = [to_backend(xp, tk.u_in) @ f[1]] + f[2:]
    return a, patch


def _initial_patches(init, w, w_host, s_host, prob, r, form, xp, ridge, seed, init_iter):
    """{name: patch factors} of the initial candidates."""
    c_out, c_in, kh, kw = w_host.shape
    k = kh * kw
    if not isinstance(init, str):
        given = [to_backend(xp, to_numpy(x)) for x in init]
        if form == "3way" and len(given) == 3:
            given[2] = given[2].reshape(r, k).T
        shapes = [(c_out, r)] + [(n, r) for n in prob.dims]
        if len(given) != len(shapes) or any(tuple(g.shape) != s for g, s in zip(given, shapes)):
            raise OnnxcompError(f"init factors have shapes {[tuple(g.shape) for g in given]}, need {shapes}")
        return {"given": given[1:]}
    if init == "auto":
        names = ["frobenius", "tucker2"]
        if r >= c_out and r >= c_in:
            names = ["frobenius"]  # full Tucker ranks: its core is W rotated, same CP as Frobenius
    elif init in ("frobenius", "tucker2"):
        names = [init]
    else:
        raise OnnxcompError(f"unknown init {init!r}: use 'auto', 'frobenius', 'tucker2' or factors")
    cands = {}
    for name in names:
        if name == "frobenius":
            t = w if form == "4way" else w.reshape(c_out, c_in, k)
            f, _, _, _ = _frobenius_cp(xp, t, r, tol=INIT_TOL, max_iter=init_iter, ridge=ridge, seed=seed)
            cands[name] = f[1:]
        else:
            cands[name] = _tucker_candidate(w_host, s_host, r, form, xp, ridge, seed,
                                            tucker_iter=min(20, init_iter), cp_iter=init_iter)[1]
    return cands


def _best_start(prob, cands):
    """Each candidate's patch factors normalised, its closed-form A; the best one.
    Returns (_Iterate, name, {name: error})."""
    xp = prob.xp
    init_errors, best = {}, None
    for name, patch in cands.items():
        it = prob.fit_a([_unit_columns(xp, p) for p in patch])
        init_errors[name] = it.err
        if best is None or it.err < best[0].err:
            best = (it, name)
    return best[0], best[1], init_errors


# ============================================================================ solver


def cp_decompose(
    W,
    S=None,
    rank: int = 1,
    *,
    form: str = "4way",
    norm: str = "data",
    xp=np,
    tol: float = 1e-4,
    max_iter: int = 100,
    ridge: float = 1e-8,
    init="auto",
    cg_forcing: float = 0.1,
    cg_maxiter: int = 8,
    seed: int = 0,
    check_psd: bool = True,
    accelerate: bool = True,
    init_iter: int | None = None,
) -> CPResult:
    """CP of a conv weight minimising the data error tr(dW S dW^T).

    Parameters
    ----------
    W : (C_out, C_in, kh, kw). S : (d, d) input patch covariance, d = C_in*kh*kw, ordered
        (c, i, j); may be singular (None only with ``norm="frobenius"``).
    rank : R, 1 <= R <= :func:`cp_max_rank` (else OnnxcompError).
    form : "4way" (A, B, H, V) or "3way" (A, B, kernel).
    norm : "data" (ALS under S) or "frobenius" (plain CP-ALS, the data-free baseline;
        errors are still reported under S when S is given).
    xp : numpy or cupy; results come back as NumPy float64.
    tol, max_iter : stop when the relative improvement of the error in one sweep is
        below ``tol``, or after ``max_iter`` sweeps.
    ridge : relative Tikhonov term of every block system (against CP degeneracy).
    init : "auto" (the better of "frobenius" and "tucker2" after the closed-form A step),
        "frobenius", "tucker2", or a tuple of factors (a, b, h, v) / (a, b, kernel).
    cg_forcing, cg_maxiter : the channel (B) step runs preconditioned CG from the current
        B until its residual drops by ``cg_forcing`` or ``cg_maxiter`` products (only
        when the (C_in R)^2 system exceeds EXACT_CHANNEL_LIMIT; else an exact solve).
        The Kronecker preconditioner cuts the residual by only ~0.85 per product on
        realistic layers: 8 products make the sweep map consistent enough for the
        acceleration to be kept in most sweeps (4 do not; 16 cost more than they gain).
    accelerate : after each sweep, try the Anderson-accelerated candidate (see
        :class:`_Anderson`), kept only when it lowers the error; False gives plain ALS.
    init_iter : most sweeps of the Frobenius CP-ALS behind the initial candidates
        (default INIT_ITER; it stops earlier once a sweep gains less than INIT_TOL).
    """
    t_start = time.perf_counter()
    _check_form(form)
    w_host = np.asarray(to_numpy(W), dtype=np.float64)
    if w_host.ndim != 4:
        raise OnnxcompError(f"CP needs a conv weight (C_out, C_in, kh, kw), got shape {tuple(w_host.shape)}")
    c_out, c_in, kh, kw = w_host.shape
    r = _check_rank(w_host.shape, rank, form)
    if norm not in ("data", "frobenius"):
        raise OnnxcompError(f"unknown norm {norm!r}: use 'data' or 'frobenius'")
    if S is None and norm == "data":
        raise OnnxcompError("norm='data' needs the input covariance S (or use norm='frobenius')")
    s_host = None if S is None else np.asarray(to_numpy(S), dtype=np.float64)
    _check_inputs(w_host, s_host)
    w = to_backend(xp, w_host)
    k = kh * kw

    def result(a, patch, errors, initial, iterations, converged, norm_, init_name, **extra):
        a = to_numpy(a).astype(np.float64)
        patch = [to_numpy(p).astype(np.float64) for p in patch]
        if form == "4way":
            b, h, v, kernel = patch[0], patch[1], patch[2], None
            wt = cp_reconstruct(a, b, h, v)
        else:
            b, h, v = patch[0], None, None
            kernel = np.ascontiguousarray(patch[1].T).reshape(r, kh, kw)
            wt = cp_reconstruct(a, b, kernel=kernel)
        final = cp_data_error(w_host, s_host, wt)
        ref = cp_data_error(w_host, s_host, np.zeros_like(w_host))
        return CPResult(
            form=form, a=a, b=b, h=h, v=v, kernel=kernel, error=final, initial_error=initial,
            errors=errors, reference=ref, iterations=iterations, converged=converged,
            seconds=time.perf_counter() - t_start, norm=norm_, init=init_name, **extra,
        )

    if norm == "frobenius":
        s_dev = None if s_host is None else to_backend(xp, s_host)
        t = w if form == "4way" else w.reshape(c_out, c_in, k)

        def report(factors):
            wt = _kr(xp, factors[1:]) @ factors[0].T  # (d, C_out)
            dw = w.reshape(c_out, -1) - wt.T
            return vdot(xp, dw, dw) if s_dev is None else vdot(xp, dw @ s_dev, dw)

        f, errors, its, conv = _frobenius_cp(xp, t, r, tol=tol, max_iter=max_iter, ridge=ridge, seed=seed,
                                            report=report)
        return result(f[0], f[1:], errors, errors[0] if errors else float("nan"), its, conv, "frobenius", "frobenius")

    prob = _CPData(w, to_backend(xp, s_host), xp, form, ridge, check_psd=check_psd)

    # ---- initial candidates, each followed by the closed-form A step
    t0 = time.perf_counter()
    cands = _initial_patches(init, w, w_host, s_host, prob, r, form, xp, ridge, seed,
                             INIT_ITER if init_iter is None else int(init_iter))
    it, init_name, init_errors = _best_start(prob, cands)
    prob.tick("init", t0)
    initial_error = it.err

    errors: list[float] = []
    error_seconds: list[float] = []
    cg_its: list[int] = []
    reverted = 0
    converged = False
    slack = 1e-13 * max(prob.reference, 1e-300)
    exact_channel = c_in * r <= EXACT_CHANNEL_LIMIT
    anderson = _Anderson(ANDERSON_WINDOW) if accelerate else None
    for _ in range(max_iter):
        if it.err <= slack:
            converged = True
            break
        start = it
        it, stats = _als_sweep(prob, start, exact_channel=exact_channel, cg_forcing=cg_forcing,
                               cg_maxiter=cg_maxiter)
        cg_its.append(stats.cg_iterations)
        reverted += stats.reverted
        if anderson is not None and it.err < start.err:
            it = anderson(prob, start, it)
        errors.append(it.err)
        error_seconds.append(time.perf_counter() - t_start)
        improvement = (start.err - it.err) / start.err if start.err > 0 else 0.0
        if improvement < tol:
            converged = True
            break

    return result(it.a, it.patch, errors, initial_error, len(errors), converged, "data", init_name,
                  init_errors=init_errors, cg_iterations=cg_its, reverted=reverted,
                  timings=dict(prob.timings), psd=prob.psd, error_seconds=error_seconds,
                  initial_seconds=prob.timings["setup"] + prob.timings["init"],
                  accelerated=(anderson.accepted, anderson.tried) if anderson else (0, 0))
