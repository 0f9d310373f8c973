"""The data norm of DESIGN §1: what a change of weights does to a layer's output.

With input mean ``mu`` and covariance ``S``, replacing ``(W, b)`` by
``(W~, b~)`` changes the output by ``dW x - db`` (``dW = W - W~``,
``db = b~ - b``), whose expected energy is
``tr(dW S dW^T) + ||dW mu - db||^2``. The bias correction ``db = dW mu``
zeroes the second term, so fitting under S and correcting is never worse
than fitting under the uncentered moment ``M = S + mu mu^T``.
"""

from __future__ import annotations

import numpy as np


def output_error(delta_w: np.ndarray, covariance: np.ndarray, mean: np.ndarray, delta_b=None) -> float:
    """Expected squared output change ``tr(dW S dW^T) + ||dW mu - db||^2``."""
    spread = float(np.einsum("ij,ij->", delta_w @ covariance, delta_w))
    shift = delta_w @ mean - (0.0 if delta_b is None else delta_b)
    return max(spread, 0.0) + float(shift @ shift)


def output_variance(W: np.ndarray, covariance: np.ndarray) -> float:
    """``tr(W S W^T)``: the energy of the layer's output around its mean."""
    return max(float(np.einsum("ij,ij->", W @ covariance, W)), 0.0)


def relative_error(error: float, reference: float) -> float:
    """Output error relative to the output's variance (0 = unchanged)."""
    return float(np.sqrt(error / reference)) if reference > 0 else (0.0 if error == 0 else float("inf"))


def corrected_bias(bias, delta_w: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``b + dW mu``: the bias that keeps the output mean unchanged."""
    shift = delta_w @ mean
    return shift if bias is None else np.asarray(bias, dtype=np.float64) + shift
