"""Each layer's error-versus-cost curve: the points a whole-model budget chooses from.

SVD curves are exact and dense (every cheaper rank, from one eigendecomposition).
Tucker-2 and CP curves are coarse (a few MAC fractions) and scored by an upper
bound of the solver's error, because solving each point costs a full ALS; the
budget asks them for more points where its spare cost reaches (``REFINABLE``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config import CPForm, DefaultMultiple, Method, SolveConfig
from ..decompose.cp import cp_cost, cp_decompose, cp_rank_for_fraction
from ..decompose.solve import LayerProblem
from ..decompose.tucker2 import tucker2_cost
from ..decompose.tucker2.surface import best_summed
from ..errors import OnnxcompError


@dataclass(frozen=True)
class Candidate:
    """One point of a layer's error-versus-cost curve, for the budget allocation."""

    method: Method
    rank: tuple[int, ...]
    params: int  # weights of the chain
    macs: float  # multiply-adds of the chain per output position
    error: float  # squared output error relative to the output variance
    form: CPForm | None = None  # CP: "4way" or "3way" (the chain it rewrites into)
    # Factors the final solve at this point continues from (CP: so its error stays at or below
    # this score); not part of the point's identity.
    start: object = field(default=None, compare=False, repr=False)


def svd_candidates(problem: LayerProblem, solve: SolveConfig, xp, multiple: int | None = None,
                   most: int = 128) -> list[Candidate]:
    """Every cheaper rank (or ``most`` of them, evenly spread) with its exact error, from one spectrum
    (a grouped conv: one per group, all groups at the rank, their errors and costs summed)."""
    parts, groups = _parts(problem), problem.groups
    m, d = parts[0].weight.shape
    spectra = [part.spectrum(solve, xp).values for part in parts]
    total = float(sum(values.sum() for values in spectra))
    tails = sum(np.concatenate([np.cumsum(values[::-1])[::-1], [0.0]]) for values in spectra)
    largest = cheaper_rank_limit(m, d)
    cost = groups * (m + d)
    return [Candidate(Method.SVD, (r,), r * cost, r * cost, float(tails[r] / total) if total > 0 else 0.0)
            for r in candidate_ranks(largest, most, multiple)]


def _parts(problem: LayerProblem) -> tuple[LayerProblem, ...]:
    """The problems a curve sums: a grouped conv's groups (:mod:`onnxcomp.decompose.grouped`), else the layer."""
    return problem.parts or (problem,)


def _start(starts: list):
    """A candidate's start: the layer's, or the list of its groups'."""
    return starts[0] if len(starts) == 1 else starts


def cheaper_rank_limit(m: int, d: int) -> int:
    """The largest rank r of an m x d matrix whose two factors, r (m + d), are cheaper than it."""
    return (m * d - 1) // (m + d)


def layer_rank_limit(layer) -> int:
    """:func:`cheaper_rank_limit` of a layer's matrix (one group's, for a grouped conv)."""
    return cheaper_rank_limit(layer.out_features // layer.groups, layer.in_features)


def candidate_ranks(largest: int, most: int, multiple: int | None = None) -> list[int]:
    """Up to ``most`` ranks in [1, largest], evenly spread; with ``multiple``, only its multiples.
    A multiple the user asked for is kept everywhere: a layer without one below ``largest`` has no
    candidate (it stays dense). The default multiple (:class:`DefaultMultiple`) gives way to every
    rank where fewer than ``MIN_MULTIPLES`` fit: a small layer has too few fast ranks to choose from
    (the digits CNN's 32-channel conv: 8, 16 or 24), and that coarse choice cost more accuracy than
    the rounding saved time."""
    if largest < 1:
        return []
    default = isinstance(multiple, DefaultMultiple)
    if multiple and largest // multiple >= (MIN_MULTIPLES if default else 1):
        steps = np.arange(1, largest // multiple + 1)
        picked = np.unique(np.linspace(0, len(steps) - 1, num=min(most, len(steps))).round().astype(int))
        return [int(steps[i] * multiple) for i in picked]
    if multiple and multiple > 1 and not default:
        return []
    return [int(r) for r in np.unique(np.linspace(1, largest, num=min(most, largest)).round().astype(int))]


def rank_multiple_warnings(multiple: int | None, layers) -> list[str]:
    """A multiple the user asked for that some layers cannot use (they stay dense), said before any
    work; one that no layer can use is an error."""
    if not multiple or multiple == 1 or isinstance(multiple, DefaultMultiple):
        return []
    limits = {layer.name: layer_rank_limit(layer) for layer in layers}
    too_small = [name for name, limit in limits.items() if limit < multiple]
    if too_small and len(too_small) == len(limits):
        raise OnnxcompError(f"--rank-multiple {multiple}: no layer has a rank at a multiple of {multiple} that is "
                            f"cheaper than the layer (the largest such rank here is {max(limits.values())}): give a "
                            "smaller multiple")
    if not too_small:
        return []
    name = too_small[0]
    return [f"--rank-multiple {multiple}: {len(too_small)} layer(s) have no cheaper rank at a multiple of "
            f"{multiple} and stay dense (e.g. {name!r}: ranks up to {limits[name]} are cheaper than it)"]


# With fewer multiples of the default rank multiple than this below a layer's largest useful rank,
# its candidates take every rank.
MIN_MULTIPLES = 4


TUCKER2_FRACTIONS = (0.08, 0.15, 0.25, 0.35, 0.5, 0.65, 0.8)
# ALS sweeps each Tucker-2 candidate gets from its proxy's basis (benchmarks/tucker2_curve.py: the
# proxy alone is 15% above the converged error in the median on the YOLOv8n-shaped model, up to 2x;
# after one sweep 4%, and the allocations match those of converged curves).
TUCKER2_CANDIDATE_SWEEPS = 1


def tucker2_candidates(problem: LayerProblem, solve: SolveConfig, xp, multiple: int | None = None,
                       fractions=TUCKER2_FRACTIONS) -> list[Candidate]:
    """A coarse curve: at each of a few MAC fractions the pair with the smallest proxy error out of
    every pair on the rank grid that fits, scored after ``TUCKER2_CANDIDATE_SWEEPS`` ALS sweeps.

    The proxy (:class:`~..decompose.tucker2.surface.ProxySurface`) is the error of the solver's
    data-aware initial bases after one exact output step, for all pairs at once from two
    factorisations. The sweeps start from the proxy's basis; the candidate's ``start`` is the basis
    they reach, and the final solve at a chosen pair continues from it, so the score is an upper
    bound of the final error (under the data norm) and no sweep is spent twice.
    """
    if problem.pointwise:
        return svd_candidates(problem, solve, xp, multiple)
    parts = _parts(problem)
    W = parts[0].conv_weight()
    surfaces = [part.tucker2_surface(solve, xp) for part in parts]
    dense = float(W.size)
    pairs = []
    for fraction in fractions:
        best = best_summed(surfaces, fraction * dense, measure="macs", in_positions=problem.input_ratio,
                           multiple=multiple or 1)
        if best is not None and best[2] < dense and best[:2] not in pairs:
            pairs.append(best[:2])
    scores = [surface.swept(pairs, TUCKER2_CANDIDATE_SWEEPS, fit=lambda part=part: part.fit_matrix(solve))
              for surface, part in zip(surfaces, parts)]
    reference = sum(surface.reference for surface in surfaces)
    for surface in surfaces:
        surface.release()
    out = []
    for i, (r_out, r_in) in enumerate(pairs):
        cost = tucker2_cost(*W.shape, r_out, r_in, in_positions=problem.input_ratio)
        error = sum(group[i][1] for group in scores)
        relative = error / reference if reference > 0 else 0.0
        out.append(Candidate(Method.TUCKER2, (r_out, r_in), problem.groups * cost.params,
                             problem.groups * cost.macs, relative, start=_start([group[i][0] for group in scores])))
    return out


CP_FRACTIONS = TUCKER2_FRACTIONS
CP_CANDIDATE_SWEEPS = 2


def cp_candidates(problem: LayerProblem, solve: SolveConfig, xp, multiple: int | None = None,
                  fractions=CP_FRACTIONS) -> list[Candidate]:
    """A coarse curve: the CP rank that fits each of a few MAC fractions, scored by the error after
    the solver's initialisation and ``CP_CANDIDATE_SWEEPS`` ALS sweeps.

    That score is an upper bound of the final error at the rank: every block step of the data-norm
    ALS is checked and reverted if it would raise the error, so more sweeps never raise it, and the
    solve at the chosen rank continues from these very factors (the candidate's ``start``). Under the
    Frobenius norm the final solve restarts from the same seeded initialisation, so its first sweeps
    are these (plain CP-ALS is monotone up to its tiny ridge). 1x1 convs and Gemm/MatMul are matrices:
    their CP is the SVD, with its exact curve.
    """
    if problem.pointwise:
        return svd_candidates(problem, solve, xp, multiple)
    form, out = solve.cp_form, []
    if form == "4way" and len(problem.kernel) != 2:
        return []  # no 4-way chain for a 1-D or 3-D kernel: the layer stays dense (cp_form_reason)
    parts = _parts(problem)
    W = parts[0].conv_weight()
    for rank in _cp_candidate_ranks(W.shape, form, problem.input_ratio, multiple, fractions):
        results = [cp_decompose(part.conv_weight(), part.fit_matrix(solve), rank, form=form, norm=solve.norm,
                                max_iter=CP_CANDIDATE_SWEEPS, xp=xp) for part in parts]
        cost = cp_cost(*W.shape, rank, form, in_positions=problem.input_ratio)
        reference = sum(result.reference for result in results)
        error = sum(result.error for result in results) / reference if reference > 0 else 0.0
        out.append(Candidate(Method.CP, (rank,), problem.groups * cost.params, problem.groups * cost.macs, error,
                             form=form, start=_start(results)))
    return out


def _cp_candidate_ranks(shape, form: str, input_ratio: float, multiple: int | None = None,
                        fractions=CP_FRACTIONS) -> list[int]:
    """The distinct ranks that fit ``fractions`` of the dense MACs (rank 1 only if it is cheaper),
    rounded down to multiples of ``multiple`` where at least one fits (as :func:`candidate_ranks`)."""
    dense = int(np.prod(shape))
    ranks_ = {cp_rank_for_fraction(*shape, f, form=form, measure="macs", in_positions=input_ratio) for f in fractions}
    if multiple and max(ranks_) >= multiple:
        ranks_ = {r // multiple * multiple for r in ranks_ if r >= multiple}
    elif multiple and multiple > 1 and not isinstance(multiple, DefaultMultiple):
        return []  # an asked multiple is kept everywhere (see candidate_ranks)
    return sorted(r for r in ranks_ if cp_cost(*shape, r, form, in_positions=input_ratio).macs < dense)


def best_candidates(problem: LayerProblem, solve: SolveConfig, xp, multiple: int | None = None) -> list[Candidate]:
    """Both methods' curves: the budget then picks the method per layer too."""
    return svd_candidates(problem, solve, xp, multiple) + tucker2_candidates(problem, solve, xp, multiple)


# CP is not part of "auto": its candidate curves cost about 7x Tucker-2's and its solves about 10x
# (docs/RESULTS.md, "CP vs Tucker-2 vs SVD"), and its depthwise chains often run slower than Tucker-2's.
CURVES = {Method.SVD: svd_candidates, Method.TUCKER2: tucker2_candidates, Method.CP: cp_candidates,
          Method.AUTO: best_candidates}
# Curves sampled at a few fractions; the budget asks them for more points where its spare cost reaches.
REFINABLE = {Method.TUCKER2: tucker2_candidates, Method.CP: cp_candidates}
