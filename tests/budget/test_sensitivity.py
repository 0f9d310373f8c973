"""The noise probe's gains against a direct NumPy computation, and how many samples it runs."""

import numpy as np
import pytest

import onnxcomp
from onnxcomp.budget import sensitivity
from onnxcomp.budget.sensitivity import layer_sensitivities, probe_samples
from onnxcomp.judge import Judge
from onnxcomp.model import find_layers

from models import build

# Two 1x1 convs, no activation: the output change from noise n at the first conv's output is W2 n.
LINEAR = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 6, 24, 24] x) => (float[N, 5, 24, 24] y) {
    h = Conv <kernel_shape = [1, 1]> (x, w1)
    y = Conv <kernel_shape = [1, 1]> (h, w2)
}
"""
WEIGHTS = {"w1": (8, 6, 1, 1), "w2": (5, 8, 1, 1)}


def _expected_gains(model, images: np.ndarray) -> list[float]:
    """Squared gain of each conv, computed from the weights: noise of std epsilon * s_c on channel c of
    a layer's output moves output channel j by sum_c M[j, c] n_c (M: the rest of the network, here
    W2 or the identity); its standardised error squared, over epsilon^2, is that variance over var(y_j)."""
    w1, w2 = (np.asarray(model_weight(model, name))[:, :, 0, 0].astype(np.float64) for name in ("w1", "w2"))
    x = images.astype(np.float64).transpose(0, 2, 3, 1).reshape(-1, 6)
    h, y = x @ w1.T, x @ w1.T @ w2.T
    gains = []
    for spread, after in ((h.std(axis=0), w2), (y.std(axis=0), np.eye(5))):
        moved = (after**2) @ spread**2  # per output channel: the variance the noise adds, over epsilon^2
        gains.append(float(np.mean(moved / y.var(axis=0))))
    return gains


def model_weight(model, name):
    from onnx import numpy_helper

    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


@pytest.mark.parametrize("samples", [16, 4])
def test_gains_match_a_direct_computation(samples, monkeypatch):
    model = build(LINEAR, seed=3, **WEIGHTS)
    images = np.random.default_rng(1).standard_normal((16, 6, 24, 24)).astype(np.float32)
    layers, _ = find_layers(model, {"x": [1, 6, 24, 24]})
    if samples < 16:  # a model too large for all 16: the probe's budget picks fewer (never below the minimum)
        monkeypatch.setattr(sensitivity, "PROBE_MACS", 1)
    assert probe_samples(layers) == samples
    judge = Judge(model, {"x": images}, "test", held_out=True)
    gains = layer_sensitivities(model, layers, judge)
    assert gains.samples == samples
    # the probe runs the first `samples` validation samples; its noise is random (seeded): within 1.2%
    # here, and the first conv's gain (1.12) is told apart from the last's (1 exactly in expectation)
    np.testing.assert_allclose([gains[layer.name] for layer in layers], _expected_gains(model, images[:samples]),
                               rtol=0.04)


def test_probe_samples_shrink_with_the_model_cost(monkeypatch):
    model = build(LINEAR, **WEIGHTS)
    layers, _ = find_layers(model, {"x": [1, 6, 24, 24]})
    per_pass = len(layers) * sum(layer.macs() for layer in layers)  # 2 x (48 + 40) x 576 multiply-adds
    assert per_pass == 2 * (48 + 40) * 576
    assert probe_samples(layers) == sensitivity.PROBE_SAMPLES  # small model: all of them
    monkeypatch.setattr(sensitivity, "PROBE_MACS", 6.5 * per_pass)
    assert probe_samples(layers) == 6
    monkeypatch.setattr(sensitivity, "PROBE_MACS", 2 * per_pass)
    assert probe_samples(layers) == sensitivity.MIN_PROBE_SAMPLES


def test_the_report_says_how_many_samples_the_probe_ran(monkeypatch):
    model = build(LINEAR, **WEIGHTS)
    images = np.random.default_rng(2).standard_normal((12, 6, 24, 24)).astype(np.float32)
    monkeypatch.setattr(sensitivity, "PROBE_MACS", 1)  # the minimum, below the 12 validation samples
    _, report = onnxcomp.compress(model, images[:4], validation_data=images, target_macs=0.6, progress=False,
                                  check_latency=False)
    assert report.settings["target"]["sensitivity"]["probe_samples"] == sensitivity.MIN_PROBE_SAMPLES


def test_a_fixed_batch_model_is_probed_on_as_many_samples_in_batches_of_its_size():
    fixed = build(LINEAR.replace("float[N, 6, 24, 24] x", "float[1, 6, 24, 24] x")
                        .replace("float[N, 5, 24, 24] y", "float[1, 5, 24, 24] y"), seed=3, **WEIGHTS)
    images = np.random.default_rng(1).standard_normal((16, 6, 24, 24)).astype(np.float32)
    layers, _ = find_layers(fixed, {"x": [1, 6, 24, 24]})
    judge = Judge(fixed, {"x": images}, "test", held_out=True)
    gains = layer_sensitivities(fixed, layers, judge)
    assert gains.samples == 16  # sixteen batches of one, not one sample
    np.testing.assert_allclose([gains[layer.name] for layer in layers], _expected_gains(fixed, images), rtol=0.04)
