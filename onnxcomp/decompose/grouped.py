"""Grouped convolutions: every group is its own layer problem, and all groups share one rank.

A Conv with ``group = G`` is G convs side by side: output channel block g reads input channel
block g only. Its statistics are block diagonal, so each group is a layer problem of its own (its
rows of W and the patches of its own input channels: ``TargetLayer.stats_keys``), and the layer's
data error is the sum of its groups' (their outputs are disjoint channels).

Every group takes the same rank(s). Then each step of the chain is one grouped Conv (G * r
channels, ``group = G``; :func:`onnxcomp.passes.common.grouped_steps`), one node for onnxruntime,
and a budget prices one choice per layer as for any other. A rank per group would need a Split,
G chains and a Concat (or every group padded to the largest rank). At one shared rank the groups
do not interact, so each is solved on its own and the sum of their optima is the layer's. The
rank is the layer's rule applied to its groups: the same for all of them under ``--rank`` and
``--keep`` (equal shapes; Tucker-2's ``--keep`` takes the pair with the smallest summed proxy
error), the largest of the groups' under the threshold rules (each group keeps at least its share).
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np

from ..config import Method, SolveConfig
from ..errors import OnnxcompError
from . import objective
from .cp import cp_rank_for_fraction
from .factors import GroupedFactors
from .solve import SOLVERS, Decomposition, LayerProblem, _svd_rank, _tucker2_ranks, solve_tucker2
from .tucker2.surface import best_summed


def group_parts(problem: LayerProblem, stats: list) -> tuple[LayerProblem, ...]:
    """Each group's problem: its rows of W and of the bias, its input channels' statistics."""
    rows = problem.weight.shape[0] // len(stats)
    return tuple(
        LayerProblem(f"{problem.name} group {g}", problem.weight[g * rows : (g + 1) * rows],
                     None if problem.bias is None else problem.bias[g * rows : (g + 1) * rows], problem.kernel,
                     group_stats, problem.input_ratio, problem.positions)
        for g, group_stats in enumerate(stats))


def solve_grouped(problem: LayerProblem, solve: SolveConfig, xp, start=None,
                  sweeps: int | None = None) -> Decomposition | str:
    """Every group at the shared rank, as one :class:`Decomposition` (or why the layer stays dense)."""
    if solve.method is Method.AUTO:  # as solve_best: the method with the lower data error
        results = [solve_grouped(problem, replace(solve, method=method), xp) for method in (Method.SVD, Method.TUCKER2)]
        done = [r for r in results if isinstance(r, Decomposition)]
        return min(done, key=lambda r: (r.error or 0.0, r.macs)) if done else results[0]
    rank = shared_rank(problem, solve, xp)
    if isinstance(rank, str):
        return rank
    fixed = solve.at_rank(solve.method, rank)
    results = []
    for part, part_start in zip(problem.parts, _group_starts(start, problem.groups)):
        if sweeps is not None and solve.method is Method.TUCKER2:
            result = solve_tucker2(part, fixed, xp, part_start, sweeps=sweeps)
        else:
            result = SOLVERS[solve.method](part, fixed, xp, part_start)
        if isinstance(result, str):
            return f"each of its {problem.groups} groups: {result}"
        results.append(result)
    return _combined(problem, results)


def shared_rank(problem: LayerProblem, solve: SolveConfig, xp):
    """The rank (an int, or Tucker-2's (R_out, R_in)) every group of the layer takes, or why there is none."""
    choice, parts = solve.ranks, problem.parts
    if choice.rank is not None:
        return choice.rank
    if solve.method is Method.SVD or parts[0].pointwise:  # a grouped 1x1 conv is a matrix per group
        return max(_svd_rank(part, solve, part.spectrum(solve, xp), xp) for part in parts)
    shape = parts[0].conv_weight().shape
    if solve.method is Method.CP:
        if choice.keep is None:
            raise OnnxcompError("CP takes --rank R or --keep F (energy and EVBMF rules are for SVD / Tucker-2)")
        return cp_rank_for_fraction(*shape, choice.keep, form=solve.cp_form, measure="macs",
                                    in_positions=problem.input_ratio)
    if choice.keep is not None:
        surfaces = [part.tucker2_surface(solve, xp) for part in parts]
        best = best_summed(surfaces, choice.keep * float(np.prod(shape)), measure="macs",
                           in_positions=problem.input_ratio)
        for surface in surfaces:
            surface.release()
        if best is None:  # a reason, not an error as for a layer alone: --method auto still has the SVD
            return (f"a Tucker-2 chain cannot fit {choice.keep:.3g} of the MACs of its "
                    f"{'x'.join(map(str, shape))} groups, even at ranks (1, 1)")
        return int(best[0]), int(best[1])
    pairs = [_tucker2_ranks(part, solve, part.conv_weight(), part.fit_matrix(solve), xp) for part in parts]
    return tuple(int(max(pair[i] for pair in pairs)) for i in (0, 1))


def _group_starts(start, groups: int) -> list:
    """Each group's start: a budget candidate's list, or the parts of an earlier solve of the layer."""
    if isinstance(start, (list, tuple)):
        return list(start)
    factors = getattr(start, "factors", None)
    if isinstance(factors, GroupedFactors):
        return [SimpleNamespace(factors=part) for part in factors.parts]
    return [None] * groups


def _combined(problem: LayerProblem, results: list[Decomposition]) -> Decomposition:
    """The groups' decompositions as the layer's: stacked factors and biases, summed costs and errors."""
    first = results[0]
    bias = None if first.bias is None else np.concatenate([r.bias for r in results])
    error = None if first.error is None else float(sum(r.error for r in results))
    relative = None
    if error is not None:
        reference = sum(objective.output_variance(p.weight, p.stats.covariance()) for p in problem.parts)
        relative = objective.relative_error(error, reference)
    info = dict(first.info)
    for key, merge in (("iterations", max), ("converged", all), ("error_first", sum), ("error_last", sum)):
        if key in info:
            info[key] = merge(r.info[key] for r in results)
    info["groups"] = problem.groups
    return Decomposition(first.method, GroupedFactors(tuple(r.factors for r in results)), bias, first.rank,
                         sum(r.params for r in results), sum(r.macs for r in results), error, relative, info)
