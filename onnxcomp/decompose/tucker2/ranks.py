"""Tucker-2 rank rules: chain cost, the balanced formula, the budgeted search, per-mode thresholds.

- :func:`tucker2_cost`: params and MACs of the 1x1 -> kxk -> 1x1 chain.
- :func:`balanced_ranks`: the usual fixed formula R_out / R_in = C_out / C_in.
- :func:`search_ranks`: the pair that minimises a proxy of the data error under a
  params/MACs budget.
- :func:`energy_ranks`: smallest ranks keeping ``tau`` of each mode's energy (data-aware).
- EVBMF ranks (data-free) are in :mod:`.evbmf`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from ...errors import OnnxcompError
from ..backend import to_backend, to_numpy
from ..checks import check_conv_weight, check_fraction, check_patch_stats
from ..factors import folded_sides
from ..linalg import symmetrize, unfold
from ..ranks import ChainCost, layer_budget, rank_for_threshold
from .problem import Tucker2Problem


def tucker2_cost(C_out, C_in, kh, kw, R_out, R_in, *, in_positions: float = 1.0) -> ChainCost:
    """Cost of the 1x1 (C_in -> R_in) -> kxk (R_in -> R_out) -> 1x1 (R_out -> C_out) chain.

    ``params = C_in*R_in + R_in*R_out*kh*kw + R_out*C_out``; MACs per output
    position are the same, except that the first 1x1 conv runs at the input
    resolution: ``in_positions`` = input positions per output position
    (stride_h*stride_w for a 'same' conv; 1 by default). A full rank's 1x1 is
    folded into the core (:func:`folded_sides`): at ``R_out = C_out`` the chain
    is 1x1 (C_in -> R_in) -> kxk (R_in -> C_out) and costs no ``R_out*C_out``.
    """
    k = kh * kw
    fold_out, fold_in = folded_sides(C_out, C_in, R_out, R_in)
    first = 0 if fold_in else C_in * R_in
    last = 0 if fold_out else R_out * C_out
    params = first + R_in * R_out * k + last
    macs = in_positions * first + R_in * R_out * k + last
    return ChainCost(int(params), float(macs))


def _max_r_out(shape, r_in, budget, measure, in_positions):
    """Largest R_out (<= C_out) whose chain with this R_in fits the budget; 0 if none."""
    c_out, c_in, kh, kw = shape
    if _cost_of(shape, c_out, r_in, measure, in_positions) <= budget:
        return c_out  # the output side at full rank, folded into the core
    fold_in = folded_sides(c_out, c_in, c_out - 1, r_in)[1]  # below C_out: the input side may fold
    first = 0.0 if fold_in else (in_positions if measure == "macs" else 1.0) * c_in * r_in
    r = math.floor((budget - first) / (r_in * kh * kw + c_out) + 1e-9)
    return int(min(max(r, 0), c_out - 1))


def _cost_of(shape, r_out, r_in, measure, in_positions):
    return tucker2_cost(*shape, r_out, r_in, in_positions=in_positions).value(measure)


def balanced_ranks(C_out, C_in, kh, kw, fraction, *, measure="params", in_positions=1.0) -> tuple[int, int]:
    """The usual fixed formula: R_out / R_in = C_out / C_in, largest pair within the budget."""
    shape = (C_out, C_in, kh, kw)
    budget = layer_budget(shape, fraction, measure)
    rho = C_out / C_in
    k = kh * kw
    first = (in_positions if measure == "macs" else 1.0) * C_in
    a, b = rho * k, first + rho * C_out
    r = (-b + math.sqrt(b * b + 4 * a * budget)) / (2 * a)
    r_in = max(1, min(C_in, math.floor(r)))
    r_out = max(1, min(C_out, math.floor(rho * r)))
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
    check_conv_weight(w_host, "Tucker-2")
    c_out, c_in, kh, kw = shape = w_host.shape
    budget = layer_budget(shape, fraction, measure)
    if S is None:
        s = xp.eye(c_in * kh * kw)
    else:
        s = to_backend(xp, to_numpy(S))
        check_patch_stats(w_host, s)
    scorer = _PairScorer(Tucker2Problem(to_backend(xp, w_host), s), budget, measure, in_positions, multiple)
    if _max_r_out(shape, 1, budget, measure, in_positions) < 1:
        raise OnnxcompError(
            f"a Tucker-2 chain cannot fit {fraction:.3g} of the {measure} of a {c_out}x{c_in}x{kh}x{kw} conv, "
            "even at ranks (1, 1)"
        )
    bal = balanced_ranks(c_out, c_in, kh, kw, fraction, measure=measure, in_positions=in_positions)
    best = scorer.search(bal[1], grid, refine)
    # the balanced pair itself (its R_out may differ from the budget's maximum)
    bal_err = scorer.proxy(*bal)
    if bal_err < best[3]:
        best = (bal[0], bal[1], _cost_of(shape, bal[0], bal[1], measure, in_positions), bal_err)
    return RankSearch(
        ranks=(best[0], best[1]), proxy_error=best[3], reference=scorer.prob.reference, budget=budget,
        measure=measure, cost=best[2], balanced=bal, balanced_proxy_error=bal_err,
        table=sorted(scorer.valid(), key=lambda v: v[1]), seconds=time.perf_counter() - t_start,
    )


class _PairScorer:
    """Scores R_in values at the largest R_out the budget allows, by the proxy error (memoised)."""

    def __init__(self, prob: Tucker2Problem, budget, measure, in_positions, multiple):
        self.prob, self.budget, self.measure, self.in_positions = prob, budget, measure, in_positions
        self.shape = (prob.c_out, prob.c_in, prob.kh, prob.kw)
        self.m = max(1, int(multiple))
        self.scores: dict[int, tuple | None] = {}

    def proxy(self, r_out, r_in) -> float:
        """The better of the HOSVD and data-aware bases after one exact output step."""
        prob = self.prob
        return min(prob.output_step(u, r_out)[2] for u in (prob.hosvd_in(r_in), prob.data_in(r_out, r_in)))

    def score(self, r_in):
        """(R_out, R_in, cost, proxy error) at this R_in snapped to the multiple, or None if nothing fits."""
        r_in = self._snap(r_in, self.shape[1])
        if r_in not in self.scores:
            r_out = _max_r_out(self.shape, r_in, self.budget, self.measure, self.in_positions)
            if r_out >= self.m:
                r_out = (r_out // self.m) * self.m
            self.scores[r_in] = None if r_out < 1 else (
                r_out, r_in, _cost_of(self.shape, r_out, r_in, self.measure, self.in_positions),
                self.proxy(r_out, r_in))
        return self.scores[r_in]

    def valid(self) -> list:
        return [v for v in self.scores.values() if v is not None]

    def search(self, balanced_r_in: int, grid: int, refine: int):
        """Score a coarse grid of R_in (and the balanced one), then ``refine`` values between the
        best grid point's neighbours; the best (R_out, R_in, cost, proxy error)."""
        c_in = self.shape[1]
        r_in_max = 1
        while r_in_max < c_in and _max_r_out(self.shape, r_in_max + 1, self.budget, self.measure,
                                             self.in_positions) >= 1:
            r_in_max += 1
        for r in sorted({round(v) for v in np.linspace(1, r_in_max, max(2, grid))} | {balanced_r_in}):
            self.score(r)
        best = min(self.valid(), key=lambda v: v[3])
        keys = sorted(k for k, v in self.scores.items() if v is not None)
        i = keys.index(best[1])
        lo = keys[i - 1] if i > 0 else best[1]
        hi = keys[i + 1] if i + 1 < len(keys) else best[1]
        if refine > 0 and hi - lo > 2:
            for r in np.linspace(lo, hi, refine + 2)[1:-1]:
                self.score(round(r))
        return min(self.valid(), key=lambda v: v[3])

    def _snap(self, r, top):
        m = self.m
        return int(min(top, max(m, (r // m) * m))) if top >= m else int(max(1, min(r, top)))


def energy_ranks(W, S=None, tau: float = 0.9, *, method: str = "energy", xp=np) -> tuple[int, int]:
    """Per-mode threshold ranks (R_out, R_in): smallest ranks keeping ``tau`` of each mode's energy.

    Output mode: eigenvalues of W S W^T, the data-aware spectrum (the error of the
    data-aware SVD at rank r is exactly the sum of the discarded ones); W W^T
    without S. Input mode: the data norm does not split over input channels, so its
    spectrum is taken in the metric of the nearest Kronecker factorisation
    S ~ Sc (x) Sk (exact when S is separable); the plain mode-2 unfolding without S.
    ``method="entropy"`` uses ARSVD's spectral-entropy rule instead of energy
    (:func:`~..ranks.rank_for_threshold`).
    """
    check_fraction(tau, "energy threshold")
    w_host = np.asarray(to_numpy(W), dtype=np.float64)
    check_conv_weight(w_host, "Tucker-2")
    w = to_backend(xp, w_host)
    w1 = w.reshape(w.shape[0], -1)
    if S is None:
        w2 = unfold(w, 1)
        out_gram, in_gram = w1 @ w1.T, w2 @ w2.T
    else:
        s = to_backend(xp, to_numpy(S))
        check_patch_stats(w_host, s)
        prob = Tucker2Problem(w, s, check_psd=False)
        zc = prob.in_kron_metric(prob.w)
        out_gram, in_gram = symmetrize(prob.ws @ prob.w.T), zc @ zc.T
    spectra = (to_numpy(xp.linalg.eigvalsh(gram))[::-1] for gram in (out_gram, in_gram))
    return tuple(rank_for_threshold(values, tau, method) for values in spectra)
