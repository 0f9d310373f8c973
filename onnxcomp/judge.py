"""How onnxcomp judges a candidate model: on held-out samples, against the original, per output channel.

A :class:`Judge` holds the validation samples and the original model's outputs on them (run
once). Every decision that compares candidate models (the sensitivity "auto" choice, latency
rounds) and the final line of the report ask it for a :class:`Fidelity`: per output the
standardised per-channel error (:class:`~onnxcomp.metrics.ChannelErrors`), the relative L2
error and the cosine, and the outputs combined (weighted by ``--outputs``). Each output is judged
by what the graph says it is (:mod:`onnxcomp.model.semantics`): per channel on its channel axis, a
distribution by its divergence, labels by disagreement, an embedding by cosine. The samples are
held out of the statistics whenever there are enough (:mod:`onnxcomp.calibration.holdout`),
and the Judge says where they came from, so that no number calls itself held-out when it is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from .config import OutputSpec
from .errors import OnnxcompError
from .metrics import (OutputErrors, TopOneAgreement, channel_axis, nonfinite_count, standardized_error,
                      token_layout)
from .model.semantics import output_semantics
from .runtime import make_session, run_in_batches


@dataclass
class Fidelity:
    """How close a candidate's outputs are to the original's on the judge's samples."""

    standardized: float  # the outputs combined: weighted RMS of each output's standardised error
    outputs: dict  # name -> {standardized, relative_l2, cosine, max_abs, nonfinite}
    samples: int
    source: str  # where the samples came from ("held out of the statistics", "calibration samples", ...)
    held_out: bool | None  # None: nobody can tell (statistics that record no sample digests)
    top1_agreement: float | None = None  # when the first output is class scores
    notes: list[str] = field(default_factory=list)

    @property
    def nonfinite(self) -> int:
        """NaN or Inf values in the candidate's outputs where the original's hold other values."""
        return sum(errors.get("nonfinite", 0) for errors in self.outputs.values())

    def to_dict(self) -> dict:
        return {"standardized": self.standardized, "samples": self.samples, "source": self.source,
                "held_out": self.held_out, "top1_agreement": self.top1_agreement, "outputs": self.outputs}


class Metric:
    """A score of a candidate model, higher is better; the loss of a candidate is the original's
    score minus its own (0: as good as the original)."""

    name = "metric"

    def score(self, judge: "Judge", model: onnx.ModelProto) -> float:
        raise NotImplementedError

    def step(self, judge: "Judge") -> float | None:
        """The smallest change of the score the judge's samples can show (None: no such step)."""
        return None


class FidelityMetric(Metric):
    """Minus the combined standardised error on the judge's samples (the original scores 0)."""

    name = "fidelity"

    def score(self, judge, model):
        return -judge.fidelity(model).standardized


class TopOneMetric(Metric):
    """Top-1 agreement with the original on the first output (the original scores 1): per sample of
    [batch, classes] scores, or per position of [batch, positions, classes] scores (a CTC
    recogniser's or a token classifier's; padding positions left out under a row mask)."""

    name = "top1"

    def score(self, judge, model):
        reference, candidate = judge.reference[0], judge.run(model)[0]
        if nonfinite_count(reference, candidate):
            return -math.inf  # NaN or Inf scores: infinitely worse, not a few disagreements
        if np.ndim(reference) == 3 and reference.dtype.kind == "f":
            axis = channel_axis(reference.shape, judge.axis_of(judge.names[0]))
            if reference.shape[axis] >= 2:
                agree = reference.argmax(axis=axis) == candidate.argmax(axis=axis)  # [N, positions]
                keep = judge.keep if judge.keep is not None and judge.keep.shape == agree.shape else None
                return float(np.mean(agree if keep is None else agree[keep]))
        top1 = TopOneAgreement()
        top1.add(reference, candidate, judge.samples)
        if top1.agreement() is None:
            raise OnnxcompError("--metric top1: the first output is neither [batch, classes] nor "
                                "[batch, positions, classes] scores")
        return top1.agreement()


    def step(self, judge):
        """One disagreement: one sample in the samples, or one position in the real positions."""
        reference = judge.reference[0]
        units = judge.samples
        if np.ndim(reference) == 3 and reference.dtype.kind == "f":
            axis = channel_axis(reference.shape, judge.axis_of(judge.names[0]))
            keep = judge.keep if judge.keep is not None and judge.keep.shape == reference.shape[:2] else None
            if axis == 2 and reference.shape[2] >= 2:
                units = int(keep.sum()) if keep is not None else reference.shape[0] * reference.shape[1]
        return 1.0 / max(units, 1)


class CosineMetric(Metric):
    """Mean cosine similarity per sample of the first output to the original's (embeddings; the original 1)."""

    name = "cosine"

    def score(self, judge, model):
        reference, candidate = judge.reference[0], judge.run(model)[0]
        if nonfinite_count(reference, candidate):
            return -math.inf  # a vector holding NaN or Inf has no direction: infinitely worse
        ref, new = (judge.masked(output).reshape(judge.samples, -1).astype(np.float64)
                    for output in (reference, candidate))
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(new, axis=1)
        return float(np.mean(np.where(norms > 0, np.sum(ref * new, axis=1) / np.maximum(norms, 1e-300), 1.0)))


class SessionMetric(Metric):
    """The user's own: ``fn(session) -> float`` on an onnxruntime session of the candidate, higher is
    better, on whatever data the user's function runs (its labels, its task metric)."""

    def __init__(self, fn):
        self.fn, self.name = fn, getattr(fn, "__name__", "metric")

    def score(self, judge, model):
        value = self.fn(make_session(model, threads=judge.threads))
        try:
            return float(value)
        except (TypeError, ValueError):
            raise OnnxcompError(f"metric {self.name}() returned {value!r}: it must return a number "
                                "(higher is better)") from None


BUILTIN_METRICS = {m.name: m for m in (FidelityMetric, TopOneMetric, CosineMetric)}


def make_metric(metric) -> Metric:
    """A built-in metric by name, or a user's ``fn(session) -> float``."""
    if isinstance(metric, Metric):
        return metric
    if callable(metric):
        return SessionMetric(metric)
    if not isinstance(metric, str) or metric not in BUILTIN_METRICS:
        raise OnnxcompError(f"--metric: unknown metric {metric!r}, use one of {', '.join(BUILTIN_METRICS)}")
    return BUILTIN_METRICS[metric]()


class Judge:
    """The validation samples, the original model's outputs on them, and the metric that judges."""

    def __init__(self, model: onnx.ModelProto, feed: dict, source: str, held_out: bool | None,
                 outputs: list[OutputSpec] | None = None, batch: int = 32, metric="fidelity",
                 row_mask: str | None = None, threads: int | None = None):
        self.model, self.feed, self.source, self.held_out = model, feed, source, held_out
        self.threads = threads  # onnxruntime intra-op threads of the candidates' sessions
        self.batch, self.row_mask = batch, row_mask
        self.keep = self.keep_of(feed)
        self.names = [o.name for o in model.graph.output]
        self.specs = _check_specs(outputs, self.names)
        self.semantics = output_semantics(model)
        self.reference = self.run(model)
        check_output_axes(self.specs, {name: np.ndim(value) for name, value in zip(self.names, self.reference)})
        self.metric = make_metric(metric)
        self._original_score = None

    def subset(self, count: int) -> "Judge":
        """A judge of the first ``count`` samples (cheaper, for many candidate models)."""
        if count >= self.samples:
            return self
        feed = {name: value[:count] for name, value in self.feed.items()}
        return Judge(self.model, feed, self.source, self.held_out, list((self.specs or {}).values()), self.batch,
                     self.metric, self.row_mask, self.threads)

    def keep_of(self, feed: dict) -> np.ndarray | None:
        """Which token positions of ``feed`` are real (the row mask's ones); None: no row mask."""
        return None if self.row_mask is None or self.row_mask not in feed else feed[self.row_mask] != 0

    def axis_of(self, name: str) -> int | None:
        """The channel axis of output ``name``: the one ``--outputs`` gives, else the graph's
        (:mod:`onnxcomp.model.semantics`); None: neither tells (the rank rule of
        :func:`~onnxcomp.metrics.channel_axis`)."""
        if self.specs and name in self.specs and self.specs[name].axis is not None:
            return self.specs[name].axis
        return self.semantics[name].axis if name in self.semantics else None

    def kind_of(self, name: str) -> tuple[str, bool]:
        """(kind, log) of output ``name``: how it is judged (a distribution, labels, ...)."""
        meaning = self.semantics.get(name)
        return (meaning.kind, meaning.log) if meaning is not None else ("values", False)

    def masked(self, output: np.ndarray) -> np.ndarray:
        """A token-layout output [N, seq, F] with its padding positions set to 0 (the same for both
        models, so padding adds nothing to a comparison)."""
        if not token_layout(output, self.keep, None):
            return output
        return np.where(self.keep[..., None], output, 0)

    @property
    def original_score(self) -> float:
        if self._original_score is None:
            score = self.metric.score(self, self.model)
            if not math.isfinite(score):  # every loss would be NaN: no candidate could ever be judged
                raise OnnxcompError(f"metric {self.metric.name} scores the original model {score}: it must give "
                                    "the original a finite score")
            self._original_score = score
        return self._original_score

    def loss(self, model: onnx.ModelProto) -> float:
        """How much worse ``model`` scores than the original (0: as good; the quantity decisions
        minimise). A score that is not a finite number (NaN outputs, a metric's NaN) is an infinite loss."""
        original = self.original_score  # first: an original without a finite score is refused
        score = self.metric.score(self, model)
        return original - score if math.isfinite(score) else math.inf

    @property
    def samples(self) -> int:
        return len(next(iter(self.feed.values())))

    def run(self, model: onnx.ModelProto) -> list[np.ndarray]:
        """``model``'s outputs on the samples (in batches: fixed-batch models are padded)."""
        return run_in_batches(make_session(model, threads=self.threads), self.feed, self.batch)

    def fidelity(self, model: onnx.ModelProto) -> Fidelity:
        return self.compare(self.run(model))

    def compare(self, outputs: list[np.ndarray]) -> Fidelity:
        """The fidelity of a candidate's ``outputs`` (in the order of the original's outputs)."""
        per_output = self._errors(self.reference, outputs)
        by_output = {name: errors["standardized"] for name, errors in per_output.items()}
        top1 = TopOneAgreement()
        top1.add(self.reference[0], outputs[0], self.samples)
        agreement = top1.agreement()
        if agreement is None:  # per position of a distribution (a CTC recogniser's)
            agreement = per_output[self.names[0]].get("top1_agreement")
        return Fidelity(standardized_error(by_output, self.specs), per_output, self.samples, self.source,
                        self.held_out, agreement)

    def standardized(self, reference: list[np.ndarray], outputs: list[np.ndarray], feed: dict | None = None) -> float:
        """The combined standardised error of ``outputs`` against any ``reference`` outputs (the
        sensitivity probe compares perturbed runs with its own clean run on its ``feed``)."""
        per_output = self._errors(reference, outputs, self.keep if feed is None else self.keep_of(feed))
        return standardized_error({name: e["standardized"] for name, e in per_output.items()}, self.specs)

    def _errors(self, reference, outputs, keep: np.ndarray | None = None) -> dict:
        errors = OutputErrors(self.names, {name: self.axis_of(name) for name in self.names},
                              {name: self.kind_of(name) for name in self.names})
        errors.add(reference, outputs, self.keep if keep is None else keep)
        return errors.result()


def check_output_axes(specs, ranks: dict[str, int]) -> None:
    """A one-line error for an ``--outputs NAME:WEIGHT:AXIS`` whose axis the output does not have
    (``ranks``: output name -> rank, where known); -rank..rank-1, as NumPy counts."""
    for spec in (specs.values() if isinstance(specs, dict) else specs or ()):
        rank = ranks.get(spec.name)
        if spec.axis is not None and rank is not None and not -rank <= spec.axis < max(rank, 1):
            raise OnnxcompError(f"--outputs {spec.name}:{spec.weight:g}:{spec.axis}: output {spec.name!r} has rank "
                                f"{rank}, so its channel axis is one of {-rank}..{rank - 1}")


def _check_specs(specs: list[OutputSpec] | None, names: list[str]) -> dict[str, OutputSpec] | None:
    if not specs:
        return None
    unknown = [s.name for s in specs if s.name not in names]
    if unknown:
        raise OnnxcompError(f"--outputs names {unknown[0]!r}, but the model's outputs are {names}")
    return {s.name: s for s in specs}
