"""The one definition of how far a compressed model's outputs are from the original's.

Per model output: the relative L2 error ``||new - ref|| / ||ref||``, the cosine
similarity and the largest absolute difference, from running sums in float64 so
that any number of batches can be added. Edge cases are decided once, here: an
all-zero reference gives a relative error of 0 when the candidate is zero too
and infinity otherwise; two all-zero outputs have cosine 1, one all-zero output
cosine 0. A NaN or infinity in the candidate where the original holds another value
is an infinite error (and an undefined cosine, NaN), never a dropped value: a model
that computes NaN is as far from the original as a model can be. The original's own
non-finite values, reproduced exactly, count as equal.

For classifiers, :class:`TopOneAgreement` gathers both models' top-1 predictions
from an output that looks like class scores (:func:`class_scores`): how often
they agree, and each model's accuracy against labels.
"""

from __future__ import annotations

import math

import numpy as np

from .config import OutputSpec
from .errors import OnnxcompError


def _quiet(method):
    """Non-finite outputs are counted and reported, not warned about on every batch."""

    def wrapped(*args, **kwargs):
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            return method(*args, **kwargs)

    return wrapped


@_quiet
def difference(ref: np.ndarray, new: np.ndarray) -> np.ndarray:
    """``new - ref`` in float64, where a non-finite value is an infinite difference: 0 where both
    hold the same value (the original's own NaN or infinity reproduced), inf wherever either side
    is NaN or infinite and the other differs."""
    ref, new = np.asarray(ref, dtype=np.float64), np.asarray(new, dtype=np.float64)
    diff = new - ref
    same = (new == ref) | (np.isnan(new) & np.isnan(ref))
    return np.where(same, 0.0, np.where(np.isfinite(diff), diff, np.inf))


def nonfinite_count(ref: np.ndarray, new: np.ndarray) -> int:
    """How many values of ``new`` are NaN or infinite where ``ref`` holds another value."""
    new = np.asarray(new)
    if new.dtype.kind not in "fc":
        return 0
    return int(np.count_nonzero(~np.isfinite(new) & np.isinf(difference(ref, new))))


def finite_part(values: np.ndarray) -> np.ndarray:
    """``values`` in float64 with NaN and infinities set to 0 (the original's own non-finite values
    have no size or spread to measure an error against)."""
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values), values, 0.0)


class ErrorSums:
    """Running sums for relative L2, cosine and max abs over batches, in float64."""

    def __init__(self):
        self.diff2 = self.ref2 = self.new2 = self.dot = self.max_abs = 0.0
        self.nonfinite = 0

    @_quiet
    def add(self, ref: np.ndarray, new: np.ndarray) -> None:
        diff = difference(ref, new).ravel()
        self.nonfinite += nonfinite_count(ref, new)
        ref, new = finite_part(ref).ravel(), finite_part(new).ravel()
        self.diff2 += float(diff @ diff)
        self.ref2 += float(ref @ ref)
        self.new2 += float(new @ new)
        self.dot += float(ref @ new)
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))

    def result(self) -> dict:
        ref_norm, new_norm = math.sqrt(self.ref2), math.sqrt(self.new2)
        if ref_norm > 0:
            relative = math.sqrt(self.diff2) / ref_norm
        else:
            relative = 0.0 if self.diff2 == 0 else math.inf
        if math.isinf(self.diff2):
            cosine = math.nan  # the direction of a vector holding NaN or infinities is undefined
        elif ref_norm > 0 and new_norm > 0:
            cosine = min(1.0, max(-1.0, self.dot / (ref_norm * new_norm)))  # rounding can pass 1
        else:
            cosine = 1.0 if ref_norm == new_norm else 0.0
        return {"relative_l2": relative, "cosine": cosine, "max_abs": self.max_abs, "nonfinite": self.nonfinite}


class OutputErrors:
    """:class:`ErrorSums` and :class:`ChannelErrors` of every model output, by name, over batches."""

    def __init__(self, names: list[str], axes: dict[str, int | None] | None = None, kinds: dict | None = None):
        """``axes``: each output's channel axis (None: the rank rule of :func:`channel_axis`);
        ``kinds``: each output's (kind, log) of :mod:`onnxcomp.model.semantics` (default: values)."""
        self.sums = {name: ErrorSums() for name in names}
        self.axes = {name: (axes or {}).get(name) for name in names}
        self.channels = {name: judged_errors(*(kinds or {}).get(name, ("values", False)), self.axes[name])
                         for name in names}

    def add(self, reference: list[np.ndarray], candidate: list[np.ndarray], keep: np.ndarray | None = None) -> None:
        """One batch of both models' outputs, in the order of ``names``; ``keep``: the real token
        positions [N, seq] of the batch (a row mask), whose padding is left out of token-layout outputs."""
        for (name, sums), ref, new in zip(self.sums.items(), reference, candidate, strict=True):
            if np.shape(ref) != np.shape(new):
                raise OnnxcompError(f"output {name!r} has shape {list(np.shape(ref))} in the original "
                                    f"but {list(np.shape(new))} in the compressed model")
            if token_layout(ref, keep, self.axes[name]):
                ref, new = ref[keep], new[keep]  # [tokens, F]: the channels stay on the last axis
            sums.add(ref, new)
            self.channels[name].add(ref, new)

    def result(self) -> dict:
        """Per output name: standardised per-channel error, relative L2 error, cosine, max abs, non-finite count."""
        return {name: {"standardized": self.channels[name].result(), **sums.result(),
                       **self.channels[name].extra()} for name, sums in self.sums.items()}


def token_layout(output: np.ndarray, keep: np.ndarray | None, axis: int | None) -> bool:
    """Whether ``output`` is [N, seq, F] with ``keep``'s leading dims and its channels on the last axis."""
    return (keep is not None and np.ndim(output) == 3 and np.shape(output)[:2] == keep.shape
            and (axis is None or axis % 3 == 2))


def output_errors(reference: list[np.ndarray], candidate: list[np.ndarray], names: list[str]) -> dict:
    """Per output name: relative L2 error, cosine, max abs and non-finite count of one batch."""
    errors = OutputErrors(names)
    errors.add(reference, candidate)
    return errors.result()



# ---------------------------------------------------------------- classifiers


def class_scores(output: np.ndarray) -> np.ndarray | None:
    """``output`` as [batch, classes] float scores (at least 2 classes; [N, C, 1, 1] counts as [N, C]),
    or None when it does not look like that."""
    if output.dtype.kind != "f" or output.ndim < 2:
        return None
    if output.ndim > 2 and all(d == 1 for d in output.shape[2:]):
        output = output.reshape(output.shape[:2])
    if output.ndim != 2 or output.shape[1] < 2:
        return None
    return output


class TopOneAgreement:
    """Both models' top-1 predictions over batches of one output: how often they agree, and each one's accuracy.

    It applies while every batch of that output is one row of class scores per sample
    (:func:`class_scores`); one batch that is not makes it not apply at all.
    """

    def __init__(self):
        self.reference: list[np.ndarray] = []
        self.candidate: list[np.ndarray] = []
        self.classes: int | None = None
        self.applies = True

    def add(self, reference: np.ndarray, candidate: np.ndarray, samples: int) -> None:
        """One batch of the output from both models; ``samples``: the samples in that batch."""
        if not self.applies:
            return
        ref, new = class_scores(reference), class_scores(candidate)
        self.applies = ref is not None and new is not None and ref.shape[0] == samples
        if self.applies:
            self.classes = ref.shape[1]
            self.reference.append(ref.argmax(axis=1))
            # A row holding NaN or Inf where the original's does not predicts nothing (-1: never
            # the original's class), whatever argmax makes of the NaN.
            broken = np.isinf(difference(ref, new)).any(axis=1)
            self.candidate.append(np.where(broken, -1, new.argmax(axis=1)))

    def agreement(self) -> float | None:
        """The share of samples on which both models predict the same class (None: not class scores)."""
        if not self.applies:
            return None
        return float(np.mean(np.concatenate(self.reference) == np.concatenate(self.candidate)))

    def accuracy(self, labels: np.ndarray) -> tuple[float, float]:
        """(reference, candidate): the share of samples whose prediction is the label."""
        return (float(np.mean(np.concatenate(self.reference) == labels)),
                float(np.mean(np.concatenate(self.candidate) == labels)))


# ---------------------------------------------------------------- standardised, per output channel


def channel_axis(shape: tuple, axis: int | None = None) -> int | None:
    """The axis whose entries are an output's channels: ``axis`` if given, else axis 1 of
    [N, C, ...] and [N, F] outputs and the last axis of [N, seq, F]; None for [N] (one channel)."""
    if axis is not None:
        return axis % len(shape)
    if len(shape) < 2:
        return None
    return len(shape) - 1 if len(shape) == 3 else 1


class ChannelErrors:
    """Running per-channel sums of one output over batches: the error of each channel divided by
    that channel's standard deviation in the original's outputs.

    A standardised error of 0 is an unchanged output; 1 is an error as large as the channel's own
    spread (as bad as replacing the channel by its mean). Channels whose spread is below
    ``FLOOR`` times the output's typical spread (dead or constant channels) are measured against
    that floor, so that a rounding-level change of a constant channel does not dominate.
    """

    FLOOR = 1e-3

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.count = 0
        self.ref_sum = self.ref_sq = self.diff_sq = None

    @_quiet
    def add(self, ref: np.ndarray, new: np.ndarray) -> None:
        diff, ref = difference(ref, new), finite_part(ref)
        axis = channel_axis(ref.shape, self.axis)
        if axis is None:
            ref, diff = ref.reshape(-1, 1), diff.reshape(-1, 1)
        else:
            ref, diff = np.moveaxis(ref, axis, -1), np.moveaxis(diff, axis, -1)
            ref, diff = ref.reshape(-1, ref.shape[-1]), diff.reshape(-1, diff.shape[-1])
        sums = (ref.sum(axis=0), np.square(ref).sum(axis=0), np.square(diff).sum(axis=0))
        if self.ref_sum is None:
            self.ref_sum, self.ref_sq, self.diff_sq = sums
        else:
            self.ref_sum, self.ref_sq, self.diff_sq = (a + b for a, b in zip((self.ref_sum, self.ref_sq,
                                                                                self.diff_sq), sums))
        self.count += ref.shape[0]

    @_quiet
    def per_channel(self) -> np.ndarray:
        """Each channel's RMS error over its standard deviation in the original's outputs."""
        if not self.count:
            return np.zeros(0)
        mean = self.ref_sum / self.count
        std = np.sqrt(np.maximum(self.ref_sq / self.count - mean**2, 0.0))
        typical = float(np.sqrt(np.mean(np.square(std))))
        rms = np.sqrt(self.diff_sq / self.count)
        if typical > 0:
            scale = np.maximum(std, self.FLOOR * typical)
        else:  # no spread at all (one sample, constant outputs): relative to the values' size instead
            scale = np.full_like(std, max(float(np.sqrt(np.mean(self.ref_sq / self.count))), np.finfo(float).tiny))
        # An infinite rms (NaN or Inf in the candidate) stays infinite: dropping it would make a
        # model that computes NaN look better than one that computes something.
        return np.where(rms > 0, rms / scale, 0.0)

    def result(self) -> float:
        """The output's standardised error: the RMS over channels of :meth:`per_channel`."""
        values = self.per_channel()
        return float(np.sqrt(np.mean(np.square(values)))) if values.size else 0.0

    def extra(self) -> dict:
        return {}


# ---------------------------------------------------------------- outputs judged by what they mean


def judged_errors(kind: str, log: bool, axis: int | None):
    """The running error of one output of ``kind`` (:mod:`onnxcomp.model.semantics`): a distribution
    by its divergence, labels by disagreement, an embedding by cosine, anything else per channel."""
    if kind == "distribution":
        return DistributionErrors(axis if axis is not None else -1, log)
    if kind == "labels":
        return LabelErrors()
    if kind == "embedding":
        return EmbeddingErrors(axis if axis is not None else -1)
    return ChannelErrors(axis)


def _rows(value: np.ndarray, axis: int) -> np.ndarray:
    """``value`` as [positions, entries along ``axis``], in float64."""
    value = np.moveaxis(np.asarray(value, dtype=np.float64), axis % max(np.ndim(value), 1), -1)
    return value.reshape(-1, value.shape[-1])


def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats of each row of probabilities (0 log 0 = 0)."""
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


class DistributionErrors:
    """A distribution output (a softmax over ``axis``) judged as one distribution per position.

    The error of a position is the Jensen-Shannon divergence between the two models' distributions
    (bounded, and finite where one of them has zeros); the output's standardised error is the square
    root of its mean over positions divided by the original's own spread, the Jensen-Shannon
    divergence among its positions' distributions, H(mean p) - mean H(p). As the per-channel error,
    it grows linearly with a small perturbation, and 1 is as far as a typical position's
    distribution is from the average one. Top-1 agreement per position is kept beside it; a
    non-finite candidate output is an infinite error.
    """

    def __init__(self, axis: int, log: bool = False):
        self.axis, self.log = axis, log
        self.count = self.agree = 0
        self.divergence = self.entropy = 0.0
        self.prob_sum = None
        self.nonfinite = False

    @_quiet
    def add(self, ref: np.ndarray, new: np.ndarray) -> None:
        p, q = _rows(ref, self.axis), _rows(new, self.axis)
        if self.log:
            p, q = np.exp(p), np.exp(q)
        if not np.all(np.isfinite(q)):
            self.nonfinite = True
            return
        p, q = (np.clip(x, 0.0, None) for x in (p, q))
        p, q = (x / np.maximum(x.sum(axis=-1, keepdims=True), np.finfo(float).tiny) for x in (p, q))
        hp, hq = _entropy(p), _entropy(q)
        self.divergence += float(np.sum(np.maximum(_entropy((p + q) / 2) - (hp + hq) / 2, 0.0)))
        self.entropy += float(hp.sum())
        self.prob_sum = p.sum(axis=0) if self.prob_sum is None else self.prob_sum + p.sum(axis=0)
        self.agree += int(np.count_nonzero(p.argmax(axis=-1) == q.argmax(axis=-1)))
        self.count += p.shape[0]

    def result(self) -> float:
        if self.nonfinite:
            return math.inf
        if not self.count:
            return 0.0
        spread = float(_entropy(self.prob_sum / self.count)) - self.entropy / self.count
        divergence = self.divergence / self.count
        if divergence <= 0:
            return 0.0
        return math.sqrt(divergence / max(spread, ChannelErrors.FLOOR * math.log(2)))

    def extra(self) -> dict:
        return {"kind": "distribution", "divergence": math.inf if self.nonfinite else
                (self.divergence / self.count if self.count else 0.0),
                "top1_agreement": None if self.nonfinite or not self.count else self.agree / self.count}


class LabelErrors:
    """Integer labels (an ArgMax): the share of entries on which the two models disagree."""

    def __init__(self):
        self.count = self.differ = 0

    def add(self, ref: np.ndarray, new: np.ndarray) -> None:
        self.differ += int(np.count_nonzero(np.asarray(ref) != np.asarray(new)))
        self.count += int(np.size(ref))

    def result(self) -> float:
        return self.differ / self.count if self.count else 0.0

    def extra(self) -> dict:
        return {"kind": "labels", "disagreement": self.result()}


class EmbeddingErrors:
    """L2-normalised vectors along ``axis``: 1 - cosine per vector. Its mean, times 2 and divided by
    the original vectors' total variance (1 - |mean vector|^2), is the square of the standardised
    error a per-channel measure with one pooled spread would give; its square root is the result."""

    def __init__(self, axis: int):
        self.axis = axis
        self.count, self.gap = 0, 0.0
        self.vector_sum = None
        self.nonfinite = False

    @_quiet
    def add(self, ref: np.ndarray, new: np.ndarray) -> None:
        a, b = _rows(ref, self.axis), _rows(new, self.axis)
        if not np.all(np.isfinite(b)):
            self.nonfinite = True
            return
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosine = np.where(norms > 0, np.sum(a * b, axis=1) / np.maximum(norms, 1e-300), 1.0)
        unit = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-300)
        self.gap += float(np.sum(1.0 - cosine))
        self.vector_sum = unit.sum(axis=0) if self.vector_sum is None else self.vector_sum + unit.sum(axis=0)
        self.count += a.shape[0]

    def result(self) -> float:
        if self.nonfinite:
            return math.inf
        if not self.count or self.gap <= 0:
            return 0.0
        variance = 1.0 - float(np.sum(np.square(self.vector_sum / self.count)))
        return math.sqrt(2 * (self.gap / self.count) / max(variance, ChannelErrors.FLOOR))

    def extra(self) -> dict:
        return {"kind": "embedding",
                "mean_cosine": None if self.nonfinite or not self.count else 1.0 - self.gap / self.count}


def standardized_error(per_output: dict[str, float], specs: dict[str, OutputSpec] | None = None) -> float:
    """The outputs' standardised errors combined: the weighted RMS (every output weighs 1 by default)."""
    weights = {name: (specs[name].weight if specs and name in specs else (0.0 if specs else 1.0))
               for name in per_output}
    if specs and not any(weights.values()):
        weights = dict.fromkeys(per_output, 1.0)
    total = sum(weights.values())
    if total <= 0:
        return 0.0
    # Outputs of weight 0 are left out, not multiplied by 0: 0 x inf would be NaN.
    return float(np.sqrt(sum(weights[name] * value**2 for name, value in per_output.items() if weights[name])
                         / total))
