"""Initial candidates of the CP ALS, each followed by the closed-form A step; the best one starts.

- "frobenius": Frobenius CP-ALS of W (:mod:`.frobenius`);
- "tucker2": CP (Frobenius) of the data-aware Tucker-2 core, mapped back through
  U_out and U_in;
- "given": the factors of an earlier solve (a :class:`~..factors.CPFactors`), a warm start.

The Frobenius CP-ALS behind each candidate stops once a sweep gains less than
INIT_TOL (relative), at most INIT_ITER sweeps: that is where it leaves its fast
phase (sweep ~14 on the 256-channel benchmark layer). Going deeper into the
Frobenius optimum does not help the data-aware sweeps (measured: 10-20 init sweeps
lead to a slightly lower data error 45 sweeps later than 100 or 200 do), but an
exactly low-rank W keeps gaining ~80% per sweep down to rounding, so it is still
recovered exactly (which the data error, at ~1e-16 relative resolution, cannot do).
"""

from __future__ import annotations

from ...errors import OnnxcompError
from ..backend import to_backend
from ..factors import CPFactors
from ..linalg import unit_columns
from ..tucker2 import tucker2
from .frobenius import frobenius_cp
from .problem import CPProblem, Iterate

INIT_TOL = 1e-2
INIT_ITER = 100


def initial_patches(init, w_host, s_host, prob: CPProblem, r, form, ridge, seed, init_iter):
    """{name: patch factors} of the initial candidates (``w_host``, ``s_host``: the host inputs)."""
    if isinstance(init, CPFactors):
        return {"given": _given_patches(init, prob, r, form)}
    if not isinstance(init, str) or init not in ("auto", "frobenius", "tucker2"):
        raise OnnxcompError(f"unknown init {init!r}: use 'auto', 'frobenius', 'tucker2' or CPFactors")
    names = ["frobenius", "tucker2"] if init == "auto" else [init]
    if init == "auto" and r >= prob.c_out and r >= prob.c_in:
        names = ["frobenius"]  # full Tucker ranks: its core is W rotated, same CP as Frobenius
    cands = {}
    for name in names:
        if name == "frobenius":
            w = prob.w.reshape(prob.c_out, *prob.dims)  # W on the backend, one axis per CP mode
            cands[name] = frobenius_cp(w, r, tol=INIT_TOL, max_iter=init_iter, ridge=ridge, seed=seed)[0][1:]
        else:
            cands[name] = _tucker_candidate(w_host, s_host, r, form, prob.xp, ridge, seed,
                                            tucker_iter=min(20, init_iter), cp_iter=init_iter)
    return cands


def _given_patches(init: CPFactors, prob: CPProblem, r, form):
    """The patch factors (B, H, V) or (B, K (kh*kw, R)) of a warm start, checked against the problem."""
    xp = prob.xp
    if init.form != form:
        raise OnnxcompError(f"init factors are CP form {init.form!r}, the solve asks for {form!r}")
    arrays = [init.a, init.b, init.h, init.v] if form == "4way" else [init.a, init.b, init.kernel]
    given = [to_backend(xp, x) for x in arrays]
    if form == "3way":  # kernel (R, kh, kw) -> the patch factor K (kh*kw, R)
        given[2] = given[2].reshape(given[2].shape[0], -1).T
    shapes = [(prob.c_out, r)] + [(n, r) for n in prob.dims]
    if any(tuple(g.shape) != s for g, s in zip(given, shapes)):
        raise OnnxcompError(f"init factors have shapes {[tuple(g.shape) for g in given]}, need {shapes}")
    return given[1:]


def _tucker_candidate(w_host, s_host, r, form, xp, ridge, seed, *, tucker_iter, cp_iter):
    """Patch factors of the CP (Frobenius) of the data-aware Tucker-2 core, mapped back through U_in."""
    c_out, c_in, kh, kw = w_host.shape
    tk = tucker2(w_host, s_host, (min(r, c_out), min(r, c_in)), xp=xp, tol=1e-3, max_iter=tucker_iter).factors
    core = to_backend(xp, tk.core)
    r_out, r_in = core.shape[:2]
    t = core if form == "4way" else core.reshape(r_out, r_in, kh * kw)
    f = frobenius_cp(t, r, tol=INIT_TOL, max_iter=cp_iter, ridge=ridge, seed=seed)[0]
    return [to_backend(xp, tk.u_in) @ f[1]] + f[2:]


def best_start(prob: CPProblem, cands):
    """Each candidate's patch factors normalised, its closed-form A; the best one.
    Returns (Iterate, name, {name: error})."""
    init_errors, best = {}, None
    for name, patch in cands.items():
        it: Iterate = prob.fit_a([unit_columns(p) for p in patch])
        init_errors[name] = it.err
        if best is None or it.err < best[0].err:
            best = (it, name)
    return best[0], best[1], init_errors
