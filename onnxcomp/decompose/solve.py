"""Compress one layer: pick the rank, fit the factors, correct the bias, measure the error.

This is the seam between the pipeline and the solvers. It sees a layer as
plain arrays (:class:`LayerProblem`), never as ONNX, and returns a
:class:`Decomposition` that a pass in ``onnxcomp.passes`` turns into nodes.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import numpy as np

from ..calibration.stats import InputStats
from ..errors import OnnxcompError
from . import objective, ranks
from .factors import LowRank
from .svd import output_spectrum, truncate
from .cp import cp_cost, cp_decompose, cp_rank_for_fraction
from .tucker2 import energy_ranks, evbmf_ranks, search_ranks, tucker2, tucker2_cost

NORMS = ("data", "frobenius")


@dataclass
class RankChoice:
    """How the user asked for the rank of each layer (exactly one field set)."""

    rank: int | tuple[int, ...] | None = None  # Tucker-2 takes (R_out, R_in); one int means both
    keep: float | None = None  # fraction of the layer's MACs kept
    energy: float | None = None  # threshold tau of the energy / entropy rule
    rule: str = "energy"  # "energy" or "entropy"
    spectrum: str = "data"  # threshold on the "data"-aware or the "weight" spectrum
    evbmf: bool = False  # Tucker-2 ranks from EVBMF on the mode unfoldings (data-free)


@dataclass
class LayerProblem:
    name: str
    weight: np.ndarray  # (m, d) float64
    bias: np.ndarray | None  # (m,) or None
    kernel: tuple[int, int]  # (1, 1) for Gemm/MatMul
    stats: InputStats | None  # None: data-free
    input_ratio: float = 1.0  # input positions per output position (stride_h * stride_w for a conv)
    cache: dict = field(default_factory=dict, repr=False)  # spectra etc., shared by the budget and the solve


@dataclass
class Decomposition:
    method: str
    factors: object  # LowRank for "svd"
    bias: np.ndarray | None  # bias of the last node of the chain (float64)
    rank: tuple[int, ...]
    params: int  # weights + bias of the chain
    macs: int  # multiply-adds of the chain per output position
    error: float | None  # expected squared output change on the calibration data
    relative_error: float | None  # sqrt(error / output variance)
    info: dict = field(default_factory=dict)


@dataclass
class Options:
    method: str = "svd"
    norm: str = "data"
    centered: bool = True  # fit under the covariance and correct the bias
    ranks: RankChoice = field(default_factory=RankChoice)
    cp_form: str = "4way"  # CP: "4way" (kh x 1 and 1 x kw depthwise) or "3way" (one kh x kw depthwise)
    rank_multiple: int | None = None  # budgets: candidate ranks only at multiples of this (they run faster)


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


def finish(
    problem: LayerProblem, options: Options, approx: np.ndarray, solved: tuple[float, float] | None = None
) -> tuple[np.ndarray | None, float | None, float | None]:
    """Bias of the compressed layer and its error on the calibration data, for any W~.

    ``solved``: (error, tr(W S W^T)) as the solver already knows them under the
    covariance; with the bias corrected that *is* the output error, and the
    two d x d products of a direct evaluation are skipped (the costliest part
    of a large layer's solve).
    """
    delta_w = problem.weight - approx
    stats = problem.stats
    correct = options.norm == "data" and options.centered
    bias = problem.bias
    if correct:
        bias = objective.corrected_bias(problem.bias, delta_w, stats.mean())
    if stats is None:
        return bias, None, None
    if correct and solved is not None:
        error, reference = max(solved[0], 0.0), solved[1]
        return bias, error, objective.relative_error(error, reference)
    covariance, mean = stats.covariance(), stats.mean()
    delta_b = None if bias is None else bias - (0 if problem.bias is None else problem.bias)
    error = objective.output_error(delta_w, covariance, mean, delta_b)
    return bias, error, objective.relative_error(error, objective.output_variance(problem.weight, covariance))


def solve_svd(problem: LayerProblem, options: Options, xp) -> Decomposition | str:
    W = problem.weight
    m, d = W.shape
    spectrum = _spectrum(problem, options, xp)
    rank = _svd_rank(problem, options, spectrum, xp)
    if not ranks.lowrank_is_cheaper(rank, m, d):
        return f"rank {rank} is not cheaper than the dense {m}x{d} layer"
    factors = truncate(W, spectrum, rank, xp)
    bias, error, relative = finish(problem, options, factors.matrix(), (spectrum.error(rank), float(spectrum.values.sum())))
    weights = factors.first.size + factors.second.size
    return Decomposition("svd", factors, bias, (rank,), weights + _size(bias), weights, error, relative)


def _spectrum(problem: LayerProblem, options: Options, xp):
    """The layer's output spectrum under the fitted norm, computed once per problem and norm."""
    key = ("spectrum", options.norm, options.centered)
    if key not in problem.cache:
        problem.cache[key] = output_spectrum(problem.weight, fit_matrix(problem.stats, options), xp)
    return problem.cache[key]


def _size(array) -> int:
    return 0 if array is None else int(array.size)


def _svd_rank(problem: LayerProblem, options: Options, spectrum, xp) -> int:
    choice, (m, d) = options.ranks, problem.weight.shape
    if choice.rank is not None:
        rank = choice.rank if isinstance(choice.rank, int) else choice.rank[0]
        return ranks.check_rank(rank, m, d, problem.name)
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


def solve_tucker2(problem: LayerProblem, options: Options, xp) -> Decomposition | str:
    """Tucker-2 for kxk convolutions; 1x1 convs and Gemm/MatMul are matrices: SVD is their Tucker-2."""
    if problem.kernel == (1, 1):
        return solve_svd(problem, options, xp)
    W = _conv_weight(problem)
    c_out, c_in, kh, kw = W.shape
    S = fit_matrix(problem.stats, options)
    r_out, r_in = _tucker2_ranks(problem, options, W, S, xp)
    chain = tucker2_cost(c_out, c_in, kh, kw, r_out, r_in, in_positions=problem.input_ratio)
    if chain.macs >= problem.weight.size:
        return f"ranks ({r_out}, {r_in}) are not cheaper than the dense {c_out}x{c_in}x{kh}x{kw} conv"
    result = tucker2(W, S, (r_out, r_in), norm=options.norm, xp=xp)
    bias, error, relative = finish(problem, options, result.factors.weight().reshape(c_out, -1), (result.error, result.reference))
    weights = result.factors.params
    info = {"iterations": result.iterations, "converged": result.converged, "init": result.init,
            "error_first": result.errors[0] if result.errors else result.initial_error,
            "error_last": result.errors[-1] if result.errors else result.initial_error}
    return Decomposition("tucker2", result.factors, bias, (r_out, r_in), weights + _size(bias), int(round(chain.macs)),
                         error, relative, info)


def solve_cp(problem: LayerProblem, options: Options, xp) -> Decomposition | str:
    """CP for kxk convolutions (1x1 -> depthwise -> 1x1); matrices get the SVD, their CP."""
    if problem.kernel == (1, 1):
        return solve_svd(problem, options, xp)
    W = _conv_weight(problem)
    c_out, c_in, kh, kw = W.shape
    choice, form = options.ranks, options.cp_form
    if choice.rank is not None:
        rank = choice.rank if isinstance(choice.rank, int) else choice.rank[0]
    elif choice.keep is not None:
        rank = cp_rank_for_fraction(c_out, c_in, kh, kw, choice.keep, form=form, measure="macs",
                                    in_positions=problem.input_ratio)
    else:
        raise OnnxcompError("CP takes --rank R or --keep F (energy and EVBMF rules are for SVD / Tucker-2)")
    chain = cp_cost(c_out, c_in, kh, kw, rank, form, in_positions=problem.input_ratio)
    if chain.macs >= problem.weight.size:
        return f"CP rank {rank} is not cheaper than the dense {c_out}x{c_in}x{kh}x{kw} conv"
    S = fit_matrix(problem.stats, options)
    # A budget's candidate at this rank left its factors: continuing from them keeps the final
    # error at or below the candidate's (the allocation's upper bound) and skips the initialisation.
    warm = problem.cache.get(_cp_cache_key(options, rank))
    init = "auto" if warm is None or options.norm != "data" else warm.factors
    result = cp_decompose(W, S, rank, form=form, norm=options.norm, init=init, xp=xp)
    bias, error, relative = finish(problem, options, result.factors.weight().reshape(c_out, -1), (result.error, result.reference))
    weights = int(chain.params)
    info = {"form": form, "iterations": result.iterations, "converged": result.converged, "init": result.init,
            "error_first": result.errors[0] if result.errors else result.initial_error,
            "error_last": result.errors[-1] if result.errors else result.initial_error}
    return Decomposition("cp", result.factors, bias, (rank,), weights + _size(bias), int(round(chain.macs)), error, relative, info)


def _cp_cache_key(options: Options, rank: int) -> tuple:
    return ("cp", options.cp_form, options.norm, options.centered, int(rank))


def _conv_weight(problem: LayerProblem) -> np.ndarray:
    kh, kw = problem.kernel
    return problem.weight.reshape(problem.weight.shape[0], -1, kh, kw)


def _tucker2_ranks(problem: LayerProblem, options: Options, W, S, xp) -> tuple[int, int]:
    choice = options.ranks
    if choice.rank is not None:
        pair = (choice.rank, choice.rank) if isinstance(choice.rank, int) else tuple(choice.rank)
        for r, size, mode in zip(pair, W.shape[:2], ("output", "input")):
            if not 1 <= r <= size:
                raise OnnxcompError(
                    f"Tucker-2 {mode} rank {r} does not fit layer {problem.name!r}: it has {size} {mode} channels"
                )
        return pair
    if choice.keep is not None:
        search = search_ranks(W, S, choice.keep, measure="macs", in_positions=problem.input_ratio, xp=xp)
        return search.ranks
    if choice.energy is not None:
        data = S if choice.spectrum == "data" else None
        if choice.spectrum == "data" and data is None and problem.stats is not None:
            data = problem.stats.covariance()
        return energy_ranks(W, data, choice.energy, method=choice.rule, xp=xp)
    if choice.evbmf:
        return evbmf_ranks(W)
    raise OnnxcompError("no rank rule given: use --rank, --keep, --energy or --evbmf")


@dataclass
class Candidate:
    """One point of a layer's error-versus-cost curve, for the budget allocation."""

    method: str
    rank: tuple[int, ...]
    params: int  # weights of the chain
    macs: float  # multiply-adds of the chain per output position
    error: float  # squared output error relative to the output variance
    form: str | None = None  # CP: "4way" or "3way" (the chain it rewrites into)


def svd_candidates(problem: LayerProblem, options: Options, xp, most: int = 128) -> list[Candidate]:
    """Every cheaper rank (or ``most`` of them, evenly spread) with its exact error, from one spectrum."""
    m, d = problem.weight.shape
    spectrum = _spectrum(problem, options, xp)
    total = float(spectrum.values.sum())
    tails = np.concatenate([np.cumsum(spectrum.values[::-1])[::-1], [0.0]])
    largest = (m * d - 1) // (m + d)  # the largest rank that is still cheaper than dense
    return [
        Candidate("svd", (int(r),), int(r) * (m + d), int(r) * (m + d), float(tails[r] / total) if total > 0 else 0.0)
        for r in candidate_ranks(largest, most, options.rank_multiple)
    ]


def candidate_ranks(largest: int, most: int, multiple: int | None = None) -> list[int]:
    """Up to ``most`` ranks in [1, largest], evenly spread; with ``multiple``, only its multiples
    (all ranks when not even one multiple fits: a tiny layer has no fast rank to round to)."""
    if largest < 1:
        return []
    if multiple and largest >= multiple:
        steps = np.arange(1, largest // multiple + 1)
        picked = np.unique(np.linspace(0, len(steps) - 1, num=min(most, len(steps))).round().astype(int))
        return [int(steps[i] * multiple) for i in picked]
    return [int(r) for r in np.unique(np.linspace(1, largest, num=min(most, largest)).round().astype(int))]


TUCKER2_FRACTIONS = (0.08, 0.15, 0.25, 0.35, 0.5, 0.65, 0.8)


def tucker2_candidates(problem: LayerProblem, options: Options, xp, fractions=TUCKER2_FRACTIONS,
                       refine: int = 0) -> list[Candidate]:
    """A coarse curve: the best pair at a few MAC fractions, each scored by the solver's cheap proxy
    (its initialisation and one exact output step: an upper bound of the ALS error). ``refine``:
    input ranks scored around the best grid point (see :func:`search_ranks`)."""
    if problem.kernel == (1, 1):
        return svd_candidates(problem, options, xp)
    W = _conv_weight(problem)
    S = fit_matrix(problem.stats, options)
    out = []
    for fraction in fractions:
        try:
            search = search_ranks(W, S, fraction, measure="macs", in_positions=problem.input_ratio, grid=4,
                                  refine=refine, multiple=options.rank_multiple or 1, xp=xp)
        except OnnxcompError:  # no pair fits this fraction
            continue
        if search.ranks in {c.rank for c in out}:
            continue
        cost = tucker2_cost(*W.shape, *search.ranks, in_positions=problem.input_ratio)
        error = search.proxy_error / search.reference if search.reference > 0 else 0.0
        out.append(Candidate("tucker2", search.ranks, cost.params, cost.macs, error))
    return out


CP_FRACTIONS = TUCKER2_FRACTIONS
CP_CANDIDATE_SWEEPS = 2


def cp_candidates(problem: LayerProblem, options: Options, xp, fractions=None) -> list[Candidate]:
    """A coarse curve: the CP rank that fits each of a few MAC fractions, scored by the error after
    the solver's initialisation and ``CP_CANDIDATE_SWEEPS`` ALS sweeps.

    That score is an upper bound of the final error at the rank: every block step of the data-norm
    ALS is checked and reverted if it would raise the error, so more sweeps never raise it, and the
    solve at the chosen rank continues from these very factors (cached on the problem). Under the
    Frobenius norm the final solve restarts from the same seeded initialisation, so its first sweeps
    are these (plain CP-ALS is monotone up to its tiny ridge). 1x1 convs and Gemm/MatMul are matrices:
    their CP is the SVD, with its exact curve.
    """
    if problem.kernel == (1, 1):
        return svd_candidates(problem, options, xp)
    W = _conv_weight(problem)
    c_out, c_in, kh, kw = W.shape
    S = fit_matrix(problem.stats, options)
    form, out = options.cp_form, []
    for rank in _cp_candidate_ranks(W.shape, form, problem.input_ratio, options.rank_multiple, fractions or CP_FRACTIONS):
        result = cp_decompose(W, S, rank, form=form, norm=options.norm, max_iter=CP_CANDIDATE_SWEEPS, xp=xp)
        problem.cache[_cp_cache_key(options, rank)] = result
        cost = cp_cost(c_out, c_in, kh, kw, rank, form, in_positions=problem.input_ratio)
        error = result.error / result.reference if result.reference > 0 else 0.0
        out.append(Candidate("cp", (rank,), cost.params, cost.macs, error, form=form))
    return out


def _cp_candidate_ranks(shape, form: str, input_ratio: float, multiple: int | None = None,
                        fractions=CP_FRACTIONS) -> list[int]:
    """The distinct ranks that fit ``fractions`` of the dense MACs (rank 1 only if it is cheaper),
    rounded down to multiples of ``multiple`` where at least one fits (as :func:`candidate_ranks`)."""
    dense = int(np.prod(shape))
    ranks_ = {cp_rank_for_fraction(*shape, f, form=form, measure="macs", in_positions=input_ratio) for f in fractions}
    if multiple and max(ranks_) >= multiple:
        ranks_ = {r // multiple * multiple for r in ranks_ if r >= multiple}
    return sorted(r for r in ranks_ if cp_cost(*shape, r, form, in_positions=input_ratio).macs < dense)


def best_candidates(problem: LayerProblem, options: Options, xp) -> list[Candidate]:
    """Both methods' curves: the budget then picks the method per layer too."""
    return svd_candidates(problem, options, xp) + tucker2_candidates(problem, options, xp)


def solve_best(problem: LayerProblem, options: Options, xp) -> Decomposition | str:
    """``--method auto`` outside a budget: the method with the lower data error at the same rule."""
    results = [solve_svd(problem, options, xp), solve_tucker2(problem, options, xp)]
    done = [r for r in results if isinstance(r, Decomposition)]
    if not done:
        return results[0]
    return min(done, key=lambda r: (r.error if r.error is not None else 0.0, r.macs))


SOLVERS = {"svd": solve_svd, "tucker2": solve_tucker2, "cp": solve_cp, "auto": solve_best}
# CP is not part of "auto": its candidate curves cost about 7x Tucker-2's and its solves about 10x
# (README, "CP vs Tucker-2 vs SVD"), and its depthwise chains often run slower than Tucker-2's.
# Curves sampled at a few fractions; the budget asks them for more points where its spare cost reaches.
REFINABLE = {"tucker2": functools.partial(tucker2_candidates, refine=4), "cp": cp_candidates}
CANDIDATES = {"svd": svd_candidates, "tucker2": tucker2_candidates, "cp": cp_candidates, "auto": best_candidates}

__all__ = ["CANDIDATES", "Candidate", "Decomposition", "LayerProblem", "LowRank", "Options", "RankChoice", "SOLVERS", "solve_layer"]
