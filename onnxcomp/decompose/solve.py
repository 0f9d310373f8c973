"""Compress one layer: pick the rank, fit the factors, correct the bias, measure the error.

This is the seam between the pipeline and the solvers. It sees a layer as
plain arrays (:class:`LayerProblem`), never as ONNX, and returns a
:class:`Decomposition` that a pass in ``onnxcomp.passes`` turns into nodes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..calibration.stats import InputStats
from ..errors import OnnxcompError
from . import objective, ranks
from .svd import LowRank, output_spectrum, truncate

NORMS = ("data", "frobenius")


@dataclass
class RankChoice:
    """How the user asked for the rank of each layer (exactly one field set)."""

    rank: int | None = None
    keep: float | None = None  # fraction of the layer's MACs kept
    energy: float | None = None  # threshold tau of the energy / entropy rule
    rule: str = "energy"  # "energy" or "entropy"
    spectrum: str = "data"  # threshold on the "data"-aware or the "weight" spectrum


@dataclass
class LayerProblem:
    name: str
    weight: np.ndarray  # (m, d) float64
    bias: np.ndarray | None  # (m,) or None
    kernel: tuple[int, int]  # (1, 1) for Gemm/MatMul
    stats: InputStats | None  # None: data-free


@dataclass
class Decomposition:
    method: str
    factors: object  # LowRank for "svd"
    bias: np.ndarray | None  # bias of the last node of the chain (float64)
    rank: tuple[int, ...]
    params: int  # weights + bias of the chain
    error: float | None  # expected squared output change on the calibration data
    relative_error: float | None  # sqrt(error / output variance)
    info: dict = field(default_factory=dict)


@dataclass
class Options:
    method: str = "svd"
    norm: str = "data"
    centered: bool = True  # fit under the covariance and correct the bias
    ranks: RankChoice = field(default_factory=RankChoice)


def solve_layer(problem: LayerProblem, options: Options, xp=np) -> Decomposition | str:
    """A decomposition of the layer, or the reason (a string) why it stays dense."""
    if options.norm not in NORMS:
        raise OnnxcompError(f"unknown norm {options.norm!r}: use one of {NORMS}")
    if options.norm == "data" and problem.stats is None:
        raise OnnxcompError("the data norm needs calibration data or a statistics file (or use --norm frobenius)")
    solver = SOLVERS.get(options.method)
    if solver is None:
        raise OnnxcompError(f"unknown method {options.method!r}: use one of {sorted(SOLVERS)}")
    start = time.perf_counter()
    result = solver(problem, options, xp)
    if isinstance(result, Decomposition):
        result.info["seconds"] = time.perf_counter() - start
    return result


def fit_matrix(stats: InputStats | None, options: Options):
    """The matrix C of the norm ``tr(dW C dW^T)`` the solver minimises (None: identity)."""
    if options.norm == "frobenius":
        return None
    return stats.covariance() if options.centered else stats.second_moment()


def finish(problem: LayerProblem, options: Options, approx: np.ndarray) -> tuple[np.ndarray | None, float | None, float | None]:
    """Bias of the compressed layer and its error on the calibration data, for any W~."""
    delta_w = problem.weight - approx
    stats = problem.stats
    correct = options.norm == "data" and options.centered
    bias = problem.bias
    if correct:
        bias = objective.corrected_bias(problem.bias, delta_w, stats.mean())
    if stats is None:
        return bias, None, None
    covariance, mean = stats.covariance(), stats.mean()
    delta_b = None if bias is None else bias - (0 if problem.bias is None else problem.bias)
    error = objective.output_error(delta_w, covariance, mean, delta_b)
    return bias, error, objective.relative_error(error, objective.output_variance(problem.weight, covariance))


def solve_svd(problem: LayerProblem, options: Options, xp) -> Decomposition | str:
    W = problem.weight
    m, d = W.shape
    spectrum = output_spectrum(W, fit_matrix(problem.stats, options), xp)
    rank = _svd_rank(problem, options, spectrum, xp)
    if not ranks.lowrank_is_cheaper(rank, m, d):
        return f"rank {rank} is not cheaper than the dense {m}x{d} layer"
    factors = truncate(W, spectrum, rank, xp)
    bias, error, relative = finish(problem, options, factors.matrix())
    params = factors.first.size + factors.second.size + (0 if bias is None else bias.size)
    return Decomposition("svd", factors, bias, (rank,), params, error, relative)


def _svd_rank(problem: LayerProblem, options: Options, spectrum, xp) -> int:
    choice, (m, d) = options.ranks, problem.weight.shape
    if choice.rank is not None:
        return ranks.check_rank(choice.rank, m, d, problem.name)
    if choice.keep is not None:
        return ranks.rank_for_fraction(m, d, choice.keep)
    if choice.energy is not None:
        values = spectrum.values
        wants_weight = choice.spectrum == "weight" and options.norm == "data"
        wants_data = choice.spectrum == "data" and options.norm == "frobenius"
        if wants_weight:
            values = output_spectrum(problem.weight, None, xp).values
        elif wants_data:
            if problem.stats is None:
                raise OnnxcompError("--spectrum data needs calibration data")
            values = output_spectrum(problem.weight, problem.stats.covariance(), xp).values
        return ranks.rank_for_threshold(values, choice.energy, choice.rule)
    raise OnnxcompError("no rank rule given: use --rank, --keep or --energy")


@dataclass
class Candidate:
    """One point of a layer's error-versus-cost curve, for the budget allocation."""

    method: str
    rank: tuple[int, ...]
    weights: int  # weights of the chain: params, and MACs per output position
    error: float  # squared output error relative to the output variance


def svd_candidates(problem: LayerProblem, options: Options, xp, most: int = 128) -> list[Candidate]:
    """Every cheaper rank (or ``most`` of them, evenly spread) with its exact error, from one spectrum."""
    m, d = problem.weight.shape
    spectrum = output_spectrum(problem.weight, fit_matrix(problem.stats, options), xp)
    total = float(spectrum.values.sum())
    tails = np.concatenate([np.cumsum(spectrum.values[::-1])[::-1], [0.0]])
    largest = (m * d - 1) // (m + d)  # the largest rank that is still cheaper than dense
    ranks_ = np.unique(np.linspace(1, largest, num=min(most, largest)).round().astype(int)) if largest >= 1 else []
    return [
        Candidate("svd", (int(r),), int(r) * (m + d), float(tails[r] / total) if total > 0 else 0.0)
        for r in ranks_
    ]


SOLVERS = {"svd": solve_svd}
CANDIDATES = {"svd": svd_candidates}

__all__ = ["CANDIDATES", "Candidate", "Decomposition", "LayerProblem", "LowRank", "Options", "RankChoice", "SOLVERS", "solve_layer"]
