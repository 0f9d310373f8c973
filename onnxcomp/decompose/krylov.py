"""Matrix-free preconditioned conjugate gradients on arrays of any shape (numpy or cupy).

Both ALS solvers meet a large symmetric PSD system on their input side (the
Tucker-2 input step, the CP channel step) that they never form: :func:`cg`
solves it from a warm start to a relative residual, or only until the residual
has dropped by a forcing factor (an inexact inner solve of the outer iteration).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .backend import array_module
from .linalg import vdot


@dataclass
class KrylovResult:
    x: object  # solution, same shape as b
    iterations: int  # operator products (beyond the initial residual)
    residual: float  # final ||r|| / ||b||, from the recursion
    converged: bool


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
    xp = array_module(b)
    bnorm = float(xp.linalg.norm(b.ravel()))
    if bnorm == 0.0:
        return KrylovResult(xp.zeros_like(b), 0, 0.0, True)
    if x0 is None:
        x, r = xp.zeros_like(b), b.copy()
    else:
        x = x0.copy()
        r = b - apply_a(x) if r0 is None else r0.copy()
    rnorm = float(xp.linalg.norm(r.ravel()))
    target = tol * bnorm
    if rtol_initial is not None:
        target = max(target, rtol_initial * rnorm)
    if rnorm <= target:
        return KrylovResult(x, 0, rnorm / bnorm, True)
    m_inv = precond or (lambda v: v)
    maxiter = max(10, b.size) if maxiter is None else maxiter
    z = m_inv(r)
    p = z.copy()
    rz = vdot(r, z)
    it = 0
    converged = False
    while it < maxiter:
        q = apply_a(p)
        pq = vdot(p, q)
        if pq <= 0.0:  # only on a singular/inconsistent direction: p is A-null
            break
        alpha = rz / pq
        x += alpha * p
        r -= alpha * q
        it += 1
        rnorm = float(xp.linalg.norm(r.ravel()))
        if rnorm <= target:
            converged = True
            break
        z = m_inv(r)
        rz_new = vdot(r, z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return KrylovResult(x, it, rnorm / bnorm, converged)
