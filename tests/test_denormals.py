"""A model with dead channels (subnormal weights, as Paddle exports hold): onnxcomp writes no subnormal
value, computes the same outputs, and --flush-denormals clears the layers it leaves alone."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxcomp
from onnxcomp.cli import main

from checks import assert_same_outputs

DEAD = """
<ir_version: 8, opset_import: ["" : 17]>
net (T[N, 8, 10, 10] x) => (T[N, 16, 10, 10] y) {
    h = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r = Relu (h)
    y = Conv (r, w2, b2)
}
"""


def subnormals(array) -> int:
    """NumPy's definition: non-zero and below the smallest normal number of the array's dtype."""
    magnitude = np.abs(array.astype(np.float64))
    return int(((magnitude > 0) & (magnitude < np.finfo(array.dtype).smallest_normal)).sum())


def initializer_subnormals(model) -> dict[str, int]:
    return {t.name: subnormals(numpy_helper.to_array(t)) for t in model.graph.initializer}


def dead_channel_model(dtype=np.float32, dead=1e-39, seed=0):
    """conv1 (16x8x3x3) has rank 4 and its first 4 output channels dead (weights ~``dead``, subnormal in
    ``dtype``); the 1x1 conv2 reads those dead channels with subnormal weights of its own."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((16, 4)) @ rng.standard_normal((4, 72))) / 8
    w1[:4] *= dead
    w2 = rng.standard_normal((16, 16)) / 4
    w2[:, :4] *= dead
    model = onnx.parser.parse_model(DEAD.replace("T[", "float16[" if dtype == np.float16 else "float["))
    weights = {"w1": w1.reshape(16, 8, 3, 3), "b1": rng.standard_normal(16) / 10, "w2": w2.reshape(16, 16, 1, 1),
               "b2": rng.standard_normal(16) / 10}
    model.graph.initializer.extend(numpy_helper.from_array(v.astype(dtype), k) for k, v in weights.items())
    onnx.checker.check_model(model, full_check=True)
    data = np.random.default_rng(seed + 1).standard_normal((48, 8, 10, 10)).astype(dtype)
    return model, data


def test_factors_hold_no_subnormals_and_the_outputs_are_the_same():
    model, data = dead_channel_model()
    before = initializer_subnormals(model)
    assert before["w1"] > 0 and before["w2"] > 0
    # The premise: the output basis of conv1's weight (what the SVD's second factor holds) has components
    # for the dead channels that are subnormal in float32.
    w1 = numpy_helper.to_array(model.graph.initializer[0]).reshape(16, -1).astype(np.float64)
    basis = np.linalg.eigh(w1 @ w1.T)[1][:, -4:]
    assert subnormals(basis.astype(np.float32)) > 0

    compressed, report = onnxcomp.compress(model, data, rank=4, skip=["Conv_2"], progress=False,
                                           check_latency=False)
    after = initializer_subnormals(compressed)
    assert after.pop("w2") == before["w2"]  # conv2 is left alone, and so are its weights (no --flush-denormals)
    assert set(after) >= {"Conv_0/first_weight", "Conv_0/second_weight", "Conv_0/bias"}
    assert sum(after.values()) == 0  # nothing onnxcomp wrote is subnormal
    assert report.totals["denormals"] == {"original": {"values": before["w1"] + before["w2"], "tensors": 2},
                                          "compressed": {"values": before["w2"], "tensors": 1}, "flushed": None}
    assert_same_outputs(model, compressed, {"x": data[:8]}, rtol=1e-4, atol=1e-5, scale_atol=True)
    assert "--flush-denormals sets them to 0" in report.table()


def test_flush_denormals_clears_the_layers_left_alone(tmp_path, capsys):
    model, data = dead_channel_model()
    before = initializer_subnormals(model)
    compressed, report = onnxcomp.compress(model, data, rank=4, skip=["Conv_2"], flush_denormals=True,
                                           progress=False, check_latency=False)
    assert sum(initializer_subnormals(compressed).values()) == 0
    assert report.totals["denormals"]["flushed"] == {"values": before["w2"], "tensors": 1}
    assert report.settings["flush_denormals"] is True
    kept, _ = onnxcomp.compress(model, data, rank=4, skip=["Conv_2"], progress=False, check_latency=False)
    assert_same_outputs(kept, compressed, {"x": data[:8]}, rtol=1e-6, atol=1e-7, scale_atol=True)
    # the command line: the option, and the report's line
    source, out = tmp_path / "dead.onnx", tmp_path / "small.onnx"
    onnx.save(model, source)
    np.save(tmp_path / "data.npy", data)
    assert main(["compress", str(source), str(out), "--data", str(tmp_path / "data.npy"), "--rank", "4",
                 "--skip", "Conv_2", "--flush-denormals", "--no-latency-check", "--quiet"]) == 0
    stdout = capsys.readouterr().out
    assert f"--flush-denormals set {before['w2']} in the layers left alone to 0" in stdout
    assert sum(initializer_subnormals(onnxcomp.load_model(out)).values()) == 0


def test_float16_factors_hold_no_float16_subnormals():
    """float16's subnormals start at 6.1e-5: dead channels at 1e-6 give factor entries below that."""
    model, data = dead_channel_model(np.float16, dead=1e-6)
    assert initializer_subnormals(model)["w1"] > 0
    compressed, _ = onnxcomp.compress(model, data, rank=4, skip=["Conv_2"], progress=False, check_latency=False)
    written = {name: count for name, count in initializer_subnormals(compressed).items() if name != "w2"}
    assert len(written) >= 4 and sum(written.values()) == 0
    assert_same_outputs(model, compressed, {"x": data[:8]}, rtol=2e-2, atol=2e-2, scale_atol=True)


@pytest.mark.parametrize("method", ["tucker2", "cp"])
def test_every_method_writes_no_subnormals(method):
    model, data = dead_channel_model()
    compressed, _ = onnxcomp.compress(model, data, method=method, keep=0.6, skip=["Conv_2"], progress=False,
                                      check_latency=False)
    written = {name: count for name, count in initializer_subnormals(compressed).items() if name != "w2"}
    assert len(written) >= 4 and sum(written.values()) == 0
