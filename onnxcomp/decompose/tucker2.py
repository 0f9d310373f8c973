"""Data-aware Tucker-2 decomposition of a conv weight (pure linear algebra, no ONNX).

Problem (DESIGN.md §1-2). W is (C_out, C_in, kh, kw), K = kh*kw, d = C_in*K, and
S (d x d) is the covariance of the conv's input patches, ordered (c, i, j) like
``W.reshape(C_out, -1)``. Find

    W~ = U_out . G . (U_in kron I_K)^T,   U_out (C_out x R_out), U_in (C_in x R_in),
                                            G (R_out, R_in, kh, kw)

minimising the data error ``E = tr(dW S dW^T)``, ``dW = (W - W~).reshape(C_out, d)``:
the expected squared change of the layer's output (after bias correction).

Alternating least squares, each block solved exactly, so E never increases:
- output step (U_in fixed, P = U_in kron I): reduced-rank regression in closed
  form, ``X = W S P (P^T S P)^+``, ``U_out`` = top eigenvectors of
  ``X (P^T S P) X^T``, ``G = U_out^T X``; its error is
  ``tr(W S W^T) - sum of the top R_out eigenvalues``.
- input step (U_out, G fixed): a quadratic in U_in whose normal operator is
  ``sum_{k,k'} S_{kk'} (x) (G^T G)_{kk'}`` ((C_in*R_in)^2, never formed): preconditioned
  CG, matrix-free (two GEMMs per product), warm-started at the current U_in, with
  the nearest-Kronecker-product preconditioner. Then QR; only span(U_in) matters
  to the next output step.

``norm="frobenius"`` is the data-free baseline (HOSVD + HOOI, S = I).
Rank helpers: :func:`tucker2_cost`, :func:`balanced_ranks`, :func:`search_ranks`
(data error minimised under a params/MACs budget), :func:`energy_ranks`,
:func:`evbmf_ranks` (Nakajima et al.'s EVBMF, data-free).
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
    KronBlockOperator,
    KronPreconditioner,
    PSDInfo,
    cg,
    kron_block_gram,
    kron_blocks,
    nearest_kron_coefficients,
    prepare_psd,
    psd_eigh,
    psd_solve,
    symmetrize,
    vdot,
)

__all__ = [
    "Tucker2Result",
    "tucker2",
    "tucker2_reconstruct",
    "data_error",
    "Tucker2Cost",
    "tucker2_cost",
    "balanced_ranks",
    "RankSearch",
    "search_ranks",
    "energy_ranks",
    "evbmf",
    "evbmf_ranks",
]


# ============================================================================ result


@dataclass
class Tucker2Result:
    """Factors (NumPy float64) and the solver's record.

    ``errors[i]`` is the data error under S after sweep i+1 (under S = I when no
    S was given); ``initial_error`` the error of the chosen initialisation;
    ``error`` the final error, evaluated directly as ``tr(dW S dW^T)``;
    ``reference = tr(W S W^T)`` (relative error = error / reference).
    """

    u_out: np.ndarray  # (C_out, R_out), orthonormal columns
    core: np.ndarray  # (R_out, R_in, kh, kw)
    u_in: np.ndarray  # (C_in, R_in), orthonormal columns
    error: float
    initial_error: float
    errors: list[float]
    reference: float
    iterations: int
    converged: bool
    seconds: float
    norm: str = "data"
    init: str = ""
    init_errors: dict = field(default_factory=dict)  # candidate -> error after its output step
    cg_iterations: list[int] = field(default_factory=list)  # per sweep (data norm)
    timings: dict = field(default_factory=dict)  # seconds per phase
    psd: PSDInfo | None = None

    @property
    def ranks(self) -> tuple[int, int]:
        return self.u_out.shape[1], self.u_in.shape[1]

    @property
    def relative_error(self) -> float:
        return self.error / self.reference if self.reference > 0 else 0.0

    def weight(self) -> np.ndarray:
        """The approximation W~ (C_out, C_in, kh, kw)."""
        return tucker2_reconstruct(self.u_out, self.core, self.u_in)


def tucker2_reconstruct(u_out, core, u_in):
    """W~ = U_out . G . (U_in kron I)^T as a (C_out, C_in, kh, kw) array."""
    xp = _xp_of(core)
    r_out, r_in, kh, kw = core.shape
    t = u_out @ core.reshape(r_out, r_in * kh * kw)  # (C_out, R_in*K)
    t = t.reshape(-1, r_in, kh * kw)
    w = xp.matmul(u_in[None], t)  # (C_out, C_in, K)
    return w.reshape(u_out.shape[0], u_in.shape[0], kh, kw)


def data_error(w, s, w_approx) -> float:
    """tr(dW S dW^T) with dW = (W - W~).reshape(C_out, -1); Frobenius when S is None."""
    xp = _xp_of(w)
    dw = (w - w_approx).reshape(w.shape[0], -1)
    if s is None:
        return vdot(xp, dw, dw)
    return vdot(xp, dw @ s, dw)


def _xp_of(a):
    from .backend import array_module

    return array_module(a)


# ============================================================================ validation


def _check_ranks(shape, ranks) -> tuple[int, int]:
    c_out, c_in = shape[0], shape[1]
    try:
        r_out, r_in = (int(r) for r in ranks)
    except (TypeError, ValueError):
        raise OnnxcompError(f"Tucker-2 ranks must be a pair (R_out, R_in), got {ranks!r}") from None
    if r_out < 1 or r_in < 1:
        raise OnnxcompError(f"Tucker-2 ranks must be >= 1, got (R_out, R_in) = ({r_out}, {r_in})")
    if r_out > c_out or r_in > c_in:
        raise OnnxcompError(
            f"Tucker-2 ranks ({r_out}, {r_in}) exceed the layer: R_out <= C_out = {c_out}, R_in <= C_in = {c_in}"
        )
    return r_out, r_in


def _check_weight(w):
    if w.ndim != 4:
        raise OnnxcompError(f"Tucker-2 needs a conv weight (C_out, C_in, kh, kw), got shape {tuple(w.shape)}")
    if min(w.shape) < 1:
        raise OnnxcompError(f"empty conv weight of shape {tuple(w.shape)}")


def _check_stats(w, s):
    d = w.shape[1] * w.shape[2] * w.shape[3]
    if s.shape != (d, d):
        raise OnnxcompError(
            f"input statistics of shape {tuple(s.shape)} do not match the conv weight {tuple(w.shape)}: "
            f"need ({d}, {d}) = C_in*kh*kw squared"
        )
    if not bool(np.isfinite(to_numpy(s.diagonal())).all()):
        raise OnnxcompError("input statistics contain NaN or inf")


# ============================================================================ the data-norm problem


class _DataProblem:
    """W, S and the products of them every sweep needs, on the backend ``xp``."""

    def __init__(self, w, s, xp, *, check_psd=True):
        t0 = time.perf_counter()
        self.xp = xp
        c_out, c_in, kh, kw = w.shape
        self.c_out, self.c_in, self.kh, self.kw = c_out, c_in, kh, kw
        self.k = k = kh * kw
        self.d = d = c_in * k
        self.w = w.reshape(c_out, d)
        self.s, self.psd = prepare_psd(s, check=check_psd)
        self.ws = self.w @ self.s  # (C_out, d) = [o, c, k]
        self.reference = max(vdot(xp, self.w, self.ws), 0.0)  # tr(W S W^T)
        ws3 = self.ws.reshape(c_out, c_in, k)
        self.ws_okc = xp.ascontiguousarray(ws3.transpose(0, 2, 1)).reshape(c_out * k, c_in)  # rows (o, k)
        self.ws_cok = xp.ascontiguousarray(ws3.transpose(1, 0, 2)).reshape(c_in, c_out * k)  # cols (o, k)
        self.s_flat = self.s.reshape(c_in, k * d)  # rows c, cols (k, c', k')
        self._gs = None
        self.timings = {"setup": time.perf_counter() - t0}

    def _tick(self, name, t0):
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    @property
    def gs(self):
        """Gram matrix of the K^2 spatial blocks of S (for Kronecker approximations)."""
        if self._gs is None:
            t0 = time.perf_counter()
            self._s_blocks = kron_blocks(self.s, self.c_in, self.k)  # one copy of S, (K^2, C^2)
            self._gs = kron_block_gram(self.s, self.c_in, self.k, self._s_blocks)
            self._tick("kron_gram", t0)
        return self._gs

    @property
    def s_blocks(self):
        self.gs
        return self._s_blocks

    # ---------------------------------------------------------------- output step
    def output_step(self, u_in, r_out):
        """Best (U_out, G) for span(U_in): returns (U_out, G (R_out, R_in*K), error, eigenvalues)."""
        xp = self.xp
        t0 = time.perf_counter()
        c, k, co = self.c_in, self.k, self.c_out
        r = u_in.shape[1]
        pts = u_in.T @ self.s_flat  # (R, K*d) = [r, k, c', k']  = P^T S
        t = xp.ascontiguousarray(pts.reshape(r, k, c, k).transpose(0, 1, 3, 2)).reshape(r * k * k, c)
        a = (t @ u_in).reshape(r, k, k, r).transpose(0, 1, 3, 2).reshape(r * k, r * k)  # P^T S P
        b = (self.ws_okc @ u_in).reshape(co, k, r).transpose(0, 2, 1).reshape(co, r * k)  # W S P
        self._tick("output_gemm", t0)
        t0 = time.perf_counter()
        x, y = psd_solve(a, b)  # X = B A^+, Y = X A X^T
        self._tick("output_solve", t0)
        t0 = time.perf_counter()
        lam, vec = xp.linalg.eigh(y)
        lam = lam[::-1]
        vec = vec[:, ::-1]
        u_out = xp.ascontiguousarray(vec[:, :r_out])
        g = u_out.T @ x
        err = self.reference - float(lam[:r_out].sum())
        self._tick("output_eig", t0)
        return u_out, g, max(err, 0.0), lam

    # ---------------------------------------------------------------- input step
    def input_system(self, u_out, g, r_in):
        """Normal operator, right-hand side and preconditioner of the U_in step."""
        xp = self.xp
        t0 = time.perf_counter()
        c, k, co = self.c_in, self.k, self.c_out
        m = symmetrize(g.T @ g)  # (R*K)^2, ordered (r, k); = H^T H since U_out is orthonormal
        h = (u_out @ g).reshape(co, r_in, k)
        h = xp.ascontiguousarray(h.transpose(0, 2, 1)).reshape(co * k, r_in)  # rows (o, k)
        rhs = self.ws_cok @ h  # b[c, r] = sum_{o,k} (W S)[o, c, k] H[o, r, k]
        op = KronBlockOperator(self.s, m, c, k, r_in)
        self._tick("input_setup", t0)
        t0 = time.perf_counter()
        pre = KronPreconditioner(self.s, m, c, k, r_in, s_blocks=self.s_blocks, gs=self.gs)
        self._tick("precond_setup", t0)
        return op, rhs, pre

    def quadratic(self, op, rhs, u):
        """E(U_in) = tr(WSW^T) - 2<b, U> + <U, A U> for the input step's system."""
        xp = self.xp
        return self.reference - 2.0 * vdot(xp, rhs, u) + vdot(xp, u, op(u))

    # ---------------------------------------------------------------- initial bases
    def hosvd_in(self, r_in):
        xp = self.xp
        w2 = xp.ascontiguousarray(self.w.reshape(self.c_out, self.c_in, self.k).transpose(1, 0, 2))
        w2 = w2.reshape(self.c_in, -1)
        _, v = psd_eigh(w2 @ w2.T)
        return xp.ascontiguousarray(v[:, :r_in])

    def kron_factors(self):
        """Nearest Kronecker product S ~ Sc (x) Sk (both PSD): (Sc, Sk)."""
        xp = self.xp
        gs = to_numpy(self.gs)
        w, v = np.linalg.eigh(symmetrize(gs))
        sk = v[:, -1].reshape(self.k, self.k)
        if np.trace(sk) < 0:
            sk = -sk
        sc = (xp.asarray(sk.reshape(1, -1)) @ self.s_blocks).reshape(self.c_in, self.c_in)
        return symmetrize(sc), symmetrize(xp.asarray(sk))

    def data_in(self, r_out, r_in):
        """Data-aware input basis: the data-aware SVD output basis U_d (top eigenvectors of
        W S W^T) projects W; the input mode of U_d^T W is then truncated in the metric of the
        nearest Kronecker factorisation S ~ Sc (x) Sk (exact if S is separable)."""
        xp = self.xp
        c, k = self.c_in, self.k
        _, ud = psd_eigh(self.ws @ self.w.T)
        z = ud[:, :r_out].T @ self.w  # (R_out, d)
        sc, sk = self.kron_factors()
        wc, vc = psd_eigh(sc)
        wk, vk = psd_eigh(sk)
        sc_half = (vc * xp.sqrt(wc)) @ vc.T
        sk_half = (vk * xp.sqrt(wk)) @ vk.T
        z3 = z.reshape(-1, c, k) @ sk_half  # x_3 Sk^1/2
        zc = xp.ascontiguousarray(z3.transpose(1, 0, 2)).reshape(c, -1)
        zc = sc_half @ zc  # x_2 Sc^1/2
        _, v = psd_eigh(zc @ zc.T)
        v = v[:, :r_in]
        keep = wc > wc[0] * c * np.finfo(np.float64).eps
        sc_pinv_half = (vc[:, keep] / xp.sqrt(wc[keep])) @ vc[:, keep].T
        u = sc_pinv_half @ v
        q, _ = xp.linalg.qr(u)
        return q


# ============================================================================ solvers


def tucker2(
    W,
    S=None,
    ranks=(1, 1),
    *,
    norm: str = "data",
    xp=np,
    tol: float = 1e-4,
    max_iter: int = 100,
    init="auto",
    cg_forcing: float = 0.1,
    cg_maxiter: int = 20,
    check_psd: bool = True,
) -> Tucker2Result:
    """Tucker-2 of a conv weight minimising the data error tr(dW S dW^T).

    Parameters
    ----------
    W : (C_out, C_in, kh, kw) weight. S : (d, d) input patch covariance, d = C_in*kh*kw
        (may be singular or slightly indefinite from rounding; None only with
        ``norm="frobenius"``).
    ranks : (R_out, R_in), 1 <= R_out <= C_out, 1 <= R_in <= C_in (else OnnxcompError).
    norm : "data" (ALS under S) or "frobenius" (HOSVD + HOOI, the data-free baseline;
        errors are still reported under S when S is given).
    xp : numpy or cupy; the work runs there, results come back as NumPy float64.
    tol, max_iter : stop when the relative improvement of the error in one sweep
        is below ``tol``, or after ``max_iter`` sweeps.
    init : "auto" (the better of "hosvd" and "data" after one output step), "hosvd"
        (Frobenius HOSVD input basis), "data" (data-aware input basis, see
        ``_DataProblem.data_in``), or a (C_in, R_in) array for U_in.
    cg_forcing, cg_maxiter : each input step runs preconditioned CG from the current
        U_in until the residual drops by ``cg_forcing`` (or ``cg_maxiter`` products):
        an inexact but monotone inner solve.
    check_psd : check S by Cholesky and project it onto the PSD cone if it fails.
    """
    t_start = time.perf_counter()
    w_host = np.asarray(to_numpy(W), dtype=np.float64)
    _check_weight(w_host)
    r_out, r_in = _check_ranks(w_host.shape, ranks)
    if norm not in ("data", "frobenius"):
        raise OnnxcompError(f"unknown norm {norm!r}: use 'data' or 'frobenius'")
    if S is None and norm == "data":
        raise OnnxcompError("norm='data' needs the input covariance S (or use norm='frobenius')")
    w = to_backend(xp, w_host)
    s = None
    if S is not None:
        s = to_backend(xp, to_numpy(S))
        _check_stats(w_host, s)
    if norm == "frobenius":
        return _hooi(w, s, r_out, r_in, xp, tol, max_iter, t_start, check_psd)

    prob = _DataProblem(w, s, xp, check_psd=check_psd)
    c_out, c_in, kh, kw = w_host.shape

    # ---- initialisation: candidates for U_in, each followed by the exact output step
    t0 = time.perf_counter()
    if isinstance(init, str):
        if init == "auto":
            names = ["hosvd", "data"]
        elif init in ("hosvd", "data"):
            names = [init]
        else:
            raise OnnxcompError(f"unknown init {init!r}: use 'auto', 'hosvd', 'data' or an array")
        cands = {}
        for name in names:
            u0 = prob.hosvd_in(r_in) if name == "hosvd" else prob.data_in(r_out, r_in)
            cands[name] = (u0,) + prob.output_step(u0, r_out)[:3]
    else:
        u0 = to_backend(xp, to_numpy(init))
        if u0.shape != (c_in, r_in):
            raise OnnxcompError(f"init U_in has shape {tuple(u0.shape)}, need ({c_in}, {r_in})")
        u0, _ = xp.linalg.qr(u0)
        cands = {"given": (u0,) + prob.output_step(u0, r_out)[:3]}
    init_errors = {name: c[3] for name, c in cands.items()}
    best_name = min(init_errors, key=init_errors.get)
    u_in, u_out, g, err = cands[best_name]
    prob._tick("init", t0)
    initial_error = err

    errors: list[float] = []
    cg_its: list[int] = []
    converged = False
    iterations = 0
    slack = 1e-12 * max(prob.reference, 1e-300)
    for _ in range(max_iter):
        if err <= slack:
            converged = True
            break
        op, rhs, pre = prob.input_system(u_out, g, r_in)
        t0 = time.perf_counter()
        sol = cg(op, rhs, x0=u_in, precond=pre, tol=1e-14, rtol_initial=cg_forcing, maxiter=cg_maxiter)
        prob._tick("input_cg", t0)
        cg_its.append(sol.iterations)
        t0 = time.perf_counter()
        q, _ = xp.linalg.qr(sol.x)
        prob._tick("qr", t0)
        new_out, new_g, new_err = prob.output_step(q, r_out)[:3]
        iterations += 1
        if new_err > err + slack:  # only rounding can do this: keep the best iterate and stop
            errors.append(err)
            converged = True
            break
        improvement = (err - new_err) / err if err > 0 else 0.0
        u_in, u_out, g, err = q, new_out, new_g, new_err
        errors.append(err)
        if improvement < tol:
            converged = True
            break

    core = g.reshape(r_out, r_in, kh, kw)
    t0 = time.perf_counter()
    final = data_error(w, prob.s, tucker2_reconstruct(u_out, core, u_in))
    prob._tick("final_eval", t0)
    return Tucker2Result(
        u_out=to_numpy(u_out).astype(np.float64),
        core=to_numpy(core).astype(np.float64),
        u_in=to_numpy(u_in).astype(np.float64),
        error=final,
        initial_error=initial_error,
        errors=errors,
        reference=prob.reference,
        iterations=iterations,
        converged=converged,
        seconds=time.perf_counter() - t_start,
        norm="data",
        init=best_name,
        init_errors=init_errors,
        cg_iterations=cg_its,
        timings=dict(prob.timings),
        psd=prob.psd,
    )


def _top_eigvecs(xp, gram, r):
    _, v = psd_eigh(gram)
    return xp.ascontiguousarray(v[:, :r])


def _hooi(w, s, r_out, r_in, xp, tol, max_iter, t_start, check_psd):
    """Frobenius Tucker-2: HOSVD start, then HOOI sweeps (the data-free baseline)."""
    c_out, c_in, kh, kw = w.shape
    k = kh * kw
    psd = None
    if s is not None:
        s, psd = prepare_psd(s, check=check_psd)
    w3 = w.reshape(c_out, c_in, k)
    w1 = w.reshape(c_out, -1)
    w2 = xp.ascontiguousarray(w3.transpose(1, 0, 2)).reshape(c_in, -1)
    fro2 = vdot(xp, w1, w1)

    def core_of(u_out, u_in):
        return xp.matmul(u_in.T[None], (u_out.T @ w1).reshape(r_out, c_in, k))  # (R_out, R_in, K)

    def reported(u_out, core, u_in):
        return data_error(w, s, tucker2_reconstruct(u_out, core.reshape(r_out, r_in, kh, kw), u_in))

    u_out = _top_eigvecs(xp, w1 @ w1.T, r_out)
    u_in = _top_eigvecs(xp, w2 @ w2.T, r_in)
    core = core_of(u_out, u_in)
    fro_err = fro2 - vdot(xp, core, core)
    initial_error = reported(u_out, core, u_in)
    errors, converged, iterations = [], False, 0
    for _ in range(max_iter):
        y = xp.matmul(u_in.T[None], w3).reshape(c_out, r_in * k)  # W x_2 U_in^T
        new_out = _top_eigvecs(xp, y @ y.T, r_out)
        z = (new_out.T @ w1).reshape(r_out, c_in, k)
        z2 = xp.ascontiguousarray(z.transpose(1, 0, 2)).reshape(c_in, -1)
        new_in = _top_eigvecs(xp, z2 @ z2.T, r_in)
        new_core = core_of(new_out, new_in)
        new_fro = fro2 - vdot(xp, new_core, new_core)
        iterations += 1
        if new_fro > fro_err + 1e-12 * fro2:
            converged = True
            errors.append(reported(u_out, core, u_in))
            break
        improvement = (fro_err - new_fro) / fro_err if fro_err > 0 else 0.0
        u_out, u_in, core, fro_err = new_out, new_in, new_core, new_fro
        errors.append(reported(u_out, core, u_in))
        if improvement < tol or fro_err <= 1e-13 * fro2:
            converged = True
            break
    final = errors[-1] if errors else initial_error
    ref = vdot(xp, w1, w1 @ s) if s is not None else fro2
    return Tucker2Result(
        u_out=to_numpy(u_out).astype(np.float64),
        core=to_numpy(core).reshape(r_out, r_in, kh, kw).astype(np.float64),
        u_in=to_numpy(u_in).astype(np.float64),
        error=final,
        initial_error=initial_error,
        errors=errors,
        reference=ref,
        iterations=iterations,
        converged=converged,
        seconds=time.perf_counter() - t_start,
        norm="frobenius",
        init="hosvd",
        psd=psd,
    )
