"""Frobenius Tucker-2 (``norm="frobenius"``): the data-free baseline, HOSVD then HOOI.

HOSVD takes U_out and U_in as the top eigenvectors of the mode-1 and mode-2
unfoldings' Grams; each HOOI sweep re-fits U_out to ``W x_2 U_in^T`` and U_in to
``W x_1 U_out^T`` the same way, and the core is ``W x_1 U_out^T x_2 U_in^T``.
Its Frobenius error ``||W||^2 - ||G||^2`` decides convergence; the reported
errors are under S when S is given (the data norm the baseline is compared in).
"""

from __future__ import annotations

import time

import numpy as np

from ..backend import array_module, to_numpy
from ..factors import Tucker2Factors, tucker2_reconstruct
from ..linalg import prepare_psd, top_eigenvectors, unfold, vdot
from ..objective import data_error
from ..record import Tucker2Result


def hooi(w, s, r_out: int, r_in: int, *, tol: float, max_iter: int, check_psd: bool, t_start: float) -> Tucker2Result:
    """HOSVD start, then HOOI sweeps until the relative Frobenius gain is below ``tol``."""
    xp = array_module(w)
    c_out, c_in, kh, kw = w.shape
    k = kh * kw
    psd = None
    if s is not None:
        s, psd = prepare_psd(s, check=check_psd)
    w3 = w.reshape(c_out, c_in, k)
    w1 = w.reshape(c_out, -1)
    fro2 = vdot(w1, w1)

    def core_of(u_out, u_in):
        return xp.matmul(u_in.T[None], (u_out.T @ w1).reshape(r_out, c_in, k))  # (R_out, R_in, K)

    def reported(u_out, core, u_in):
        return data_error(w, s, tucker2_reconstruct(u_out, core.reshape(r_out, r_in, kh, kw), u_in))

    w2 = unfold(w3, 1)
    u_out, u_in = top_eigenvectors(w1 @ w1.T, r_out), top_eigenvectors(w2 @ w2.T, r_in)
    core = core_of(u_out, u_in)
    fro_err = fro2 - vdot(core, core)
    initial_error = reported(u_out, core, u_in)
    errors, converged, iterations = [], False, 0
    for _ in range(max_iter):
        new_out, new_in = _sweep(w3, u_in, r_out, r_in)
        new_core = core_of(new_out, new_in)
        new_fro = fro2 - vdot(new_core, new_core)
        iterations += 1
        if new_fro > fro_err + 1e-12 * fro2:  # rounding only: keep the better iterate and stop
            converged = True
            errors.append(reported(u_out, core, u_in))
            break
        improvement = (fro_err - new_fro) / fro_err if fro_err > 0 else 0.0
        u_out, u_in, core, fro_err = new_out, new_in, new_core, new_fro
        errors.append(reported(u_out, core, u_in))
        if improvement < tol or fro_err <= 1e-13 * fro2:
            converged = True
            break
    factors = Tucker2Factors(
        u_out=to_numpy(u_out).astype(np.float64),
        core=to_numpy(core).reshape(r_out, r_in, kh, kw).astype(np.float64),
        u_in=to_numpy(u_in).astype(np.float64),
    )
    return Tucker2Result(
        factors=factors,
        error=errors[-1] if errors else initial_error,
        initial_error=initial_error,
        errors=errors,
        reference=vdot(w1, w1 @ s) if s is not None else fro2,
        iterations=iterations,
        converged=converged,
        seconds=time.perf_counter() - t_start,
        norm="frobenius",
        init="hosvd",
        psd=psd,
    )


def _sweep(w3, u_in, r_out: int, r_in: int):
    """One HOOI sweep from U_in: the new (U_out, U_in)."""
    xp = array_module(w3)
    c_out, c_in, k = w3.shape
    y = xp.matmul(u_in.T[None], w3).reshape(c_out, r_in * k)  # W x_2 U_in^T
    u_out = top_eigenvectors(y @ y.T, r_out)
    z = (u_out.T @ w3.reshape(c_out, -1)).reshape(r_out, c_in, k)  # W x_1 U_out^T
    z2 = unfold(z, 1)
    return u_out, top_eigenvectors(z2 @ z2.T, r_in)
