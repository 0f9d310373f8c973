"""The one definition of how far a compressed model's outputs are from the original's.

Per model output: the relative L2 error ``||new - ref|| / ||ref||``, the cosine
similarity and the largest absolute difference, from running sums in float64 so
that any number of batches can be added. Edge cases are decided once, here: an
all-zero reference gives a relative error of 0 when the candidate is zero too
and infinity otherwise; two all-zero outputs have cosine 1, one all-zero output
cosine 0.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from .runtime import make_session


class ErrorSums:
    """Running sums for relative L2, cosine and max abs over batches, in float64."""

    def __init__(self):
        self.diff2 = self.ref2 = self.new2 = self.dot = self.max_abs = 0.0
        self.nonfinite = 0

    def add(self, ref: np.ndarray, new: np.ndarray) -> None:
        ref = np.asarray(ref, dtype=np.float64).ravel()
        new = np.asarray(new, dtype=np.float64).ravel()
        diff = new - ref
        self.diff2 += float(diff @ diff)
        self.ref2 += float(ref @ ref)
        self.new2 += float(new @ new)
        self.dot += float(ref @ new)
        self.nonfinite += int(new.size - np.count_nonzero(np.isfinite(new)))
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))

    def result(self) -> dict:
        ref_norm, new_norm = math.sqrt(self.ref2), math.sqrt(self.new2)
        if ref_norm > 0:
            relative = math.sqrt(self.diff2) / ref_norm
        else:
            relative = 0.0 if self.diff2 == 0 else math.inf
        if ref_norm > 0 and new_norm > 0:
            cosine = min(1.0, max(-1.0, self.dot / (ref_norm * new_norm)))  # rounding can pass 1
        else:
            cosine = 1.0 if ref_norm == new_norm else 0.0
        return {"relative_l2": relative, "cosine": cosine, "max_abs": self.max_abs, "nonfinite": self.nonfinite}


def output_errors(reference: list[np.ndarray], candidate: list[np.ndarray], names: list[str]) -> dict:
    """Per output name: relative L2 error, cosine, max abs and non-finite count of one batch."""
    errors = {}
    for name, ref, new in zip(names, reference, candidate, strict=True):
        if np.shape(ref) != np.shape(new):
            raise ValueError(f"output {name!r} has shape {np.shape(new)}, the original {np.shape(ref)}")
        sums = ErrorSums()
        sums.add(ref, new)
        errors[name] = sums.result()
    return errors


def compare_outputs(original: onnx.ModelProto, compressed: onnx.ModelProto, feeds: dict, providers=None) -> dict:
    """Run both models on one feed dict and compare every output."""
    reference = make_session(original, providers).run(None, feeds)
    session = make_session(compressed, providers)
    names = [o.name for o in session.get_outputs()]
    return output_errors(reference, session.run(None, feeds), names)
