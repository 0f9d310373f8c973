"""Compress one layer: pick the rank, fit the factors, correct the bias, measure the error.

This is the seam between the pipeline and the solvers. It sees a layer as
plain arrays (:class:`LayerProblem`), never as ONNX, and returns a
:class:`Decomposition` that a pass in ``onnxcomp.passes`` turns into nodes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from ..calibration.stats import InputStats
from ..config import Method, Norm, SolveConfig
from ..errors import OnnxcompError
from ..threads import map_parallel
from . import objective, ranks
from .cp import cp_cost, cp_decompose, cp_rank_for_fraction
from .svd import Spectrum, output_spectrum, truncate
from .tucker2 import energy_ranks, evbmf, evbmf_ranks, search_ranks, tucker2, tucker2_cost
from .tucker2.surface import ProxySurface


@dataclass
class LayerProblem:
    """One layer as plain arrays: ``y = W x + b`` with the statistics of its input rows ``x``."""

    name: str
    weight: np.ndarray  # (m, d) float64
    bias: np.ndarray | None  # (m,) or None
    kernel: tuple[int, ...]  # (1, 1) for Gemm/MatMul; one entry per spatial dim for a conv
    stats: InputStats | None  # None: data-free
    input_ratio: float = 1.0  # input positions per output position (stride_h * stride_w for a conv)
    positions: int | None = None  # output rows per sample (pixels, tokens); None: unknown
    # A grouped conv: each group's own problem (its rows of W, its input channels' statistics; see
    # grouped.py), and ``stats`` is group 0's (every group's have the same rows). Empty: not grouped.
    parts: tuple = ()
    _spectra: dict = field(default_factory=dict, repr=False)  # (norm, centered) -> Spectrum
    _surfaces: dict = field(default_factory=dict, repr=False)  # (norm, centered) -> Tucker-2 ProxySurface

    @property
    def groups(self) -> int:
        return len(self.parts) or 1

    @property
    def pointwise(self) -> bool:
        """A 1x1 conv, Gemm or MatMul: a matrix, whose Tucker-2 and CP are its SVD."""
        return int(np.prod(self.kernel)) == 1

    def conv_weight(self) -> np.ndarray:
        """W as (C_out, C_in, kh, kw); a 1-D or 3-D kernel as (C_out, C_in, 1, K), K its taps.

        Tucker-2 and 3-way CP see the taps as one mode whatever the kernel's shape (the patch and
        W.reshape(C_out, -1) order them alike), so the solvers work on this 4-D view and the passes
        give the core the kernel's own shape back."""
        kernel = self.kernel if len(self.kernel) == 2 else (1, int(np.prod(self.kernel)))
        return self.weight.reshape(self.weight.shape[0], -1, *kernel)

    def fit_matrix(self, solve: SolveConfig):
        """The matrix C of the norm ``tr(dW C dW^T)`` the solver minimises (None: identity)."""
        if solve.norm is Norm.FROBENIUS:
            return None
        return self.stats.covariance() if solve.centered else self.stats.second_moment()

    def spectrum(self, solve: SolveConfig, xp) -> Spectrum:
        """The output spectrum under the fitted norm, computed once: a budget's SVD curve and
        the solve at its chosen rank read the same eigendecomposition."""
        key = (solve.norm, solve.centered)
        if key not in self._spectra:
            self._spectra[key] = output_spectrum(self.weight, self.fit_matrix(solve), xp)
        return self._spectra[key]

    def tucker2_surface(self, solve: SolveConfig, xp) -> ProxySurface:
        """The proxy errors of every Tucker-2 rank pair under the fitted norm, computed once: a
        budget's Tucker-2 curve and its refinements read them."""
        key = (solve.norm, solve.centered)
        if key not in self._surfaces:
            self._surfaces[key] = ProxySurface(self.conv_weight(), self.fit_matrix(solve), xp=xp)
        return self._surfaces[key]


@dataclass
class Decomposition:
    method: Method
    factors: object  # LowRank for "svd"
    bias: np.ndarray | None  # bias of the last node of the chain (float64)
    rank: tuple[int, ...]
    params: int  # weights + bias of the chain
    macs: int  # multiply-adds of the chain per output position
    error: float | None  # expected squared output change on the calibration data
    relative_error: float | None  # sqrt(error / output variance)
    info: dict = field(default_factory=dict)


def layer_problem(layer, stats) -> LayerProblem:
    """The problem of a target layer (:class:`onnxcomp.model.TargetLayer`) with its input statistics:
    an :class:`InputStats`, one per group for a grouped conv (``layer.stats_keys``), or None."""
    grouped = layer.groups > 1
    every = [stats] if not grouped else [None] * layer.groups if stats is None else list(stats)
    for group_stats in every:
        if group_stats is not None and group_stats.dim != layer.in_features:
            raise OnnxcompError(f"statistics for layer {layer.name!r} have dimension {group_stats.dim}, "
                                f"the layer reads {layer.in_features}")
    stats = every[0]
    bias = None if layer.bias is None else layer.bias.astype(np.float64)
    # A strided conv's first 1x1 conv of a Tucker-2 chain runs at the input resolution.
    input_ratio = float(np.prod(layer.conv.strides)) if layer.conv is not None else 1.0
    # Output rows per sample: from shape inference, else from the calibration statistics.
    positions = layer.positions if layer.positions is not None else (
        None if stats is None else round(stats.positions))
    problem = LayerProblem(layer.name, layer.weight.astype(np.float64), bias, layer.kernel, stats, input_ratio,
                           positions)
    if grouped:
        from .grouped import group_parts  # grouped.py builds on this module

        problem.parts = group_parts(problem, every)
    return problem


# Layer name -> its Decomposition, or the reason (a string) why it stays dense.
Solved = dict


def solve_layers(problems: dict[str, LayerProblem], plan: dict, xp=np, progress: bool = False,
                 workers: int = 1, sweeps: int | None = None) -> Solved:
    """Every layer of ``plan`` (name -> (SolveConfig, start), or the reason it is not solved), on
    ``workers`` threads (layers are independent; see :mod:`onnxcomp.threads`); ``sweeps``: as
    :func:`solve_layer`'s."""

    names = list(plan)
    # Each item carries its own problem, so that a remote worker (Ray) is sent that layer's only.
    items = [(None if isinstance(plan[name], str) else problems[name], plan[name]) for name in names]
    results = map_parallel(partial(_solve_entry, xp, sweeps), items, layer_workers(workers, xp), desc="solve",
                           progress=progress)
    return dict(zip(names, results))


def _solve_entry(xp, sweeps, item) -> Decomposition | str:
    problem, entry = item
    return entry if isinstance(entry, str) else solve_layer(problem, entry[0], xp, entry[1], sweeps)


def layer_workers(workers: int, xp) -> int:
    """Threads to solve layers on: one on a GPU (CuPy's stream serialises them anyway)."""
    return workers if xp is np else 1


def solve_layer(problem: LayerProblem, solve: SolveConfig, xp=np, start=None,
                sweeps: int | None = None) -> Decomposition | str:
    """A decomposition of the layer, or the reason (a string) why it stays dense.

    ``start``: factors a budget's candidate left at this rank (CP and Tucker-2 continue from them).
    ``sweeps``: Tucker-2 stops after at most this many ALS sweeps (a budget judging an allocation it
    may not keep; a later solve continues from the result); the other methods solve in full.
    """
    if solve.ranks.keep is not None and solve.ranks.keep >= 1:
        return "--keep 1.0 keeps every layer as it is"
    if solve.norm is Norm.DATA and problem.stats is None:
        raise OnnxcompError("the data norm needs calibration data or a statistics file (or use --norm frobenius)")
    began = time.perf_counter()
    if problem.parts:
        from .grouped import solve_grouped  # grouped.py builds on this module

        result = solve_grouped(problem, solve, xp, start, sweeps)
    elif sweeps is not None and solve.method is Method.TUCKER2:
        result = solve_tucker2(problem, solve, xp, start, sweeps=sweeps)
    else:
        result = SOLVERS[solve.method](problem, solve, xp, start)
    if isinstance(result, Decomposition):
        result.info["seconds"] = time.perf_counter() - began
    return result


def finish(
    problem: LayerProblem, solve: SolveConfig, approx: np.ndarray, solved: tuple[float, float] | None = None
) -> tuple[np.ndarray | None, float | None, float | None]:
    """Bias of the compressed layer and its error on the calibration data, for any W~.

    ``solved``: (error, tr(W S W^T)) as the solver already knows them under the
    covariance; with the bias corrected that *is* the output error, and the
    two d x d products of a direct evaluation are skipped (the costliest part
    of a large layer's solve).
    """
    delta_w = problem.weight - approx
    stats = problem.stats
    correct = solve.norm is Norm.DATA and solve.centered
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


def solve_svd(problem: LayerProblem, solve: SolveConfig, xp, start=None) -> Decomposition | str:
    W = problem.weight
    m, d = W.shape
    spectrum = problem.spectrum(solve, xp)
    rank = _svd_rank(problem, solve, spectrum, xp)
    if not ranks.lowrank_is_cheaper(rank, m, d):
        return f"rank {rank} is not cheaper than the dense {m}x{d} layer"
    factors = truncate(W, spectrum, rank, xp)
    solved = (spectrum.error(rank), float(spectrum.values.sum()))
    bias, error, relative = finish(problem, solve, factors.matrix(), solved)
    weights = factors.first.size + factors.second.size
    return Decomposition(Method.SVD, factors, bias, (rank,), weights + _size(bias), weights, error, relative)


def _size(array) -> int:
    return 0 if array is None else int(array.size)


def _svd_rank(problem: LayerProblem, solve: SolveConfig, spectrum, xp) -> int:
    choice, (m, d) = solve.ranks, problem.weight.shape
    if choice.rank is not None:
        rank = choice.rank if isinstance(choice.rank, int) else choice.rank[0]
        return ranks.check_rank(rank, m, d, problem.name)
    if choice.keep is not None:
        return ranks.rank_for_fraction(m, d, choice.keep)
    if choice.energy is not None:
        values = spectrum.values
        wants_weight = choice.spectrum == "weight" and solve.norm is Norm.DATA
        wants_data = choice.spectrum == "data" and solve.norm is Norm.FROBENIUS
        if wants_weight:
            values = output_spectrum(problem.weight, None, xp).values
        elif wants_data:
            if problem.stats is None:
                raise OnnxcompError("--spectrum data needs calibration data")
            values = output_spectrum(problem.weight, problem.stats.covariance(), xp).values
        return ranks.rank_for_threshold(values, choice.energy, choice.rule)
    if choice.evbmf:  # a matrix layer under --method tucker2: EVBMF's rank of the matrix itself
        return max(1, evbmf(problem.weight)[0])
    raise OnnxcompError("no rank rule given: use --rank, --keep or --energy")


def solve_tucker2(problem: LayerProblem, solve: SolveConfig, xp, start=None,
                  sweeps: int | None = None) -> Decomposition | str:
    """Tucker-2 for kxk convolutions; 1x1 convs and Gemm/MatMul are matrices: SVD is their Tucker-2.
    ``sweeps``: at most this many ALS sweeps (default: to convergence)."""
    if problem.pointwise:
        return solve_svd(problem, solve, xp)
    W = problem.conv_weight()
    c_out, c_in, kh, kw = W.shape
    S = problem.fit_matrix(solve)
    r_out, r_in = _tucker2_ranks(problem, solve, W, S, xp)
    chain = tucker2_cost(c_out, c_in, kh, kw, r_out, r_in, in_positions=problem.input_ratio)
    if chain.macs >= problem.weight.size:
        return f"ranks ({r_out}, {r_in}) are not cheaper than the dense {c_out}x{c_in}x{kh}x{kw} conv"
    init = _tucker2_start(start, c_in, r_in) if solve.norm is Norm.DATA else "auto"
    limit = {} if sweeps is None else {"max_iter": int(sweeps)}
    result = tucker2(W, S, (r_out, r_in), norm=solve.norm, init=init, xp=xp, **limit)
    return _als_decomposition(problem, solve, Method.TUCKER2, result, (r_out, r_in), chain)


def _tucker2_start(start, c_in: int, r_in: int):
    """The input basis a budget left at these ranks (its candidate's, after a sweep from the proxy's
    basis, or a judged allocation's partial solve), for the ALS to continue from: its final error is
    then at most that score. "auto" (the solver's own initialisation) without one."""
    if start is None:
        return "auto"
    u_in = getattr(getattr(start, "factors", None), "u_in", start)
    return u_in if getattr(u_in, "shape", None) == (c_in, r_in) else "auto"


def solve_cp(problem: LayerProblem, solve: SolveConfig, xp, start=None) -> Decomposition | str:
    """CP for kxk convolutions (1x1 -> depthwise -> 1x1); matrices get the SVD, their CP."""
    if problem.pointwise:
        return solve_svd(problem, solve, xp)
    W = problem.conv_weight()
    c_out, c_in, kh, kw = W.shape
    choice, form = solve.ranks, solve.cp_form
    if form == "4way" and len(problem.kernel) != 2:
        return cp_form_reason(problem.kernel)
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
    S = problem.fit_matrix(solve)
    # A budget's candidate at this rank left its factors: continuing from them keeps the final
    # error at or below the candidate's (the allocation's upper bound) and skips the initialisation.
    init = "auto" if start is None or solve.norm is not Norm.DATA else start.factors
    result = cp_decompose(W, S, rank, form=form, norm=solve.norm, init=init, xp=xp)
    return _als_decomposition(problem, solve, Method.CP, result, (rank,), chain, {"form": form})


def cp_form_reason(kernel) -> str:
    """Why the 4-way CP chain does not fit a 1-D or 3-D kernel (it splits the two axes of a 2-D one)."""
    return (f"CP 4way splits a 2-D kernel into a vertical and a horizontal one; this {len(kernel)}-D conv "
            "takes --cp-form 3way (one depthwise kernel per component)")


def _als_decomposition(problem, solve: SolveConfig, method: Method, result, rank, chain, info=None) -> Decomposition:
    """The Decomposition of an ALS solver's result: bias corrected, its error, the solver's record."""
    approx = result.factors.weight().reshape(problem.weight.shape[0], -1)
    bias, error, relative = finish(problem, solve, approx, (result.error, result.reference))
    first, last = (result.errors[0], result.errors[-1]) if result.errors else (result.initial_error,) * 2
    info = {**(info or {}), "iterations": result.iterations, "converged": result.converged, "init": result.init,
            "error_first": first, "error_last": last}
    params = result.factors.params + _size(bias)
    return Decomposition(method, result.factors, bias, rank, params, int(round(chain.macs)), error, relative, info)


def _tucker2_ranks(problem: LayerProblem, solve: SolveConfig, W, S, xp) -> tuple[int, int]:
    choice = solve.ranks
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


def solve_best(problem: LayerProblem, solve: SolveConfig, xp, start=None) -> Decomposition | str:
    """``--method auto`` outside a budget: the method with the lower data error at the same rule."""
    results = [solve_svd(problem, solve, xp), solve_tucker2(problem, solve, xp)]
    done = [r for r in results if isinstance(r, Decomposition)]
    if not done:
        return results[0]
    return min(done, key=lambda r: (r.error if r.error is not None else 0.0, r.macs))


SOLVERS = {Method.SVD: solve_svd, Method.TUCKER2: solve_tucker2, Method.CP: solve_cp, Method.AUTO: solve_best}
