"""Per-layer rank rules for a low-rank factorisation of an m x d matrix.

- explicit rank;
- a fraction of the layer's MACs (= params) kept: rank r costs r*(m + d) against m*d;
- ARSVD's energy rule: the smallest k with sum_{i<=k} s_i^2 / sum s_i^2 >= tau;
- ARSVD's entropy rule: p_i = s_i / sum s, h_i = -p_i log p_i, the smallest k whose
  cumulative h reaches tau * sum h.
The spectra are eigenvalues ``lambda_i = s_i^2`` (of W W^T, or of W C W^T for the
data-aware spectrum), largest first.
"""

from __future__ import annotations

import numpy as np

from ..errors import OnnxcompError

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
    if not 0 < keep <= 1:
        raise OnnxcompError(f"--keep must be in (0, 1], got {keep}")
    return max(1, min(min(m, d), int(np.floor(keep * m * d / (m + d)))))


def rank_for_threshold(eigenvalues: np.ndarray, tau: float, rule: str = "energy") -> int:
    """Smallest rank reaching ``tau`` of the energy (or spectral entropy)."""
    if not 0 < tau <= 1:
        raise OnnxcompError(f"energy threshold must be in (0, 1], got {tau}")
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
