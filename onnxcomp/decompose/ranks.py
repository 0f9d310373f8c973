"""Per-layer rank rules for a low-rank factorisation of an m x d matrix.

- explicit rank;
- a fraction of the layer's MACs (= params) kept: rank r costs r*(m + d) against m*d;
- ARSVD's energy rule: the smallest k with sum_{i<=k} s_i^2 / sum s_i^2 >= tau;
- ARSVD's entropy rule: p_i = s_i / sum s, h_i = -p_i log p_i, the smallest k whose
  cumulative h reaches tau * sum h.
The spectra are eigenvalues ``lambda_i = s_i^2`` (of W W^T, or of W C W^T for the
data-aware spectrum), largest first. The threshold rules serve the Tucker-2 modes too.

Conv chains (Tucker-2, CP) count their cost as a :class:`ChainCost` against the
dense layer's (:func:`dense_cost`); :func:`layer_budget` is a fraction of it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import OnnxcompError
from .checks import check_fraction, check_measure

RULES = ("energy", "entropy")


def check_rank(rank: int, m: int, d: int, layer: str) -> int:
    if rank < 1:
        raise OnnxcompError(f"rank {rank} for layer {layer!r}: ranks start at 1")
    if rank > min(m, d):
        raise OnnxcompError(
            f"rank {rank} is larger than layer {layer!r} allows: its matrix is {m}x{d}, max rank {min(m, d)}"
        )
    return rank


def rank_for_fraction(m: int, d: int, keep: float) -> int:
    """Largest rank whose factors cost at most ``keep`` of the dense m x d layer."""
    check_fraction(keep, "--keep")
    return max(1, min(min(m, d), int(np.floor(keep * m * d / (m + d)))))


def rank_for_threshold(eigenvalues: np.ndarray, tau: float, rule: str = "energy") -> int:
    """Smallest rank reaching ``tau`` of the energy (or spectral entropy)."""
    check_fraction(tau, "energy threshold")
    values = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    if rule == "energy":
        mass = values
    elif rule == "entropy":
        singular = np.sqrt(values)
        p = singular / singular.sum() if singular.sum() > 0 else singular
        with np.errstate(divide="ignore", invalid="ignore"):
            mass = np.where(p > 0, -p * np.log(p), 0.0)
    else:
        raise OnnxcompError(f"unknown rank rule {rule!r}: use one of {RULES}")
    total = mass.sum()
    if total <= 0:
        return 1
    cumulative = np.cumsum(mass) / total
    # A hair of slack so that tau = 1 is reached despite rounding in the cumulative sum.
    return int(min(len(values), np.searchsorted(cumulative, tau - 1e-12) + 1))


def lowrank_is_cheaper(rank: int, m: int, d: int) -> bool:
    return rank * (m + d) < m * d


class ChainCost(NamedTuple):
    """Parameters and multiply-adds per output position of a layer or chain (bias excluded)."""

    params: int
    macs: float

    def value(self, measure: str) -> float:
        """The cost in ``measure``: "params" or "macs"."""
        return self.params if measure == "params" else self.macs


def dense_cost(C_out, C_in, kh, kw) -> ChainCost:
    """Cost of the original kxk conv, in the units of the chains' costs."""
    n = C_out * C_in * kh * kw
    return ChainCost(n, float(n))


def layer_budget(shape, fraction, measure: str) -> float:
    """``fraction`` of the dense conv's cost (params or MACs): what a chain may cost."""
    fraction = check_fraction(fraction, f"the fraction of {measure} kept")
    check_measure(measure)
    return fraction * dense_cost(*shape).value(measure)
