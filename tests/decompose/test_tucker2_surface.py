"""The Tucker-2 proxy surface: every pair's output-step error from one factorisation per basis (seeded)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.decompose.tucker2 import tucker2, tucker2_cost
from onnxcomp.decompose.tucker2.als import sweep_from
from onnxcomp.decompose.tucker2.problem import Tucker2Problem
from onnxcomp.decompose.tucker2.surface import ProxySurface

from realistic_stats import decaying_conv_weight, im2col_stats, realistic_activations, realistic_patch_covariance


def singular_stats(c_in, kh, kw, seed, dead):
    """S of 64 patches for d = c_in*kh*kw > 64 (rank-deficient), with dead (always-zero) channels."""
    acts = realistic_activations(c_in, seed, n_images=4, size=4)
    acts[:, list(dead)] = 0.0
    rows, total, gram = im2col_stats(acts, kh, kw)
    mean = total / rows
    return gram / rows - np.outer(mean, mean)


def layer(shape, seed):
    c_out, c_in, kh, kw = shape
    return decaying_conv_weight(c_out, c_in, kh, kw, seed), realistic_patch_covariance(c_in, kh, kw, seed + 100)[0]


@pytest.mark.parametrize("shape", [(12, 10, 3, 3), (8, 14, 3, 3), (10, 6, 3, 1)])
def test_every_pair_is_the_output_step_of_its_basis(shape):
    """The dense reference: for every (R_out, R_in), the solver's exact output step from each basis's
    first R_in columns. The surface gives the best of them, and the basis it names reaches it."""
    w, s = layer(shape, 3)
    surface = ProxySurface(w, s)
    prob = Tucker2Problem(w, s)
    c_out, c_in = shape[:2]
    assert len(surface.bases) == 2
    for r_in in range(1, c_in + 1):
        for r_out in range(1, c_out + 1):
            exact = [prob.output_step(np.ascontiguousarray(u[:, :r_in]), r_out)[2] for u in surface.bases]
            scale = prob.reference
            # the ridge on P^T S P (1e-10 of its diagonal) can only raise the score, by a hair:
            # an upper bound of what the solver starts at, as a share of the output variance
            score = surface.error(r_out, r_in)
            assert min(exact) - 1e-12 * scale <= score <= min(exact) + 1e-8 * scale
            reached = prob.output_step(surface.start(r_out, r_in), r_out)[2]
            assert reached == pytest.approx(min(exact), rel=1e-9, abs=1e-12 * scale)


def test_best_pair_is_the_exhaustive_minimum_under_the_budget():
    """Against scoring every pair on the grid of multiples that fits the budget directly."""
    shape, multiple = (16, 24, 3, 3), 2
    w, s = layer(shape, 5)
    surface = ProxySurface(w, s)
    prob = Tucker2Problem(w, s)
    dense = float(np.prod(shape))
    for fraction in (0.1, 0.3, 0.6):
        for in_positions in (1.0, 4.0):
            budget = fraction * dense
            pairs = [(r_out, r_in) for r_out in range(multiple, shape[0] + 1, multiple)
                     for r_in in range(multiple, shape[1] + 1, multiple)
                     if tucker2_cost(*shape, r_out, r_in, in_positions=in_positions).macs <= budget]
            errors = {p: min(prob.output_step(np.ascontiguousarray(u[:, :p[1]]), p[0])[2] for u in surface.bases)
                      for p in pairs}
            r_out, r_in, cost, error = surface.best(budget, in_positions=in_positions, multiple=multiple)
            assert cost <= budget and r_out % multiple == 0 and r_in % multiple == 0
            assert error == pytest.approx(min(errors.values()), abs=1e-8 * prob.reference)


def test_sweeps_from_the_surface_land_near_the_converged_solve():
    """One sweep from the proxy's basis: at most the proxy, and within 15% of the solver's converged
    error at that pair (the proxy alone: up to 38% on these layers); the solver continuing from the
    swept basis ends at or below it and equals a cold-started solve to 1%."""
    gaps = []
    for shape, seed in [((24, 16, 3, 3), 0), ((16, 32, 3, 3), 1)]:
        w, s = layer(shape, seed)
        surface = ProxySurface(w, s)
        pairs = [surface.best(f * np.prod(shape), multiple=1)[:2] for f in (0.1, 0.3, 0.5, 0.8)]
        for (r_out, r_in), (u, err) in zip(pairs, surface.swept(pairs, 1)):
            assert err <= surface.error(r_out, r_in) * (1 + 1e-9)
            warm = tucker2(w, s, (r_out, r_in), init=u, tol=1e-8, max_iter=500)
            cold = tucker2(w, s, (r_out, r_in), tol=1e-8, max_iter=500)
            assert warm.error <= err * (1 + 1e-9)
            assert warm.error == pytest.approx(cold.error, rel=0.01)
            gaps.append(err / warm.error - 1)
    assert 0 <= min(gaps) and max(gaps) <= 0.15 and np.median(gaps) <= 0.02, gaps


def test_sweeps_after_release_rebuild_the_same_problem():
    w, s = layer((12, 10, 3, 3), 7)
    surface = ProxySurface(w, s)
    pairs = [(6, 5), (9, 3)]
    first = surface.swept(pairs, 1)
    again = ProxySurface(w, s)
    again.release()
    second = again.swept(pairs, 1, fit=lambda: s)
    for (u1, e1), (u2, e2) in zip(first, second):
        assert e1 == pytest.approx(e2, rel=1e-12) and np.allclose(u1, u2)
    prob = Tucker2Problem(w, s, check_psd=False)
    u, err = sweep_from(prob, surface.start(6, 5), 6, 1)
    assert err == pytest.approx(first[0][1], rel=1e-12)


def test_singular_statistics_and_the_frobenius_norm():
    """Dead channels and fewer patches than dimensions (S singular): the ridge keeps the Cholesky
    factor, and the scores stay finite upper bounds of the exact output steps. Without S the
    surface scores the Frobenius error."""
    shape = (10, 8, 3, 3)
    w = decaying_conv_weight(*shape, 2)
    s = singular_stats(8, 3, 3, 4, dead=(0, 3))
    assert np.linalg.matrix_rank(s) < 8 * 9 - 18
    surface = ProxySurface(w, s)
    prob = Tucker2Problem(w, s)
    for r_out, r_in in [(3, 2), (7, 6), (10, 8)]:
        score = surface.error(r_out, r_in)
        exact = prob.output_step(surface.start(r_out, r_in), r_out)[2]
        assert np.isfinite(score) and score >= exact - 1e-12 * prob.reference
        assert score <= exact + 1e-8 * prob.reference
    frobenius = ProxySurface(w, None)
    eye = Tucker2Problem(w, np.eye(8 * 9))
    assert frobenius.reference == pytest.approx(float(np.sum(w * w)))
    assert frobenius.error(4, 3) == pytest.approx(eye.output_step(frobenius.start(4, 3), 4)[2], rel=1e-8)


def test_best_pair_beyond_the_first_pass_grid():
    """Any rank on a 64-channel input: more R_in than one pass scores (``GRID``); the spread and the
    values between the best one's neighbours find the exhaustive minimum here."""
    shape = (40, 64, 3, 3)
    w, s = layer(shape, 1)
    surface = ProxySurface(w, s)
    budgets = [fraction * np.prod(shape) for fraction in (0.1, 0.25, 0.5, 0.8)]
    best = [surface.best(budget)[3] for budget in budgets]
    assert len(surface._errors) < 64  # not every R_in was scored
    for budget, error in zip(budgets, best):
        exhaustive = min(
            surface.error(max(r for r in range(1, 41) if tucker2_cost(*shape, r, r_in).macs <= budget), r_in)
            for r_in in range(1, 65) if tucker2_cost(*shape, 1, r_in).macs <= budget)
        assert error == pytest.approx(exhaustive, rel=1e-12)
