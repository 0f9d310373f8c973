"""The Tucker-2 solver: alternating least squares under the data norm.

Each sweep runs the two block steps of :mod:`.problem`, each solved exactly or
monotonically, so the data error never increases:

- input step: preconditioned CG on the normal equations of U_in, matrix-free (two
  GEMMs per product), warm-started at the current U_in, with the
  nearest-Kronecker-product preconditioner; inexact (it stops once the residual
  has dropped by a forcing factor) but monotone. Then an orthonormal basis: only
  span(U_in) matters to the next output step.
- output step: closed form for (U_out, G) given span(U_in); its error decides
  convergence.

The initial U_in is the better of the HOSVD and the data-aware basis after one
output step. ``norm="frobenius"`` runs the data-free baseline (:mod:`.hooi`).
"""

from __future__ import annotations

import time

import numpy as np

from ...errors import OnnxcompError
from ..backend import to_backend, to_numpy
from ..checks import check_conv_weight, check_norm, check_patch_stats
from ..factors import Tucker2Factors, tucker2_reconstruct
from ..krylov import cg
from ..linalg import orthonormal_basis
from ..objective import data_error
from ..record import Tucker2Result
from .hooi import hooi
from .problem import Tucker2Problem


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
        :meth:`Tucker2Problem.data_in`), or a (C_in, R_in) array for U_in.
    cg_forcing, cg_maxiter : each input step runs preconditioned CG from the current
        U_in until the residual drops by ``cg_forcing`` (or ``cg_maxiter`` products):
        an inexact but monotone inner solve (measured on 512x512x3x3: 3 products per
        sweep converge in as many sweeps as exact solves).
    precondition : use the nearest-Kronecker-product preconditioner in CG.
    check_psd : check S by Cholesky and project it onto the PSD cone if it fails.
    """
    t_start = time.perf_counter()
    w_host = np.asarray(to_numpy(W), dtype=np.float64)
    check_conv_weight(w_host, "Tucker-2")
    r_out, r_in = check_tucker2_ranks(w_host.shape, ranks)
    check_norm(norm, S)
    w = to_backend(xp, w_host)
    s = None
    if S is not None:
        s = to_backend(xp, to_numpy(S))
        check_patch_stats(w_host, s)
    if norm == "frobenius":
        return hooi(w, s, r_out, r_in, tol=tol, max_iter=max_iter, check_psd=check_psd, t_start=t_start)
    prob = Tucker2Problem(w, s, check_psd=check_psd)
    with prob.timer("init"):
        start, init_name, init_errors = _initial_iterate(prob, init, r_out, r_in)
    sweeps = _Sweeps(prob, start, r_out, r_in, cg_forcing=cg_forcing, cg_maxiter=cg_maxiter,
                     precondition=precondition)
    sweeps.run(tol=tol, max_iter=max_iter)
    u_in, u_out, g, _ = sweeps.best
    core = g.reshape(r_out, r_in, w.shape[2], w.shape[3])
    with prob.timer("final_eval"):
        final = data_error(w, prob.s, tucker2_reconstruct(u_out, core, u_in))
    factors = Tucker2Factors(u_out=to_numpy(u_out).astype(np.float64), core=to_numpy(core).astype(np.float64),
                             u_in=to_numpy(u_in).astype(np.float64))
    return Tucker2Result(
        factors=factors, error=final, initial_error=start[3], errors=sweeps.errors, reference=prob.reference,
        iterations=sweeps.iterations, converged=sweeps.converged, seconds=time.perf_counter() - t_start,
        norm="data", init=init_name, init_errors=init_errors,
        cg_iterations=sweeps.cg_iterations, sweep_seconds=sweeps.seconds, timings=dict(prob.timings), psd=prob.psd,
    )


def check_tucker2_ranks(shape, ranks) -> tuple[int, int]:
    """(R_out, R_in) as ints with 1 <= R_out <= C_out and 1 <= R_in <= C_in."""
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


def _initial_iterate(prob: Tucker2Problem, init, r_out: int, r_in: int):
    """The best initial candidate as (U_in, U_out, G, error), its name, and {candidate: error}."""
    xp = prob.xp
    if isinstance(init, str):
        if init not in ("auto", "hosvd", "data"):
            raise OnnxcompError(f"unknown init {init!r}: use 'auto', 'hosvd', 'data' or an array")
        bases = {}
        if init in ("auto", "hosvd"):
            bases["hosvd"] = prob.hosvd_in(r_in)
        if init in ("auto", "data"):
            bases["data"] = prob.data_in(r_out, r_in)
    else:
        u0 = to_backend(xp, to_numpy(init))
        if u0.shape != (prob.c_in, r_in):
            raise OnnxcompError(f"init U_in has shape {tuple(u0.shape)}, need ({prob.c_in}, {r_in})")
        bases = {"given": xp.linalg.qr(u0)[0]}
    cands = {name: (u0,) + prob.output_step(u0, r_out)[:3] for name, u0 in bases.items()}
    init_errors = {name: c[3] for name, c in cands.items()}
    best = min(init_errors, key=init_errors.get)
    return cands[best], best, init_errors


def sweep_from(prob: Tucker2Problem, u_in, r_out: int, sweeps: int, *, cg_forcing: float = 0.3,
               cg_maxiter: int = 3, precondition: bool = True):
    """``sweeps`` ALS sweeps at (R_out, R_in = U_in's columns) from the input basis ``u_in``, on a
    problem already set up (a budget's candidate curve scores several pairs on one): the best input
    basis reached and its data error (an output step's, exact; never above the start's)."""
    start = (u_in,) + prob.output_step(u_in, r_out)[:3]
    run = _Sweeps(prob, start, r_out, u_in.shape[1], cg_forcing=cg_forcing, cg_maxiter=cg_maxiter,
                  precondition=precondition)
    run.run(tol=0.0, max_iter=sweeps)
    return run.best[0], run.best[3]


class _Sweeps:
    """The ALS loop: input step (CG), orthonormal basis, output step; keeps the best iterate."""

    def __init__(self, prob: Tucker2Problem, start, r_out: int, r_in: int, *, cg_forcing, cg_maxiter,
                 precondition):
        self.prob, self.best, self.r_out, self.r_in = prob, start, r_out, r_in
        self.cg_options = {"tol": 1e-14, "rtol_initial": cg_forcing, "maxiter": cg_maxiter}
        self.precondition = precondition
        self.errors: list[float] = []
        self.cg_iterations: list[int] = []
        self.seconds: list[float] = []
        self.iterations = 0
        self.converged = False

    def run(self, *, tol: float, max_iter: int) -> None:
        slack = 1e-12 * max(self.prob.reference, 1e-300)
        for _ in range(max_iter):
            err = self.best[3]
            if err <= slack:
                self.converged = True
                return
            t_sweep = time.perf_counter()
            candidate = self._sweep()
            self.iterations += 1
            self.seconds.append(time.perf_counter() - t_sweep)
            new_err = candidate[3]
            if new_err > err + slack:  # only rounding can do this: keep the best iterate and stop
                self.errors.append(err)
                self.converged = True
                return
            self.best = candidate
            self.errors.append(new_err)
            improvement = (err - new_err) / err if err > 0 else 0.0
            if improvement < tol:
                self.converged = True
                return

    def _sweep(self):
        prob = self.prob
        u_in, u_out, g, _ = self.best
        op, rhs, pre, res0 = prob.input_system(u_out, g, self.r_in, u_in)
        with prob.timer("input_cg"):
            sol = cg(op, rhs, x0=u_in, r0=res0, precond=pre if self.precondition else None, **self.cg_options)
        self.cg_iterations.append(sol.iterations)
        with prob.timer("qr"):
            q = orthonormal_basis(sol.x)
        return (q,) + prob.output_step(q, self.r_out)[:3]
