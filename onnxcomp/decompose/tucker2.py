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
The two steps are also exposed alone (:func:`tucker2_output_step`,
:func:`tucker2_input_step`). Rank helpers: :func:`tucker2_cost`, :func:`balanced_ranks`, :func:`search_ranks`
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
    SolverRecord,
    cg,
    kron_block_gram,
    kron_blocks,
    orthonormal_basis,
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
    "tucker2_output_step",
    "tucker2_input_step",
    "data_error",
    "Tucker2Cost",
    "tucker2_cost",
    "dense_cost",
    "balanced_ranks",
    "RankSearch",
    "search_ranks",
    "energy_ranks",
    "evbmf",
    "evbmf_ranks",
]


# ============================================================================ result


@dataclass(kw_only=True)
class Tucker2Result(SolverRecord):
    """Factors (NumPy float64) and the solver's record (see :class:`SolverRecord`; a sweep
    that rounding would have made worse is reverted and repeats the previous error)."""

    u_out: np.ndarray  # (C_out, R_out), orthonormal columns
    core: np.ndarray  # (R_out, R_in, kh, kw)
    u_in: np.ndarray  # (C_in, R_in), orthonormal columns
    sweep_seconds: list[float] = field(default_factory=list)  # wall time of each sweep

    @property
    def ranks(self) -> tuple[int, int]:
        return self.u_out.shape[1], self.u_in.shape[1]

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
        self._last_pts = (u_in, pts)  # P^T S, reused for the next input step's first residual
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
    def input_system(self, u_out, g, r_in, u_in=None):
        """Normal operator, right-hand side and preconditioner of the U_in step, and the
        initial residual ``b - A U_in`` when U_in is the basis of the last output step
        (from its P^T S: a third of the cost of an operator product), else None."""
        xp = self.xp
        t0 = time.perf_counter()
        c, k, co = self.c_in, self.k, self.c_out
        m = symmetrize(g.T @ g)  # (R*K)^2, ordered (r, k); = H^T H since U_out is orthonormal
        h = (u_out @ g).reshape(co, r_in, k)
        h = xp.ascontiguousarray(h.transpose(0, 2, 1)).reshape(co * k, r_in)  # rows (o, k)
        rhs = self.ws_cok @ h  # b[c, r] = sum_{o,k} (W S)[o, c, k] H[o, r, k]
        op = KronBlockOperator(self.s, m, c, k, r_in)
        res0 = None
        last = getattr(self, "_last_pts", None)
        if u_in is not None and last is not None and last[0] is u_in:
            # (A U)[c, r] = sum_{(r',k'), k} (P^T S)[(r',k'), (c,k)] M[(r',k'), (r,k)]
            pts = last[1].reshape(r_in * k, c, k)
            lhs = xp.ascontiguousarray(pts.transpose(1, 0, 2)).reshape(c, r_in * k * k)
            rm = xp.ascontiguousarray(m.reshape(r_in * k, r_in, k).transpose(0, 2, 1)).reshape(r_in * k * k, r_in)
            res0 = rhs - lhs @ rm
        self._last_pts = None
        self._tick("input_setup", t0)
        t0 = time.perf_counter()
        pre = KronPreconditioner(self.s, m, c, k, r_in, s_blocks=self.s_blocks, gs=self.gs)
        self._tick("precond_setup", t0)
        return op, rhs, pre, res0

    def quadratic(self, op, rhs, u):
        """E(U_in) = tr(WSW^T) - 2<b, U> + <U, A U> for the input step's system."""
        xp = self.xp
        return self.reference - 2.0 * vdot(xp, rhs, u) + vdot(xp, u, op(u))

    # ---------------------------------------------------------------- initial bases
    def hosvd_in(self, r_in):
        """Frobenius HOSVD input basis: top eigenvectors of the mode-2 unfolding's Gram."""
        xp = self.xp
        if getattr(self, "_hosvd_v", None) is None:
            w2 = xp.ascontiguousarray(self.w.reshape(self.c_out, self.c_in, self.k).transpose(1, 0, 2))
            w2 = w2.reshape(self.c_in, -1)
            self._hosvd_v = psd_eigh(w2 @ w2.T)[1]
        return xp.ascontiguousarray(self._hosvd_v[:, :r_in])

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

    def _data_in_factors(self):
        if getattr(self, "_data_factors", None) is None:
            xp = self.xp
            ud = psd_eigh(self.ws @ self.w.T)[1]  # data-aware SVD output basis
            sc, sk = self.kron_factors()
            wc, vc = psd_eigh(sc)
            wk, vk = psd_eigh(sk)
            sc_half = (vc * xp.sqrt(wc)) @ vc.T
            sk_half = (vk * xp.sqrt(wk)) @ vk.T
            keep = wc > float(wc[0]) * self.c_in * np.finfo(np.float64).eps
            sc_pinv_half = (vc[:, keep] / xp.sqrt(wc[keep])) @ vc[:, keep].T
            self._data_factors = (ud, sc_half, sk_half, sc_pinv_half)
        return self._data_factors

    def data_in(self, r_out, r_in):
        """Data-aware input basis: the data-aware SVD output basis U_d (top R_out eigenvectors
        of W S W^T) projects W; the input mode of U_d^T W is then truncated in the metric of
        the nearest Kronecker factorisation S ~ Sc (x) Sk (exact if S is separable), and
        mapped back with Sc^{+1/2}."""
        xp = self.xp
        c, k = self.c_in, self.k
        ud, sc_half, sk_half, sc_pinv_half = self._data_in_factors()
        z = ud[:, :r_out].T @ self.w  # (R_out, d)
        z3 = z.reshape(-1, c, k) @ sk_half  # x_3 Sk^1/2
        zc = sc_half @ xp.ascontiguousarray(z3.transpose(1, 0, 2)).reshape(c, -1)  # x_2 Sc^1/2
        v = psd_eigh(zc @ zc.T)[1][:, :r_in]
        q, _ = xp.linalg.qr(sc_pinv_half @ v)
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
    cg_forcing: float = 0.3,
    cg_maxiter: int = 3,
    precondition: bool = True,
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
        an inexact but monotone inner solve (measured on 512x512x3x3: 3 products per
        sweep converge in as many sweeps as exact solves).
    precondition : use the nearest-Kronecker-product preconditioner in CG.
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
    sweep_seconds: list[float] = []
    for _ in range(max_iter):
        if err <= slack:
            converged = True
            break
        t_sweep = time.perf_counter()
        op, rhs, pre, res0 = prob.input_system(u_out, g, r_in, u_in)
        t0 = time.perf_counter()
        sol = cg(op, rhs, x0=u_in, r0=res0, precond=pre if precondition else None, tol=1e-14,
                 rtol_initial=cg_forcing, maxiter=cg_maxiter)
        prob._tick("input_cg", t0)
        cg_its.append(sol.iterations)
        t0 = time.perf_counter()
        q = orthonormal_basis(sol.x)
        prob._tick("qr", t0)
        new_out, new_g, new_err = prob.output_step(q, r_out)[:3]
        iterations += 1
        sweep_seconds.append(time.perf_counter() - t_sweep)
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
        sweep_seconds=sweep_seconds,
        timings=dict(prob.timings),
        psd=prob.psd,
    )


def tucker2_output_step(W, S, u_in, r_out, *, xp=np):
    """The closed-form output step alone: best (U_out, core) for span(U_in) under S.

    U_in is orthonormalised first (only its span matters). Returns
    ``(u_out, core (R_out, R_in, kh, kw), u_in_orthonormal, error)``.
    """
    w_host = np.asarray(to_numpy(W), dtype=np.float64)
    _check_weight(w_host)
    c_out, c_in, kh, kw = w_host.shape
    u = to_backend(xp, to_numpy(u_in))
    _check_ranks(w_host.shape, (r_out, u.shape[1]))
    s = to_backend(xp, to_numpy(S))
    _check_stats(w_host, s)
    prob = _DataProblem(to_backend(xp, w_host), s, xp)
    q, _ = xp.linalg.qr(u)
    u_out, g, err, _ = prob.output_step(q, r_out)
    return to_numpy(u_out), to_numpy(g).reshape(r_out, -1, kh, kw), to_numpy(q), err


def tucker2_input_step(W, S, u_out, core, u_in0=None, *, method="cg", tol=1e-10, maxiter=None,
                       precondition=True, xp=np):
    """The input step alone: the least-squares U_in for fixed (U_out, core) under S.

    Solves the (C_in*R_in)^2 normal equations matrix-free (``method`` "cg" or
    "minres", nearest-Kronecker preconditioner unless ``precondition=False``) from
    ``u_in0`` (zeros if None) to relative residual ``tol``. Returns
    ``(u_in, KrylovResult)``; U_in is not orthonormalised. ``u_out`` must have
    orthonormal columns.
    """
    from .linalg import minres

    w_host = np.asarray(to_numpy(W), dtype=np.float64)
    _check_weight(w_host)
    c_out, c_in, kh, kw = w_host.shape
    g = to_backend(xp, to_numpy(core))
    r_out, r_in = g.shape[:2]
    _check_ranks(w_host.shape, (r_out, r_in))
    s = to_backend(xp, to_numpy(S))
    _check_stats(w_host, s)
    prob = _DataProblem(to_backend(xp, w_host), s, xp)
    op, rhs, pre, _ = prob.input_system(to_backend(xp, to_numpy(u_out)), g.reshape(r_out, -1), r_in)
    x0 = None if u_in0 is None else to_backend(xp, to_numpy(u_in0))
    solver = {"cg": cg, "minres": minres}.get(method)
    if solver is None:
        raise OnnxcompError(f"unknown Krylov method {method!r}: use 'cg' or 'minres'")
    res = solver(op, rhs, x0=x0, precond=pre if precondition else None, tol=tol, maxiter=maxiter)
    res.x = to_numpy(res.x)
    return res.x, res


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


# ============================================================================ ranks


class Tucker2Cost(NamedTuple):
    """Parameters and multiply-adds per output position of a layer (bias excluded)."""

    params: int
    macs: float


def tucker2_cost(C_out, C_in, kh, kw, R_out, R_in, *, in_positions: float = 1.0) -> Tucker2Cost:
    """Cost of the 1x1 (C_in -> R_in) -> kxk (R_in -> R_out) -> 1x1 (R_out -> C_out) chain.

    ``params = C_in*R_in + R_in*R_out*kh*kw + R_out*C_out``; MACs per output
    position are the same, except that the first 1x1 conv runs at the input
    resolution: ``in_positions`` = input positions per output position
    (stride_h*stride_w for a 'same' conv; 1 by default).
    """
    k = kh * kw
    params = C_in * R_in + R_in * R_out * k + R_out * C_out
    macs = in_positions * C_in * R_in + R_in * R_out * k + R_out * C_out
    return Tucker2Cost(int(params), float(macs))


def dense_cost(C_out, C_in, kh, kw) -> Tucker2Cost:
    """Cost of the original kxk conv in the same units as :func:`tucker2_cost`."""
    n = C_out * C_in * kh * kw
    return Tucker2Cost(n, float(n))


def _budget(shape, fraction, measure):
    if not (0.0 < float(fraction) <= 1.0):
        raise OnnxcompError(f"the fraction of {measure} kept must be in (0, 1], got {fraction!r}")
    if measure not in ("params", "macs"):
        raise OnnxcompError(f"unknown cost measure {measure!r}: use 'params' or 'macs'")
    c_out, c_in, kh, kw = shape
    return float(fraction) * dense_cost(c_out, c_in, kh, kw)[0]


def _max_r_out(shape, r_in, budget, measure, in_positions):
    """Largest R_out (<= C_out) whose chain with this R_in fits the budget; 0 if none."""
    c_out, c_in, kh, kw = shape
    first = (in_positions if measure == "macs" else 1.0) * c_in * r_in
    r = math.floor((budget - first) / (r_in * kh * kw + c_out) + 1e-9)
    return int(min(max(r, 0), c_out))


def _cost_of(shape, r_out, r_in, measure, in_positions):
    c = tucker2_cost(*shape, r_out, r_in, in_positions=in_positions)
    return c.params if measure == "params" else c.macs


def balanced_ranks(C_out, C_in, kh, kw, fraction, *, measure="params", in_positions=1.0) -> tuple[int, int]:
    """The usual fixed formula: R_out / R_in = C_out / C_in, largest pair within the budget."""
    shape = (C_out, C_in, kh, kw)
    budget = _budget(shape, fraction, measure)
    rho = C_out / C_in
    k = kh * kw
    first = (in_positions if measure == "macs" else 1.0) * C_in
    a, b = rho * k, first + rho * C_out
    r = (-b + math.sqrt(b * b + 4 * a * budget)) / (2 * a)
    r_in = max(1, min(C_in, int(math.floor(r))))
    r_out = max(1, min(C_out, int(math.floor(rho * r))))
    while _cost_of(shape, r_out, r_in, measure, in_positions) > budget and (r_out > 1 or r_in > 1):
        if r_in > 1 and (r_in / C_in >= r_out / C_out or r_out == 1):
            r_in -= 1
        else:
            r_out -= 1
    return r_out, r_in


@dataclass
class RankSearch:
    """Result of :func:`search_ranks`: the chosen pair and the proxy curve behind it."""

    ranks: tuple[int, int]  # (R_out, R_in)
    proxy_error: float  # data error at the chosen pair after init + closed-form output step
    reference: float  # tr(W S W^T)
    budget: float
    measure: str
    cost: float  # of the chosen pair
    balanced: tuple[int, int]  # the fixed-formula pair, for comparison
    balanced_proxy_error: float
    table: list = field(default_factory=list)  # (R_out, R_in, cost, proxy error) for every pair tried
    seconds: float = 0.0


def search_ranks(
    W,
    S=None,
    fraction=0.5,
    *,
    measure: str = "params",
    in_positions: float = 1.0,
    grid: int = 8,
    refine: int = 4,
    multiple: int = 1,
    xp=np,
) -> RankSearch:
    """Choose (R_out, R_in) for a budget by minimising the data error, not by a formula.

    For each R_in on a coarse grid (plus the balanced pair's R_in), R_out is the
    largest rank the budget allows (the error decreases with R_out), and the pair
    is scored by a cheap proxy: the data error of the solver's own initialisation
    (the better of the HOSVD and data-aware input bases) followed by the exact
    closed-form output step; this is an upper bound of what the ALS reaches
    there. ``refine`` more R_in values are then scored between the best grid point's
    neighbours. Only the chosen pair is left to be refined by :func:`tucker2`.
    S=None scores under the Frobenius norm. Ranks are multiples of ``multiple``
    where the layer allows.
    """
    t_start = time.perf_counter()
    w_host = np.asarray(to_numpy(W), dtype=np.float64)
    _check_weight(w_host)
    shape = w_host.shape
    c_out, c_in, kh, kw = shape
    budget = _budget(shape, fraction, measure)
    d = c_in * kh * kw
    if S is None:
        s = xp.eye(d)
    else:
        s = to_backend(xp, to_numpy(S))
        _check_stats(w_host, s)
    prob = _DataProblem(to_backend(xp, w_host), s, xp)
    m = max(1, int(multiple))

    def snap(r, top):
        return int(min(top, max(m, (r // m) * m))) if top >= m else int(max(1, min(r, top)))

    scores: dict[int, tuple] = {}

    def score(r_in):
        r_in = snap(r_in, c_in)
        if r_in in scores:
            return scores[r_in]
        r_out = _max_r_out(shape, r_in, budget, measure, in_positions)
        if r_out >= m:
            r_out = (r_out // m) * m
        if r_out < 1:
            scores[r_in] = None
            return None
        best = math.inf
        for u in (prob.hosvd_in(r_in), prob.data_in(r_out, r_in)):
            best = min(best, prob.output_step(u, r_out)[2])
        scores[r_in] = (r_out, r_in, _cost_of(shape, r_out, r_in, measure, in_positions), best)
        return scores[r_in]

    r_in_max = 1
    while r_in_max < c_in and _max_r_out(shape, r_in_max + 1, budget, measure, in_positions) >= 1:
        r_in_max += 1
    if _max_r_out(shape, 1, budget, measure, in_positions) < 1:
        raise OnnxcompError(
            f"a Tucker-2 chain cannot fit {fraction:.3g} of the {measure} of a {c_out}x{c_in}x{kh}x{kw} conv, "
            "even at ranks (1, 1)"
        )
    bal = balanced_ranks(c_out, c_in, kh, kw, fraction, measure=measure, in_positions=in_positions)
    coarse = sorted({int(round(v)) for v in np.linspace(1, r_in_max, max(2, grid))} | {bal[1]})
    for r in coarse:
        score(r)
    valid = [v for v in scores.values() if v is not None]
    best = min(valid, key=lambda v: v[3])
    # refine between the neighbours of the best coarse point
    keys = sorted(k for k, v in scores.items() if v is not None)
    i = keys.index(best[1])
    lo = keys[i - 1] if i > 0 else best[1]
    hi = keys[i + 1] if i + 1 < len(keys) else best[1]
    if refine > 0 and hi - lo > 2:
        for r in np.linspace(lo, hi, refine + 2)[1:-1]:
            score(int(round(r)))
    valid = [v for v in scores.values() if v is not None]
    best = min(valid, key=lambda v: v[3])
    # the balanced pair itself (its R_out may differ from the budget's maximum)
    bal_err = math.inf
    for u in (prob.hosvd_in(bal[1]), prob.data_in(bal[0], bal[1])):
        bal_err = min(bal_err, prob.output_step(u, bal[0])[2])
    if bal_err < best[3]:
        best = (bal[0], bal[1], _cost_of(shape, bal[0], bal[1], measure, in_positions), bal_err)
    return RankSearch(
        ranks=(best[0], best[1]),
        proxy_error=best[3],
        reference=prob.reference,
        budget=budget,
        measure=measure,
        cost=best[2],
        balanced=bal,
        balanced_proxy_error=bal_err,
        table=sorted(valid, key=lambda v: v[1]),
        seconds=time.perf_counter() - t_start,
    )


def _threshold_rank(values, tau, method):
    """Smallest k whose leading ``values`` reach ``tau`` of the total (ARSVD's rule)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    if method == "energy":  # values are eigenvalues = squared singular values
        share = v
    elif method == "entropy":
        sv = np.sqrt(v)
        p = sv / sv.sum() if sv.sum() > 0 else sv
        share = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    else:
        raise OnnxcompError(f"unknown threshold method {method!r}: use 'energy' or 'entropy'")
    total = share.sum()
    if total <= 0:
        return 1
    c = np.cumsum(share)
    return int(min(len(v), np.searchsorted(c, tau * total * (1 - 1e-12)) + 1))


def energy_ranks(W, S=None, tau: float = 0.9, *, method: str = "energy", xp=np) -> tuple[int, int]:
    """Per-mode threshold ranks (R_out, R_in): smallest ranks keeping ``tau`` of each mode's energy.

    Output mode: eigenvalues of W S W^T, the data-aware spectrum (the error of the
    data-aware SVD at rank r is exactly the sum of the discarded ones); W W^T
    without S. Input mode: the data norm does not split over input channels, so its
    spectrum is taken in the metric of the nearest Kronecker factorisation
    S ~ Sc (x) Sk (exact when S is separable); the plain mode-2 unfolding without S.
    ``method="entropy"`` uses ARSVD's spectral-entropy rule instead of energy.
    """
    if not (0.0 < float(tau) <= 1.0):
        raise OnnxcompError(f"energy threshold tau must be in (0, 1], got {tau!r}")
    w_host = np.asarray(to_numpy(W), dtype=np.float64)
    _check_weight(w_host)
    c_out, c_in, kh, kw = w_host.shape
    k = kh * kw
    w = to_backend(xp, w_host)
    w1 = w.reshape(c_out, -1)
    if S is None:
        spec_out = to_numpy(xp.linalg.eigvalsh(w1 @ w1.T))[::-1]
        w2 = xp.ascontiguousarray(w.reshape(c_out, c_in, k).transpose(1, 0, 2)).reshape(c_in, -1)
        spec_in = to_numpy(xp.linalg.eigvalsh(w2 @ w2.T))[::-1]
    else:
        s = to_backend(xp, to_numpy(S))
        _check_stats(w_host, s)
        prob = _DataProblem(w, s, xp, check_psd=False)
        spec_out = to_numpy(xp.linalg.eigvalsh(symmetrize(prob.ws @ prob.w.T)))[::-1]
        sc, sk = prob.kron_factors()
        wc, vc = psd_eigh(sc)
        wk, vk = psd_eigh(sk)
        z = w.reshape(c_out, c_in, k) @ ((vk * xp.sqrt(wk)) @ vk.T)
        zc = (vc * xp.sqrt(wc)) @ vc.T @ xp.ascontiguousarray(z.transpose(1, 0, 2)).reshape(c_in, -1)
        spec_in = to_numpy(xp.linalg.eigvalsh(zc @ zc.T))[::-1]
    return _threshold_rank(spec_out, tau, method), _threshold_rank(spec_in, tau, method)


# ---------------------------------------------------------------------------- EVBMF


def _evb_tau(x, alpha):
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _evb_objective(sigma2, L, M, s, n_zero, xubar):
    alpha = L / M
    x = s**2 / (M * sigma2)
    z1 = x[x > xubar]
    z2 = x[x <= xubar]
    tau_z1 = _evb_tau(z1, alpha)
    term1 = np.sum(z2 - np.log(z2))
    term2 = np.sum(z1 - tau_z1)
    term3 = np.sum(np.log((tau_z1 + 1) / z1))
    term4 = alpha * np.sum(np.log(tau_z1 / alpha + 1))
    return term1 + term2 + term3 + term4 + n_zero * np.log(sigma2)


def evbmf(Y, sigma2=None):
    """Analytic empirical variational Bayes matrix factorisation (Nakajima et al., JMLR 2013).

    Returns ``(rank, sigma2)``: the number of components EVB keeps and the noise
    variance (estimated by minimising the EVB free energy over its analytic
    bounds unless given). The data-free rank rule of Kim et al. 2016 and MUSCO.
    """
    y = np.asarray(to_numpy(Y), dtype=np.float64)
    if y.ndim != 2 or min(y.shape) < 1:
        raise OnnxcompError(f"EVBMF needs a non-empty matrix, got shape {y.shape}")
    if y.shape[0] > y.shape[1]:
        y = y.T
    L, M = y.shape
    alpha = L / M
    tauubar = 2.5129 * np.sqrt(alpha)
    s = np.linalg.svd(y, compute_uv=False)
    if s[0] <= 0:
        return 0, 0.0
    if sigma2 is None:
        xubar = (1 + tauubar) * (1 + alpha / tauubar)
        eh_ub = int(min(np.ceil(L / (1 + alpha)) - 1, L)) - 1
        upper = np.sum(s**2) / (L * M)
        tail = s[eh_ub + 1:] if eh_ub + 1 < L else s[-1:]
        lower = max(tail[0] ** 2 / (M * xubar), np.mean(tail**2) / M)
        lower = max(lower, upper * 1e-12)
        if lower >= upper:
            sigma2 = upper
        else:
            pos = s[s > 0]
            n_zero = L - len(pos)

            def f(v):
                return _evb_objective(v, L, M, pos, n_zero, xubar)

            # a log-spaced scan (the objective can have several local minima), then golden section
            grid = np.geomspace(lower, upper, 200)
            vals = np.array([f(v) for v in grid])
            i = int(np.argmin(vals))
            a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
            g = (math.sqrt(5) - 1) / 2
            c, d = b - g * (b - a), a + g * (b - a)
            fc, fd = f(c), f(d)
            for _ in range(80):
                if fc < fd:
                    b, d, fd = d, c, fc
                    c = b - g * (b - a)
                    fc = f(c)
                else:
                    a, c, fc = c, d, fd
                    d = a + g * (b - a)
                    fd = f(d)
            sigma2 = 0.5 * (a + b)
    threshold = np.sqrt(M * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    return int(np.sum(s > threshold)), float(sigma2)


def evbmf_ranks(W) -> tuple[int, int]:
    """EVBMF ranks (R_out, R_in) of the mode-1 (C_out x C_in*K) and mode-2 (C_in x C_out*K)
    unfoldings, at least 1 each (data-free, as Kim et al. 2016 / MUSCO)."""
    w = np.asarray(to_numpy(W), dtype=np.float64)
    _check_weight(w)
    c_out, c_in = w.shape[:2]
    r_out, _ = evbmf(w.reshape(c_out, -1))
    r_in, _ = evbmf(w.transpose(1, 0, 2, 3).reshape(c_in, -1))
    return max(1, min(r_out, c_out)), max(1, min(r_in, c_in))
