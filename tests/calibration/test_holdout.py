"""The validation split: strided, disjoint from the statistics, in-sample only when there are too few samples."""

import numpy as np

from onnxcomp.calibration.holdout import held_out_count, split_validation, validation_besides_stats


def _batches(total, size=7):
    x = np.arange(total, dtype=np.float32).reshape(total, 1)
    return iter([{"x": x[i:i + size]} for i in range(0, total, size)])


def test_every_kth_sample_is_held_out_and_never_streamed():
    validation, rest = split_validation(_batches(100), total=100)
    streamed = np.concatenate([b["x"][:, 0] for b in rest])
    held = validation.feed["x"][:, 0]
    assert held_out_count(100) == 10 and held.tolist() == list(range(0, 100, 10))
    assert sorted(np.concatenate([streamed, held]).tolist()) == list(range(100))  # disjoint, complete
    assert validation.held_out and validation.source == "10 calibration samples held out of the statistics"


def test_bounds_and_unknown_lengths():
    assert held_out_count(15) == 0 and held_out_count(16) == 8 and held_out_count(10_000) == 64
    validation, rest = split_validation(_batches(35), total=None)  # a reader that cannot tell: every 10th
    assert sum(len(b["x"]) for b in rest) == 31 and validation.feed["x"][:, 0].tolist() == [0, 10, 20, 30]


def test_too_few_samples_are_judged_in_sample_and_say_so():
    validation, rest = split_validation(_batches(5, size=2), total=5)
    assert sum(len(b["x"]) for b in rest) == 5  # everything goes into the statistics
    assert not validation.held_out and validation.samples == 5 and "themselves" in validation.source


def test_data_besides_precomputed_statistics():
    validation = validation_besides_stats(_batches(200))
    assert validation.samples == 64 and validation.feed["x"][:3, 0].tolist() == [0, 1, 2]
