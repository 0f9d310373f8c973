"""Data-aware SVD against independent references: dense evaluation of the objective."""

import numpy as np
import pytest

from onnxcomp.calibration.stats import InputStats
from onnxcomp.config import RankChoice, SolveConfig
from onnxcomp.decompose import ranks
from onnxcomp.decompose.solve import LayerProblem, solve_layer
from onnxcomp.decompose.svd import output_spectrum, truncate
from onnxcomp.errors import OnnxcompError


def random_psd(d, rank, rng):
    factor = rng.standard_normal((d, rank)) * np.linspace(3, 0.1, rank)
    return factor @ factor.T


def data_error(W, approx, S):
    delta = W - approx
    return np.trace(delta @ S @ delta.T)


@pytest.mark.parametrize("shape", [(12, 30), (30, 12)])
@pytest.mark.parametrize("s_rank", [30, 7])  # full rank and singular covariance
def test_error_is_sum_of_discarded_eigenvalues(shape, s_rank):
    rng = np.random.default_rng(0)
    m, d = shape
    W = rng.standard_normal((m, d))
    S = random_psd(d, min(s_rank, d), rng)
    spectrum = output_spectrum(W, S)
    reference = np.sort(np.linalg.eigvalsh(W @ S @ W.T))[::-1]
    k = min(m, d)
    np.testing.assert_allclose(spectrum.values[: len(reference)][:k], np.clip(reference, 0, None)[:k], rtol=1e-9,
                               atol=1e-9 * reference[0])
    for rank in (1, 3, 6):
        factors = truncate(W, spectrum, rank)
        measured = data_error(W, factors.matrix(), S)
        assert measured == pytest.approx(spectrum.error(rank), rel=1e-9, abs=1e-9 * reference[0])


@pytest.mark.parametrize("s_rank", [40, 9])
def test_data_aware_beats_frobenius_and_perturbations(s_rank):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((24, 40))
    S = random_psd(40, s_rank, rng)
    rank = 5
    best = truncate(W, output_spectrum(W, S), rank)
    frob = truncate(W, output_spectrum(W, None), rank)
    best_error = data_error(W, best.matrix(), S)
    assert best_error < data_error(W, frob.matrix(), S)
    for _trial in range(20):  # any other rank-5 matrix near the optimum is worse
        first = best.first + 1e-3 * rng.standard_normal(best.first.shape)
        second = best.second + 1e-3 * rng.standard_normal(best.second.shape)
        assert data_error(W, second @ first, S) >= best_error - 1e-12


def test_frobenius_spectrum_matches_numpy_svd():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((20, 35))
    s = np.linalg.svd(W, compute_uv=False)
    np.testing.assert_allclose(output_spectrum(W, None).values, s**2, rtol=1e-10)


def stats_from_rows(rows):
    stats = InputStats.empty(rows.shape[1])
    stats.add_rows(rows, samples=len(rows))
    return stats


def test_bias_correction_removes_the_mean_shift():
    rng = np.random.default_rng(3)
    rows = np.maximum(rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16)) + 1.0, 0)
    W, b = rng.standard_normal((10, 16)), rng.standard_normal(10)
    problem = LayerProblem("fc", W, b, (1, 1), stats_from_rows(rows))
    result = solve_layer(problem, SolveConfig(ranks=RankChoice(rank=3)))
    approx = result.factors.matrix()
    # Mean output over the data is unchanged (exactly, by construction).
    np.testing.assert_allclose((rows @ approx.T + result.bias).mean(0), (rows @ W.T + b).mean(0), atol=1e-10)
    # The reported error is the mean squared output change on these very rows.
    change = rows @ (W - approx).T - (result.bias - b)
    assert result.error == pytest.approx((change**2).sum(1).mean(), rel=1e-9)
    # Uncentered fit without correction is never better.
    uncentered = solve_layer(problem, SolveConfig(centered=False, ranks=RankChoice(rank=3)))
    assert uncentered.error >= result.error - 1e-12


def test_rank_rules():
    values = np.array([8.0, 4.0, 2.0, 1.0, 1.0])
    assert ranks.rank_for_threshold(values, 0.5) == 1  # 8/16
    assert ranks.rank_for_threshold(values, 0.76) == 3  # 14/16 >= .76 > 12/16
    assert ranks.rank_for_threshold(values, 1.0) == 5
    s = np.sqrt(values)
    p = s / s.sum()
    h = -p * np.log(p)
    expected = int(np.searchsorted(np.cumsum(h) / h.sum(), 0.6) + 1)
    assert ranks.rank_for_threshold(values, 0.6, "entropy") == expected
    assert ranks.rank_for_fraction(100, 300, 0.5) == 37  # 0.5 * 30000 / 400
    with pytest.raises(OnnxcompError, match="larger than layer"):
        ranks.check_rank(11, 10, 20, "fc")


def test_rank_that_saves_nothing_keeps_the_layer_dense():
    rng = np.random.default_rng(4)
    stats = stats_from_rows(rng.standard_normal((50, 8)))
    problem = LayerProblem("fc", rng.standard_normal((8, 8)), None, (1, 1), stats)
    result = solve_layer(problem, SolveConfig(ranks=RankChoice(rank=4)))
    assert isinstance(result, str) and "not cheaper" in result
