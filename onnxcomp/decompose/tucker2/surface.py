"""The proxy error of every Tucker-2 rank pair of a layer, for the price of a few factorisations.

The solver's initial iterate at (R_out, R_in) is an input basis U_in (C_in x R_in) followed by the
exact output step, whose error is ``tr(W S W^T) - (top R_out eigenvalues of Y)`` with
``Y = B A^-1 B^T``, ``A = P^T S P``, ``B = W S P``, ``P = U_in kron I_K`` (:mod:`.problem`). That
error is an upper bound of what the ALS reaches at the pair (it only goes down from there).

When the bases of all R_in are the leading columns of one C_in x C_in basis U (nested bases), the
A and B of every R_in are the leading block and columns of the A and B of the whole U, columns
ordered (r, k). A Cholesky factor of a leading block is the leading block of the Cholesky factor,
and so ``Z = B L^-T`` of the whole basis holds every R_in's ``Z_r`` as its leading R_in*K columns,
and ``Y_r = Z_r Z_r^T``. One pass per basis (``P^T S P``: 2 C_in d^2 multiply-adds, its Cholesky
d^3/3, one triangular solve C_out d^2; d = C_in*K) gives the output-step error of every pair: one
symmetric eigenvalue problem (min(C_out, R_in*K)) per R_in, all R_out from its prefix sums.

The bases are the solver's data-aware ones (:meth:`Tucker2Problem.data_in`), which are nested in
R_in for a fixed R_out (the top eigenvectors of one matrix, orthonormalised by QR). They depend on
the R_out they are taken at, so the surface takes a few (``BASIS_FRACTIONS`` of C_out) and scores
each pair by the best of them. The Frobenius HOSVD basis, the solver's other start, is left out: it
lost to the data bases at every pair measured (benchmarks/tucker2_curve.py).

A, not S, gets a tiny ridge (``RIDGE`` x its largest diagonal entry) so that the Cholesky factor
exists for singular statistics (dead channels, taps always in the padding); it can only shrink Y,
so the score stays an upper bound of the solver's error (raised by under 1e-8 of the output
variance in the tests).

:meth:`ProxySurface.swept` then runs a few ALS sweeps from the proxy's basis at chosen pairs, on the
problem the surface was built on.
"""

from __future__ import annotations

import numpy as np

from ..backend import to_backend, to_numpy
from ..checks import check_conv_weight, check_patch_stats
from ..linalg import cholesky_or_none, solve_lower, symmetrize
from .als import sweep_from
from .problem import Tucker2Problem
from .ranks import _cost_of, _max_r_out

# The R_out (as fractions of C_out) the data-aware input bases are taken at.
BASIS_FRACTIONS = (0.25, 1.0)
RIDGE = 1e-10
# Largest number of R_in values :meth:`ProxySurface.best` scores on a first pass.
GRID = 48


class ProxySurface:
    """Output-step errors of every (R_out, R_in) of a kxk conv under ``S`` (None: Frobenius).

    ``error(r_out, r_in)`` is the best of the bases' errors; ``start(r_out, r_in)`` the input
    basis (C_in x R_in, NumPy) that reaches it, for the solver to start from.
    """

    def __init__(self, W, S=None, *, xp=np, fractions=BASIS_FRACTIONS):
        w_host = np.asarray(to_numpy(W), dtype=np.float64)
        check_conv_weight(w_host, "Tucker-2")
        self.shape = c_out, c_in, kh, kw = w_host.shape
        self.k = kh * kw
        if S is None:
            s = xp.eye(c_in * self.k)
        else:
            s = to_backend(xp, to_numpy(S))
            check_patch_stats(w_host, s)
        self._prob = prob = Tucker2Problem(to_backend(xp, w_host), s, check_psd=False)
        self.reference = prob.reference
        self.xp = xp
        self._w = w_host
        self._swept: dict[tuple[int, int, int], tuple[np.ndarray, float]] = {}
        r_outs = sorted({max(1, min(c_out, round(f * c_out))) for f in fractions})
        self.bases = [to_numpy(prob.data_in(r, c_in)) for r in r_outs]  # (C_in, C_in) each, nested columns
        self._z = [self._leading_z(prob, xp.asarray(u)) for u in self.bases]
        self._errors: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @staticmethod
    def _leading_z(prob: Tucker2Problem, u):
        """``Z = B L^-T`` (C_out x C_in*K, columns (r, k)) of the whole basis ``u``."""
        xp = prob.xp
        c, k, co = prob.c_in, prob.k, prob.c_out
        r = u.shape[1]
        pts = u.T @ prob.s_flat  # P^T S, rows (r, k), columns (c', k')
        t = xp.ascontiguousarray(pts.reshape(r, k, c, k).transpose(0, 1, 3, 2)).reshape(r * k * k, c)
        a = symmetrize((t @ u).reshape(r, k, k, r).transpose(0, 1, 3, 2).reshape(r * k, r * k))  # P^T S P
        del pts, t
        b = (prob.ws_okc @ u).reshape(co, k, r).transpose(0, 2, 1).reshape(co, r * k)  # W S P
        top = float(xp.max(xp.diagonal(a))) if a.size else 0.0
        ridge = RIDGE * top if top > 0 else 1.0
        eye = xp.eye(r * k)
        lower = cholesky_or_none(a + ridge * eye)
        while lower is None:  # rounding made A indefinite beyond the ridge: a larger one
            ridge *= 100.0
            lower = cholesky_or_none(a + ridge * eye)
        return solve_lower(lower, b.T).T  # Z = B L^-T

    def errors(self, r_in: int) -> tuple[np.ndarray, np.ndarray]:
        """(error at every R_out = 0..C_out, index of the basis that reaches it) at this R_in."""
        r_in = int(r_in)
        if r_in not in self._errors:
            c_out = self.shape[0]
            rows = []
            for z in self._z:
                zr = z[:, : r_in * self.k]
                gram = zr @ zr.T if zr.shape[0] <= zr.shape[1] else zr.T @ zr
                lam = np.sort(np.maximum(to_numpy(self.xp.linalg.eigvalsh(symmetrize(gram))), 0.0))[::-1][:c_out]
                kept = np.concatenate([[0.0], np.cumsum(lam), np.full(c_out - lam.size, lam.sum())])
                rows.append(np.maximum(self.reference - kept, 0.0))
            rows = np.array(rows)
            best = rows.argmin(axis=0)
            self._errors[r_in] = (rows[best, np.arange(c_out + 1)], best)
        return self._errors[r_in]

    def error(self, r_out: int, r_in: int) -> float:
        """The proxy data error at (R_out, R_in): an upper bound of the solver's."""
        return float(self.errors(r_in)[0][r_out])

    def start(self, r_out: int, r_in: int) -> np.ndarray:
        """The input basis (C_in x R_in) whose output step reaches :meth:`error`."""
        return np.ascontiguousarray(self.bases[int(self.errors(r_in)[1][r_out])][:, :r_in])

    def best(self, budget: float, *, measure: str = "macs", in_positions: float = 1.0, multiple: int = 1):
        """The pair with the smallest proxy error whose chain costs at most ``budget`` (params or
        MACs per output position): ``(R_out, R_in, cost, error)``, or None when not even (1, 1) fits.

        Every R_in on the grid of multiples of ``multiple`` (all ranks where the layer has fewer
        channels than one multiple) is tried with the largest R_out the budget allows (rounded down
        to a multiple where one fits); beyond ``GRID`` values a spread of them, then every grid value
        between the best one's neighbours.
        """
        return best_pair(self.shape, self.error, budget, measure=measure, in_positions=in_positions,
                         multiple=multiple)

    def swept(self, pairs, sweeps: int = 1, fit=None) -> list[tuple[np.ndarray, float]]:
        """For each (R_out, R_in): ``sweeps`` ALS sweeps from :meth:`start`, on one problem for all
        of them: (the input basis reached, its data error). The error is at most :meth:`error`,
        and the solver, continuing from the basis, only lowers it. The surface's own problem is
        used until :meth:`release`; after it ``fit()`` gives S again (None: Frobenius)."""
        pairs = [(int(a), int(b)) for a, b in pairs]
        todo = [p for p in pairs if (*p, sweeps) not in self._swept]
        if todo and sweeps > 0:
            xp, prob = self.xp, self._prob
            if prob is None:
                S = None if fit is None else fit()
                s = xp.eye(self._w[0].size) if S is None else to_backend(xp, to_numpy(S))
                prob = Tucker2Problem(to_backend(xp, self._w), s, check_psd=False)
            for r_out, r_in in todo:
                u, err = sweep_from(prob, xp.asarray(self.start(r_out, r_in)), r_out, sweeps)
                self._swept[(r_out, r_in, sweeps)] = (to_numpy(u), err)
        for r_out, r_in in todo if sweeps <= 0 else ():
            self._swept[(r_out, r_in, sweeps)] = (self.start(r_out, r_in), self.error(r_out, r_in))
        return [self._swept[(*p, sweeps)] for p in pairs]

    def release(self) -> None:
        """Drop the problem the surface was built on (a copy of S and products of it): what stays
        is small (the bases and C_out x C_in*K per basis)."""
        self._prob = None


def best_summed(surfaces, budget: float, **options):
    """:meth:`ProxySurface.best` for the groups of a grouped conv, which share one pair: the pair
    with the smallest sum of the groups' proxy errors (the surfaces are of equal shapes)."""
    return best_pair(surfaces[0].shape, lambda r_out, r_in: sum(s.error(r_out, r_in) for s in surfaces), budget,
                     **options)


def best_pair(shape, error, budget: float, *, measure: str = "macs", in_positions: float = 1.0, multiple: int = 1):
    """:meth:`ProxySurface.best` for a conv of ``shape`` whose pairs score ``error(r_out, r_in)``."""
    c_out, c_in = shape[:2]
    m = max(1, int(multiple))
    grid = list(range(m, c_in + 1, m)) if c_in >= m else list(range(1, c_in + 1))
    scored: dict[int, tuple | None] = {}

    def score(r_in):
        if r_in not in scored:
            r_out = _max_r_out(shape, r_in, budget, measure, in_positions)
            if m <= r_out < c_out:  # C_out itself is folded into the core: no rank to round
                r_out = r_out // m * m
            scored[r_in] = None if r_out < 1 else (
                r_out, r_in, _cost_of(shape, r_out, r_in, measure, in_positions), error(r_out, r_in))
        return scored[r_in]

    picks = grid if len(grid) <= GRID else [grid[i] for i in np.unique(
        np.linspace(0, len(grid) - 1, GRID).round().astype(int))]
    for r_in in picks:
        score(r_in)
    valid = sorted((v for v in scored.values() if v is not None), key=lambda v: v[1])
    if not valid:
        return None
    if len(grid) > GRID:  # every grid value between the best spread value's neighbours
        i = min(range(len(valid)), key=lambda j: valid[j][3])
        lo, hi = valid[max(i - 1, 0)][1], valid[min(i + 1, len(valid) - 1)][1]
        for r_in in grid:
            if lo < r_in < hi:
                score(r_in)
        valid = [v for v in scored.values() if v is not None]
    return min(valid, key=lambda v: (v[3], v[2]))
