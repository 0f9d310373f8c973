"""What the ALS solvers return: their factors (:mod:`.factors`) and the record of the solve."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from .factors import CPFactors, Tucker2Factors
from .linalg import PSDInfo


@dataclass(kw_only=True)
class SolverRecord:
    """What an alternating-least-squares solver reports besides its factors.

    ``errors[i]`` is the data error under S after sweep i+1 (under S = I when no
    S was given); ``initial_error`` the error of the chosen initialisation;
    ``error`` the final error, evaluated directly as ``tr(dW S dW^T)``;
    ``reference = tr(W S W^T)`` (relative error = error / reference).
    """

    error: float
    initial_error: float
    errors: list[float]
    reference: float
    iterations: int
    converged: bool
    seconds: float
    norm: str = "data"
    init: str = ""
    init_errors: dict = field(default_factory=dict)  # initial candidate -> error after its first closed-form step
    cg_iterations: list[int] = field(default_factory=list)  # per sweep
    timings: dict = field(default_factory=dict)  # seconds per phase
    psd: PSDInfo | None = None

    @property
    def relative_error(self) -> float:
        return self.error / self.reference if self.reference > 0 else 0.0


@dataclass(kw_only=True)
class Tucker2Result(SolverRecord):
    """Tucker-2 factors and the solver's record (a sweep that rounding would have made
    worse is reverted and repeats the previous error)."""

    factors: Tucker2Factors
    sweep_seconds: list[float] = field(default_factory=list)  # wall time of each sweep


@dataclass(kw_only=True)
class CPResult(SolverRecord):
    """CP factors and the solver's record."""

    factors: CPFactors
    reverted: int = 0  # block steps rejected because they would have raised the error
    error_seconds: list[float] = field(default_factory=list)  # time since the call began at each errors[i]
    initial_seconds: float = 0.0  # setup and initialisation (when initial_error was known)
    accelerated: tuple[int, int] = (0, 0)  # Anderson candidates (kept, tried)


class PhaseTimer:
    """Wall time per named phase of a solve, summed over repeats (``SolverRecord.timings``)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
