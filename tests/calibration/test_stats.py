"""Statistics sums: merging must not alias the inputs."""

import numpy as np

from onnxcomp.calibration.stats import InputStats, Statistics


def test_merged_statistics_do_not_share_arrays_with_inputs():
    rng = np.random.default_rng(0)
    a, b = InputStats.empty(3), InputStats.empty(3)
    a.add_rows(rng.standard_normal((10, 3)), 10)
    b.add_rows(rng.standard_normal((5, 3)), 5)
    left, right = Statistics({"x": a}), Statistics({"y": b})
    merged = left.merged(right)
    before = a.gram.copy(), b.gram.copy()
    merged["x"].add_rows(np.ones((4, 3)), 4)
    merged["y"].add_rows(np.ones((4, 3)), 4)
    np.testing.assert_array_equal(a.gram, before[0])
    np.testing.assert_array_equal(b.gram, before[1])
    assert merged["x"].rows == 14 and a.rows == 10
