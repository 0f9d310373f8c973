"""How onnxcomp judges a candidate model: on held-out samples, against the original, per output channel.

A :class:`Judge` holds the validation samples and the original model's outputs on them (run
once). Every decision that compares candidate models (the sensitivity "auto" choice, latency
rounds) and the final line of the report ask it for a :class:`Fidelity`: per output the
standardised per-channel error (:class:`~onnxcomp.metrics.ChannelErrors`), the relative L2
error and the cosine, and the outputs combined (weighted by ``--outputs``). The samples are
held out of the statistics whenever there are enough (:mod:`onnxcomp.calibration.holdout`),
and the Judge says where they came from, so that no number calls itself held-out when it is not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .config import OutputSpec
from .errors import OnnxcompError
from .metrics import OutputErrors, TopOneAgreement, standardized_error
from .runtime import make_session, run_in_batches


@dataclass
class Fidelity:
    """How close a candidate's outputs are to the original's on the judge's samples."""

    standardized: float  # the outputs combined: weighted RMS of each output's standardised error
    outputs: dict  # name -> {standardized, relative_l2, cosine, max_abs, nonfinite}
    samples: int
    source: str  # where the samples came from ("held out of the statistics", "calibration samples", ...)
    held_out: bool
    top1_agreement: float | None = None  # when the first output is class scores
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"standardized": self.standardized, "samples": self.samples, "source": self.source,
                "held_out": self.held_out, "top1_agreement": self.top1_agreement, "outputs": self.outputs}


class Judge:
    """The validation samples and the original model's outputs on them."""

    def __init__(self, model: onnx.ModelProto, feed: dict, source: str, held_out: bool,
                 outputs: list[OutputSpec] | None = None, batch: int = 32):
        self.model, self.feed, self.source, self.held_out = model, feed, source, held_out
        self.batch = batch
        self.names = [o.name for o in model.graph.output]
        self.specs = _check_specs(outputs, self.names)
        self.reference = self.run(model)

    @property
    def samples(self) -> int:
        return len(next(iter(self.feed.values())))

    def run(self, model: onnx.ModelProto) -> list[np.ndarray]:
        """``model``'s outputs on the samples (in batches: fixed-batch models are padded)."""
        return run_in_batches(make_session(model), self.feed, self.batch)

    def fidelity(self, model: onnx.ModelProto) -> Fidelity:
        return self.compare(self.run(model))

    def compare(self, outputs: list[np.ndarray]) -> Fidelity:
        """The fidelity of a candidate's ``outputs`` (in the order of the original's outputs)."""
        per_output = self._errors(self.reference, outputs)
        by_output = {name: errors["standardized"] for name, errors in per_output.items()}
        top1 = TopOneAgreement()
        top1.add(self.reference[0], outputs[0], self.samples)
        return Fidelity(standardized_error(by_output, self.specs), per_output, self.samples, self.source,
                        self.held_out, top1.agreement())

    def standardized(self, reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
        """The combined standardised error of ``outputs`` against any ``reference`` outputs (the
        sensitivity probe compares perturbed runs with its own clean run)."""
        per_output = self._errors(reference, outputs)
        return standardized_error({name: e["standardized"] for name, e in per_output.items()}, self.specs)

    def _errors(self, reference, outputs) -> dict:
        errors = OutputErrors(self.names, {s.name: s.axis for s in (self.specs or {}).values()})
        errors.add(reference, outputs)
        return errors.result()

    def error(self, model: onnx.ModelProto) -> float:
        """The one number a decision between candidates minimises: the combined standardised error."""
        return self.fidelity(model).standardized


def _check_specs(specs: list[OutputSpec] | None, names: list[str]) -> dict[str, OutputSpec] | None:
    if not specs:
        return None
    unknown = [s.name for s in specs if s.name not in names]
    if unknown:
        raise OnnxcompError(f"--outputs names {unknown[0]!r}, but the model's outputs are {names}")
    return {s.name: s for s in specs}
