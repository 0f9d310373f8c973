"""Input checks shared by the solvers: a user's mistake becomes an OnnxcompError that says the fix."""

from __future__ import annotations

import numpy as np

from ..errors import OnnxcompError
from .backend import to_numpy

NORMS = ("data", "frobenius")
MEASURES = ("params", "macs")


def check_conv_weight(w, method: str) -> None:
    """``w`` is a non-empty (C_out, C_in, kh, kw) conv weight; ``method`` names the solver in the message."""
    if w.ndim != 4:
        raise OnnxcompError(f"{method} needs a conv weight (C_out, C_in, kh, kw), got shape {tuple(w.shape)}")
    if min(w.shape) < 1:
        raise OnnxcompError(f"empty conv weight of shape {tuple(w.shape)}")


def check_patch_stats(w, s) -> None:
    """``s`` is a finite (d, d) patch statistic for the conv weight ``w``, d = C_in*kh*kw."""
    d = w.shape[1] * w.shape[2] * w.shape[3]
    if tuple(s.shape) != (d, d):
        raise OnnxcompError(
            f"input statistics of shape {tuple(s.shape)} do not match the conv weight {tuple(w.shape)}: "
            f"need ({d}, {d}) = C_in*kh*kw squared"
        )
    if not bool(np.isfinite(to_numpy(s.diagonal())).all()):
        raise OnnxcompError("input statistics contain NaN or inf")


def check_norm(norm: str, s) -> None:
    """A known norm, and the statistics the data norm needs."""
    if norm not in NORMS:
        raise OnnxcompError(f"unknown norm {norm!r}: use 'data' or 'frobenius'")
    if s is None and norm == "data":
        raise OnnxcompError("norm='data' needs the input covariance S (or use norm='frobenius')")


def check_fraction(fraction, what: str) -> float:
    """``fraction`` in (0, 1]; ``what`` names it in the message."""
    if not 0.0 < float(fraction) <= 1.0:
        raise OnnxcompError(f"{what} must be in (0, 1], got {fraction!r}")
    return float(fraction)


def check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise OnnxcompError(f"unknown cost measure {measure!r}: use 'params' or 'macs'")
