"""EVBMF ranks: the data-free rank rule of Kim et al. 2016 and MUSCO.

Analytic empirical variational Bayes matrix factorisation (Nakajima et al., JMLR
2013) of an L x M matrix (L <= M, alpha = L / M) with singular values s_h: given
the noise variance sigma^2, EVB keeps the components with
``s_h > sqrt(M sigma^2 (1 + tau_bar) (1 + alpha / tau_bar))``, tau_bar = 2.5129 sqrt(alpha).
sigma^2 itself minimises the EVB free energy between analytic bounds.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from ...errors import OnnxcompError
from ..backend import to_numpy
from ..checks import check_conv_weight
from ..linalg import unfold


def evbmf(Y, sigma2=None):
    """Analytic EVBMF of a matrix. Returns ``(rank, sigma2)``: the number of components EVB
    keeps and the noise variance (estimated by minimising the EVB free energy over its
    analytic bounds unless given)."""
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
        sigma2 = _noise_variance(s, L, M, tauubar)
    threshold = np.sqrt(M * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    return int(np.sum(s > threshold)), float(sigma2)


def _noise_variance(s, L, M, tauubar):
    """The sigma^2 minimising the EVB free energy between its analytic bounds."""
    alpha = L / M
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    eh_ub = int(min(np.ceil(L / (1 + alpha)) - 1, L)) - 1
    upper = np.sum(s**2) / (L * M)
    tail = s[eh_ub + 1:] if eh_ub + 1 < L else s[-1:]
    lower = max(tail[0] ** 2 / (M * xubar), np.mean(tail**2) / M, upper * 1e-12)
    if lower >= upper:
        return upper
    pos = s[s > 0]

    def free_energy(sigma2):
        return _evb_objective(sigma2, L, M, pos, L - len(pos), xubar)

    # a log-spaced scan (the objective can have several local minima), then a bounded
    # 1-D minimisation in the best cell
    grid = np.geomspace(lower, upper, 200)
    i = int(np.argmin([free_energy(v) for v in grid]))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    found = minimize_scalar(free_energy, bounds=(a, b), method="bounded", options={"xatol": 1e-12 * (b - a)})
    return float(found.x)


def _evb_tau(x, alpha):
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _evb_objective(sigma2, L, M, s, n_zero, xubar):
    """EVB free energy (up to constants) at noise variance ``sigma2``."""
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


def evbmf_ranks(W) -> tuple[int, int]:
    """EVBMF ranks (R_out, R_in) of the mode-1 (C_out x C_in*K) and mode-2 (C_in x C_out*K)
    unfoldings, at least 1 each (data-free, as Kim et al. 2016 / MUSCO)."""
    w = np.asarray(to_numpy(W), dtype=np.float64)
    check_conv_weight(w, "Tucker-2")
    c_out, c_in = w.shape[:2]
    r_out, _ = evbmf(unfold(w, 0))
    r_in, _ = evbmf(unfold(w, 1))
    return max(1, min(r_out, c_out)), max(1, min(r_in, c_in))
