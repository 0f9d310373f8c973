"""The CP solver: alternating least squares under the data norm, one block at a time.

Each sweep steps B, then (H, V | K), then A, each block's exact quadratic evaluated
before and after its step (a step that would raise the error is reverted, so the
error never increases). The channel (B) step is formed and solved exactly when its
(C_in R)^2 system is small (``exact_channel_limit``), else it runs preconditioned
CG warm-started at the current B, its first product taken from the A step's
``S M^T``. After each factor step its columns are normalised and the scales moved
into A. After each sweep an Anderson-accelerated candidate (:mod:`.anderson`)
replaces the sweep's result when its exact error is lower.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..backend import to_backend, to_numpy
from ..checks import check_conv_weight, check_norm, check_patch_stats
from ..factors import CPFactors
from ..krylov import cg
from ..linalg import khatri_rao, normalize_into, psd_solve
from ..objective import data_error
from ..record import CPResult
from .anderson import Anderson
from .frobenius import frobenius_cp
from .init import INIT_ITER, best_start, initial_patches
from .problem import ChannelOperator, CPProblem, Iterate, channel_preconditioner
from .ranks import check_cp_rank, check_form

# the channel-mode system is formed explicitly (and solved exactly) up to this size
EXACT_CHANNEL_LIMIT = 1024


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
    exact_channel_limit: int = EXACT_CHANNEL_LIMIT,
) -> CPResult:
    """CP of a conv weight minimising the data error tr(dW S dW^T).

    Parameters
    ----------
    W : (C_out, C_in, kh, kw). S : (d, d) input patch covariance, d = C_in*kh*kw, ordered
        (c, i, j); may be singular (None only with ``norm="frobenius"``).
    rank : R, 1 <= R <= :func:`~.ranks.cp_max_rank` (else OnnxcompError).
    form : "4way" (A, B, H, V) or "3way" (A, B, kernel).
    norm : "data" (ALS under S) or "frobenius" (plain CP-ALS, the data-free baseline;
        errors are still reported under S when S is given).
    xp : numpy or cupy; results come back as NumPy float64.
    tol, max_iter : stop when the relative improvement of the error in one sweep is
        below ``tol``, or after ``max_iter`` sweeps.
    ridge : relative Tikhonov term of every block system (against CP degeneracy).
    init : "auto" (the better of "frobenius" and "tucker2" after the closed-form A step),
        "frobenius", "tucker2", or the :class:`~..factors.CPFactors` of an earlier solve
        (a warm start; data norm only).
    cg_forcing, cg_maxiter : the channel (B) step runs preconditioned CG from the current
        B until its residual drops by ``cg_forcing`` or ``cg_maxiter`` products (only
        when the (C_in R)^2 system exceeds ``exact_channel_limit``; else an exact solve).
        The Kronecker preconditioner cuts the residual by only ~0.85 per product on
        realistic layers: 8 products make the sweep map consistent enough for the
        acceleration to be kept in most sweeps (4 do not; 16 cost more than they gain).
    accelerate : after each sweep, try the Anderson-accelerated candidate (see
        :class:`~.anderson.Anderson`), kept only when it lowers the error; False gives plain ALS.
    init_iter : most sweeps of the Frobenius CP-ALS behind the initial candidates
        (default INIT_ITER; it stops earlier once a sweep gains less than INIT_TOL).
    exact_channel_limit : largest C_in * R whose channel system is formed and solved exactly.
    """
    t_start = time.perf_counter()
    check_form(form)
    w_host = np.asarray(to_numpy(W), dtype=np.float64)
    check_conv_weight(w_host, "CP")
    r = check_cp_rank(w_host.shape, rank, form)
    check_norm(norm, S)
    s_host = None if S is None else np.asarray(to_numpy(S), dtype=np.float64)
    if s_host is not None:
        check_patch_stats(w_host, s_host)
    result = _Result(w_host, s_host, form, t_start)
    w = to_backend(xp, w_host)
    if norm == "frobenius":
        return _frobenius(w, to_backend(xp, s_host), r, form, result, tol=tol, max_iter=max_iter, ridge=ridge,
                          seed=seed)
    prob = CPProblem(w, to_backend(xp, s_host), form, ridge, check_psd=check_psd)
    with prob.timer("init"):
        cands = initial_patches(init, w_host, s_host, prob, r, form, ridge, seed,
                                INIT_ITER if init_iter is None else int(init_iter))
        start, init_name, init_errors = best_start(prob, cands)
    loop = _Loop(prob, start, exact_channel=w_host.shape[1] * r <= exact_channel_limit, cg_forcing=cg_forcing,
                 cg_maxiter=cg_maxiter, anderson=Anderson() if accelerate else None)
    loop.run(tol=tol, max_iter=max_iter, t_start=t_start)
    anderson = loop.anderson
    return result(loop.it.a, loop.it.patch, loop.errors, start.err, len(loop.errors), loop.converged, "data",
                  init_name, init_errors=init_errors, cg_iterations=loop.cg_iterations, reverted=loop.reverted,
                  timings=dict(prob.timings), psd=prob.psd, error_seconds=loop.error_seconds,
                  initial_seconds=prob.timings["setup"] + prob.timings["init"],
                  accelerated=(anderson.accepted, anderson.tried) if anderson else (0, 0))


@dataclass
class _Result:
    """Builds the :class:`CPResult` from backend factors: host copies, kernel layout, direct error."""

    w: np.ndarray
    s: np.ndarray | None
    form: str
    t_start: float

    def __call__(self, a, patch, errors, initial, iterations, converged, norm, init, **extra) -> CPResult:
        a = to_numpy(a).astype(np.float64)
        patch = [to_numpy(p).astype(np.float64) for p in patch]
        if self.form == "4way":
            factors = CPFactors("4way", a, patch[0], h=patch[1], v=patch[2])
        else:
            kh, kw = self.w.shape[2:]
            factors = CPFactors("3way", a, patch[0], kernel=np.ascontiguousarray(patch[1].T).reshape(-1, kh, kw))
        return CPResult(
            factors=factors, error=data_error(self.w, self.s, factors.weight()), initial_error=initial,
            errors=errors, reference=data_error(self.w, self.s, np.zeros_like(self.w)), iterations=iterations,
            converged=converged, seconds=time.perf_counter() - self.t_start, norm=norm, init=init, **extra,
        )


def _frobenius(w, s, r, form, result: _Result, *, tol, max_iter, ridge, seed) -> CPResult:
    """Plain CP-ALS of W, each sweep's error reported under S when S is given."""
    c_out = w.shape[0]
    w1 = w.reshape(c_out, -1)
    t = w if form == "4way" else w.reshape(c_out, w.shape[1], -1)

    def report(factors):
        return data_error(w1, s, (khatri_rao(factors[1:]) @ factors[0].T).T)

    f, errors, its, conv = frobenius_cp(t, r, tol=tol, max_iter=max_iter, ridge=ridge, seed=seed, report=report)
    return result(f[0], f[1:], errors, errors[0] if errors else float("nan"), its, conv, "frobenius", "frobenius")


@dataclass
class _SweepStats:
    cg_iterations: int = 0
    reverted: int = 0


class _Loop:
    """The sweeps from ``start`` until the relative gain of one sweep is below ``tol``."""

    def __init__(self, prob: CPProblem, start: Iterate, *, exact_channel, cg_forcing, cg_maxiter, anderson):
        self.prob, self.it, self.anderson = prob, start, anderson
        self.sweep_options = {"exact_channel": exact_channel, "cg_forcing": cg_forcing, "cg_maxiter": cg_maxiter}
        self.errors: list[float] = []
        self.error_seconds: list[float] = []
        self.cg_iterations: list[int] = []
        self.reverted = 0
        self.converged = False

    def run(self, *, tol, max_iter, t_start) -> None:
        slack = 1e-13 * max(self.prob.reference, 1e-300)
        for _ in range(max_iter):
            if self.it.err <= slack:
                self.converged = True
                return
            start = self.it
            self.it, stats = als_sweep(self.prob, start, **self.sweep_options)
            self.cg_iterations.append(stats.cg_iterations)
            self.reverted += stats.reverted
            if self.anderson is not None and self.it.err < start.err:
                self.it = self.anderson(self.prob, start, self.it)
            self.errors.append(self.it.err)
            self.error_seconds.append(time.perf_counter() - t_start)
            improvement = (start.err - self.it.err) / start.err if start.err > 0 else 0.0
            if improvement < tol:
                self.converged = True
                return


def als_sweep(prob: CPProblem, it: Iterate, *, exact_channel, cg_forcing, cg_maxiter):
    """One sweep B, (H, V | K), A; every block step is kept only if it does not raise the
    error. Returns (new Iterate, _SweepStats)."""
    stats = _SweepStats()
    a, patch = it.a, list(it.patch)
    with prob.timer("channel_step"):
        x, e_new, e_before = _channel_step(prob, it, stats, exact=exact_channel, cg_forcing=cg_forcing,
                                           cg_maxiter=cg_maxiter)
        saved = (patch[0], a)
        if e_new is None or e_new <= e_before:
            patch[0], a = normalize_into(x, a)
        else:
            stats.reverted += 1
    with prob.timer("spatial_steps"):
        a = _spatial_steps(prob, a, patch, saved, e_new, e_before, stats)
    with prob.timer("a_step"):
        g, wsm, sm = prob.a_system(patch)
        e_cur = prob.a_error(a, g, wsm)
        x = prob.a_solve(g, wsm)
        e_new = prob.a_error(x, g, wsm)
        if e_new <= e_cur:
            a, err = x, e_new
        else:
            stats.reverted += 1
            err = e_cur
    return Iterate(a, patch, err, sm), stats


def _spatial_steps(prob: CPProblem, a, patch, saved, e_channel, e_before, stats):
    """Steps of the spatial factors (H, V) or K in place in ``patch``; returns A (rescaled).
    An unchecked (inexact CG) channel step that raised the error is undone first: the first
    spatial system's quadratic at the current factors tells for free."""
    slack = 1e-13 * max(prob.reference, 1e-300)
    for m in range(1, len(patch)):
        nmat, rhs = prob.small_system(m, a, patch)
        e_cur = prob.quad(nmat, rhs, patch[m])
        if m == 1 and e_channel is None and e_cur > e_before + slack:  # the inexact B step raised E
            stats.reverted += 1
            patch[0], a = saved
            nmat, rhs = prob.small_system(m, a, patch)
            e_cur = prob.quad(nmat, rhs, patch[m])
        x = prob.small_solve(nmat, rhs)
        if prob.quad(nmat, rhs, x) <= e_cur:
            patch[m], a = normalize_into(x, a)
        else:
            stats.reverted += 1
    return a


def _channel_step(prob: CPProblem, it: Iterate, stats: _SweepStats, *, exact, cg_forcing, cg_maxiter):
    """B step. Returns (candidate B, its error or None when unchecked (inexact CG: the next
    block step's quadratic checks it for free), the error at the current B)."""
    xp = prob.xp
    a, b0 = it.a, it.patch[0]
    g = khatri_rao(it.patch[1:])  # (K, R)
    ata = a.T @ a
    rhs = prob.channel_rhs(a, g)
    lam = prob.channel_lam(ata, g)
    if exact:
        big = prob.channel_matrix(ata, g)
        x, _ = psd_solve(big + lam * xp.eye(big.shape[0]), rhs.reshape(1, -1))
        x = x.reshape(b0.shape)
        return x, prob.quad(big, rhs, x), prob.quad(big, rhs, b0)
    op = ChannelOperator(prob.s, g, ata, prob.c_in)
    ab0 = op.through_s(it.sm) if it.sm is not None else op(b0)
    e_cur = prob.energy(rhs, b0, ab0)
    sol = cg(lambda y: op(y) + lam * y, rhs, x0=b0, r0=rhs - ab0 - lam * b0,
             precond=channel_preconditioner(prob, g, ata), tol=1e-14, rtol_initial=cg_forcing, maxiter=cg_maxiter)
    stats.cg_iterations += sol.iterations
    return sol.x, None, e_cur
