"""Budgets on models that once broke the probe: float16 weights, a fixed batch larger than the probe."""

import numpy as np
import onnx
from onnx import numpy_helper

import onnxcomp

from models import build

TWO_CONVS = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 8, 10, 10] x) => (float[N, 16, 10, 10] y) {
    a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r = Relu (a)
    y = Conv <pads = [1, 1, 1, 1]> (r, w2)
}
"""
WEIGHTS = {"w1": (16, 8, 3, 3), "b1": (16,), "w2": (16, 16, 3, 3)}


def _images(n, dtype=np.float32):
    return np.random.default_rng(0).standard_normal((n, 8, 10, 10)).astype(dtype)


def test_float16_model_compresses_under_a_budget():
    model = onnx.parser.parse_model(TWO_CONVS.replace("float[", "float16["))
    rng = np.random.default_rng(0)
    for name, shape in WEIGHTS.items():
        weight = (rng.standard_normal(shape) / 8).astype(np.float16)
        model.graph.initializer.append(numpy_helper.from_array(weight, name))
    compressed, report = onnxcomp.compress(model, _images(64, np.float16), target_macs=0.6, progress=False)
    assert report.totals["macs_after"] <= 0.6 * report.totals["macs_before"]
    assert report.settings["target"]["sensitivity"]["gains"]  # the probe ran on float16 activations
    assert compressed.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert np.isfinite(report.fidelity.standardized)


def test_fixed_batch_larger_than_the_probe_and_a_partial_last_batch():
    """Batch fixed at 16, 40 samples: validation samples leave partial batches, the last batch is partial."""
    fixed = build(TWO_CONVS.replace("[N,", "[16,"), **WEIGHTS)
    dynamic = build(TWO_CONVS, **WEIGHTS)
    images = _images(40)
    _, report = onnxcomp.compress(fixed, images, target_macs=0.6, progress=False)
    assert report.totals["macs_after"] <= 0.6 * report.totals["macs_before"]
    assert report.settings["calibration_samples"] == 40 - 8 and report.fidelity.samples == 8
    # the padded batches count each sample once: the same statistics as the dynamic-batch model's
    # (in float64: float32 products round differently in batches of 16 and of 32)
    with_fixed, with_dynamic = (onnxcomp.calibrate(m, images, progress=False, precision="float64")
                                for m in (fixed, dynamic))
    for key, stats in with_fixed.items():
        assert stats.samples == 40 and stats.rows == with_dynamic[key].rows
        np.testing.assert_allclose(stats.gram, with_dynamic[key].gram, rtol=1e-5, atol=1e-6)
