"""--max-drop: the smallest budget whose judged loss stays within the drop; a user's metric judges too."""

import numpy as np
import pytest

import onnxcomp
from onnxcomp.budget.search import STEP
from onnxcomp.errors import OnnxcompError
from onnxcomp.runtime import make_session

from models import EXAMPLE


@pytest.fixture(scope="module")
def digits():
    model = onnxcomp.load_model(EXAMPLE / "digits_cnn.onnx")
    return model, np.load(EXAMPLE / "calib.npz")["input"], np.load(EXAMPLE / "heldout.npz")


def test_smallest_fraction_within_the_drop(digits):
    model, calibration, _ = digits
    compressed, report = onnxcomp.compress(model, calibration, max_drop=0.02, progress=False)
    search = report.settings["target"]["search"]
    trials = {t["fraction"]: t["loss"] for t in search["trials"]}
    assert trials[search["fraction"]] <= 0.02
    assert report.fidelity.standardized == pytest.approx(trials[search["fraction"]], rel=1e-6)
    # within one step of the smallest that meets it: the largest failing fraction tried is one step below
    failing = [f for f, loss in trials.items() if loss > 0.02]
    assert failing and search["fraction"] - max(failing) <= STEP
    assert report.totals["macs_after"] < 0.3 * report.totals["macs_before"]  # measured: 17.5%


def test_a_users_metric_decides(digits):
    """fn(session) -> float, higher is better: here held-out accuracy with the user's labels."""
    model, calibration, held_out = digits

    def accuracy(session):
        logits = session.run(None, {"input": held_out["input"]})[0]
        return float(np.mean(logits.argmax(1) == held_out["labels"]))

    compressed, report = onnxcomp.compress(model, calibration, max_drop=0.01, metric=accuracy, progress=False)
    metric = report.settings["scores"]
    assert report.settings["metric"] == "accuracy"
    assert metric["original"] == pytest.approx(accuracy(make_session(model)))
    assert metric["compressed"] == pytest.approx(accuracy(make_session(compressed)))
    assert metric["original"] - metric["compressed"] <= 0.01
    assert report.totals["macs_after"] < 0.5 * report.totals["macs_before"]


def test_max_drop_needs_data_and_excludes_a_fraction(digits):
    model, _, _ = digits
    with pytest.raises(OnnxcompError, match="--max-drop needs data"):
        onnxcomp.compress(model, max_drop=0.1, norm="frobenius", progress=False)
    with pytest.raises(OnnxcompError, match="give one budget"):
        onnxcomp.compress(model, max_drop=0.1, target_macs=0.5, progress=False)
