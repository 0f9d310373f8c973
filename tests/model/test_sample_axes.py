"""Inputs and outputs whose samples are not on axis 0: a state batched on axis 1, a scalar sample rate."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxcomp
from onnxcomp.bench import bench
from onnxcomp.calibration.readers import iter_feeds
from onnxcomp.cli import main
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import find_layers
from onnxcomp.model.prepare import prepare_model
from onnxcomp.model.sample_axes import METADATA_KEY, find_sample_axes
from checks import assert_cli_error, assert_same_outputs

RNG = np.random.default_rng(3)

# A VAD-shaped model: audio features x [N, 8]; a recurrent state [2, N, 4] batched on axis 1; a scalar
# sample rate sr that scales the features; a fixed gain vector beside them.
STATEFUL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[batch, 8] x, float[2, batch, 4] state, int64 sr, float[4] gain) => (float[batch, 4] y, float[2, batch, 4] stateN) {
    h = MatMul(x, W)
    f = Cast<to = 1>(sr)
    s = Div(f, k)
    hs = Mul(h, s)
    st = MatMul(state, V)
    m = ReduceMean<axes = [0], keepdims = 0>(st)
    g1 = Mul(m, gain)
    y = Add(hs, g1)
    stateN = Tanh(st)
}
"""


def _model():
    model = onnx.parser.parse_model(STATEFUL)
    weights = {"W": RNG.standard_normal((8, 4)), "V": RNG.standard_normal((4, 4)), "k": np.array(16000.0)}
    model.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), n) for n, v in weights.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def _data(samples: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((4, 4))  # correlated state features: a low-rank fit has something to keep
    return {"x": rng.standard_normal((samples, 8)).astype(np.float32),
            "state": (rng.standard_normal((2, samples, 4)) @ mix).astype(np.float32),
            "sr": np.array(16000, dtype=np.int64), "gain": np.array([1.0, 0.5, -1.0, 2.0], dtype=np.float32)}


def test_sample_axes_read_from_the_shared_dim_name():
    axes = find_sample_axes(_model())
    assert axes.inputs == {"state": 1, "sr": None, "gain": None}
    assert axes.outputs == {"stateN": 1}


def test_unnamed_dims_the_single_dynamic_axis_and_overrides():
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[?, 8] x, float[2, ?, 4] state) => (float[?, 8] y) { y = Identity(x) }
        """)
    assert find_sample_axes(model).inputs == {"state": 1}
    assert find_sample_axes(model, {"state": 0}).inputs == {}
    assert find_sample_axes(model, {"x": 1}).inputs == {"x": 1, "state": 1}
    for given, message in [({"z": 0}, "no input or output of that name"), ({"state": 3}, "has rank 3"),
                           ({"y": None}, "an output must have a sample axis")]:
        with pytest.raises(OnnxcompError, match=message):
            find_sample_axes(model, given)


def test_the_readers_lay_every_batch_out_with_samples_first(tmp_path):
    data = _data(10, 0)
    working = prepare_model(_model()).model
    path = tmp_path / "calib.npz"
    np.savez(path, **data)
    batches = [data_batch for data_batch in iter_feeds(str(path), working, batch_size=4)]
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
    state = np.concatenate([b["state"] for b in batches])
    np.testing.assert_array_equal(state, np.moveaxis(data["state"], 1, 0))
    assert all((b["sr"] == 16000).all() and b["sr"].shape == b["x"].shape[:1] for b in batches)
    assert all(b["gain"].shape == (b["x"].shape[0], 4) for b in batches)
    # A reader's batches in the model's own layout are laid out the same way.
    feeds = [{**{k: v for k, v in data.items() if k != "state"}, "x": data["x"][:6], "state": data["state"][:, :6]},
             {**data, "x": data["x"][6:], "state": data["state"][:, 6:]}]
    laid = list(iter_feeds(feeds, working))
    np.testing.assert_array_equal(np.concatenate([b["state"] for b in laid]), np.moveaxis(data["state"], 1, 0))


def test_an_input_without_a_sample_axis_must_keep_its_value(tmp_path):
    data = _data(6, 1)
    working = prepare_model(_model()).model
    changing = [{**data, "x": data["x"][:3], "state": data["state"][:, :3]},
                {**data, "x": data["x"][3:], "state": data["state"][:, 3:], "sr": np.array(8000, dtype=np.int64)}]
    with pytest.raises(OnnxcompError, match="'sr' has no sample axis, but calibration batch 1 gives it another"):
        list(iter_feeds(changing, working))
    with pytest.raises(OnnxcompError, match=r"'sr' has no sample axis .* gives shape \(6,\)"):
        list(iter_feeds({**data, "sr": np.full(6, 16000, dtype=np.int64)}, working))


def test_statistics_of_a_layer_fed_by_the_state_equal_numpy():
    data = _data(40, 2)
    stats = onnxcomp.calibrate(_model(), data, progress=False, precision="float64")
    working = prepare_model(_model()).model
    layers, _ = find_layers(working, {})
    state_layer = next(layer for layer in layers if layer.weight.shape == (4, 4))
    rows = data["state"].reshape(-1, 4).astype(np.float64)  # every (state slot, sample) pair is a row
    (key,) = state_layer.stats_keys
    entry = stats[key]
    assert entry.rows == 80
    np.testing.assert_allclose(entry.total, rows.sum(axis=0), rtol=1e-10)
    np.testing.assert_allclose(entry.gram, rows.T @ rows, rtol=1e-10)


def test_compress_keeps_the_signature_and_the_outputs(tmp_path):
    model, calib, held = _model(), _data(60, 3), _data(16, 4)
    exact, report = onnxcomp.compress(model, calib, keep=1.0, progress=False, check_latency=False)
    onnx.checker.check_model(exact, full_check=True)
    assert list(exact.graph.input) == list(model.graph.input)
    assert list(exact.graph.output) == list(model.graph.output)
    assert METADATA_KEY not in {p.key for p in exact.metadata_props}
    assert any("state on axis 1" in w for w in report.warnings)
    assert_same_outputs(model, exact, held, rtol=1e-5, atol=1e-6, scale_atol=True)

    small, _ = onnxcomp.compress(model, calib, rank=1, progress=False, check_latency=False)
    onnx.checker.check_model(small, full_check=True)
    assert [n.op_type for n in small.graph.node].count("MatMul") == 4  # both layers as two thin MatMuls
    assert list(small.graph.input) == list(model.graph.input)
    from onnxcomp.runtime import make_session

    outputs = make_session(small).run(None, held)
    assert outputs[1].shape == (2, 16, 4) and all(np.isfinite(o).all() for o in outputs)


def test_the_command_line_and_bench_take_the_layout(tmp_path, capsys):
    model_path, calib, held = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "h.npz"
    onnx.save(_model(), model_path)
    np.savez(calib, **_data(40, 5))
    np.savez(held, **_data(12, 6))
    out = tmp_path / "small.onnx"
    assert main(["compress", str(model_path), str(out), "--data", str(calib), "--keep", "1.0", "--quiet",
                 "--no-latency-check"]) == 0
    result = bench(str(model_path), str(out), str(held), batch_sizes=[4], repeats=3, warmup=1, floor=False)
    assert result.samples == 12
    assert all(error["relative_l2"] < 1e-5 for error in result.outputs.values())
    assert_cli_error(capsys, ["compress", model_path, tmp_path / "o.onnx", "--data", calib, "--keep", "0.5",
                              "--batch-axis", "state:x"], "the axis must be an integer >= 0 or none", tmp_path)
    assert_cli_error(capsys, ["compress", model_path, tmp_path / "o.onnx", "--data", calib, "--keep", "0.5",
                              "--batch-axis", "sr:0"], "rank 0", tmp_path)
