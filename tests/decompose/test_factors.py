"""The factor formats: reconstructions against direct sums, sizes, and what they accept."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.decompose.factors import CPFactors, LowRank, Tucker2Factors

RNG = np.random.default_rng(0)


def test_lowrank_is_second_times_first():
    first, second = RNG.standard_normal((3, 10)), RNG.standard_normal((7, 3))
    f = LowRank(first, second)
    np.testing.assert_allclose(f.matrix(), second @ first, rtol=1e-15)
    assert f.rank == 3 and f.params == 30 + 21


def test_tucker2_weight_is_the_mode_products():
    u_out, core, u_in = RNG.standard_normal((6, 3)), RNG.standard_normal((3, 2, 3, 1)), RNG.standard_normal((5, 2))
    f = Tucker2Factors(u_out, core, u_in)
    expected = np.zeros((6, 5, 3, 1))
    for o, c, a, b in np.ndindex(6, 5, 3, 2):
        expected[o, c] += u_out[o, a] * core[a, b] * u_in[c, b]
    np.testing.assert_allclose(f.weight(), expected, rtol=1e-12, atol=1e-14)
    assert f.ranks == (3, 2) and f.params == 18 + 18 + 10


def test_cp_weight_is_the_sum_of_components():
    a, b, h, v = (RNG.standard_normal((n, 4)) for n in (6, 5, 3, 2))
    four = CPFactors("4way", a, b, h=h, v=v)
    expected = sum(np.multiply.outer(np.multiply.outer(np.outer(a[:, r], b[:, r]), h[:, r]), v[:, r])
                   for r in range(4))
    np.testing.assert_allclose(four.weight(), expected, rtol=1e-12, atol=1e-14)
    assert four.rank == 4 and four.params == 4 * (6 + 5 + 3 + 2)
    kernel = RNG.standard_normal((4, 3, 2))
    three = CPFactors("3way", a, b, kernel=kernel)
    expected = sum(np.multiply.outer(np.outer(a[:, r], b[:, r]), kernel[r]) for r in range(4))
    np.testing.assert_allclose(three.weight(), expected, rtol=1e-12, atol=1e-14)
    assert three.params == 4 * (6 + 5) + 4 * 6


def test_factors_are_host_arrays_of_a_known_form():
    a, b = RNG.standard_normal((6, 2)), RNG.standard_normal((5, 2))
    with pytest.raises(ValueError, match="form"):
        CPFactors("4way", a, b, kernel=RNG.standard_normal((2, 3, 3)))
    with pytest.raises(ValueError, match="form"):
        CPFactors("2way", a, b)
    with pytest.raises(TypeError, match="host NumPy"):
        LowRank(a.T, [[1.0, 2.0]])

