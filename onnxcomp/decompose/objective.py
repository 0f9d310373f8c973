"""The data norm of DESIGN §1: what a change of weights does to a layer's output.

With input mean ``mu`` and covariance ``S``, replacing ``(W, b)`` by
``(W~, b~)`` changes the output by ``dW x - db`` (``dW = W - W~``,
``db = b~ - b``), whose expected energy is
``tr(dW S dW^T) + ||dW mu - db||^2``. The bias correction ``db = dW mu``
zeroes the second term, so fitting under S and correcting is never worse
than fitting under the uncentered moment ``M = S + mu mu^T``.

For a conv weight ``W`` (C_out, C_in, kh, kw), ``dW`` is its (C_out, C_in*kh*kw)
reshape and S the covariance of the input patches ordered (c, i, j):
:func:`data_error` is the ``tr(dW S dW^T)`` every solver minimises.
"""

from __future__ import annotations

import numpy as np

from .linalg import vdot


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


def data_error(w, s, w_approx) -> float:
    """``tr(dW S dW^T)``, ``dW = (W - W~).reshape(C_out, -1)`` (Frobenius when S is None), on the arrays' backend."""
    dw = (w - w_approx).reshape(w.shape[0], -1)
    return vdot(dw, dw) if s is None else vdot(dw @ s, dw)
