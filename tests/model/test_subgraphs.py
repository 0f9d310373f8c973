"""Layers inside If / Loop / Scan bodies: found, measured on the samples that ran them, rewritten in place."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxcomp
from onnxcomp.model import find_layers
from onnxcomp.model.subgraphs import describe, walk_graphs
from checks import assert_same_outputs

# Two held scalar flags pick the branches; the then branch holds a layer and, one level deeper, an
# If with another; the else branch a layer reading an outer weight.
IF_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[batch, 8] x, bool flag, bool deeper) => (float[batch, 6] y) {
    y = If(flag) <then_branch = then_g () => (float[batch, 6] a) {
        p = Relu(x)
        a0 = MatMul(p, W)
        a = If(deeper) <then_branch = deep_g () => (float[batch, 6] d) {
            d = MatMul(a0, U)
        }, else_branch = shallow_g () => (float[batch, 6] s) {
            s = Identity(a0)
        }>
    }, else_branch = else_g () => (float[batch, 6] b) {
        n = Neg(x)
        b = MatMul(n, V)
    }>
}
"""

# The then branch of IF_MODEL with ``deeper`` true, in a main graph.
FLAT_THEN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[batch, 8] x) => (float[batch, 6] y) {
    p = Relu(x)
    a0 = MatMul(p, W)
    y = MatMul(a0, U)
}
"""

# A layer in the else branch only.
ONLY_ELSE_LAYER = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[batch, 8] x, bool flag) => (float[batch, 8] y) {
    y = If(flag) <then_branch = then_g () => (float[batch, 8] a) {
        a = Relu(x)
    }, else_branch = else_g () => (float[batch, 8] b) {
        b = MatMul(x, V)
    }>
}
"""

# A recurrence run ``steps`` times: the layer reads the state of every iteration.
LOOP_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[batch, 6] x, int64 steps) => (float[batch, 6] y) {
    keep_going = Constant<value = bool {1}>()
    y = Loop(steps, keep_going, x) <body = step_g (int64 i, bool c, float[batch, 6] h) => (bool c_out, float[batch, 6] h_out) {
        c_out = Identity(c)
        m = MatMul(h, W)
        h_out = Tanh(m)
    }>
}
"""

# A scan over the sequence axis 1; the first layer reads the body's own per-step input.
SCAN_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[batch, 6] h0, float[batch, 5, 6] seq) => (float[batch, 6] h, float[batch, 5, 4] out) {
    h, out = Scan<num_scan_inputs = 1, scan_input_axes = [1], scan_output_axes = [1], body = cell_g (float[batch, 6] state, float[batch, 6] xt) => (float[batch, 6] state_out, float[batch, 4] yt) {
        m = MatMul(xt, W)
        state_out = Add(state, m)
        yt = MatMul(state_out, U)
    }>(h0, seq)
}
"""


def _build(text: str, seed: int, **shapes) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(numpy_helper.from_array((0.5 * rng.standard_normal(shape)).astype(np.float32), name)
                                   for name, shape in shapes.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def _if_model():
    return _build(IF_MODEL, 0, W=(8, 6), U=(6, 6), V=(8, 6))


def _correlated(rng, shape, mix_dim):
    """Samples with correlated features: a low-rank fit has something to keep."""
    return (rng.standard_normal((*shape[:-1], mix_dim)) @ rng.standard_normal((mix_dim, shape[-1]))).astype(np.float32)


def _if_data(flag: bool, deeper: bool = True, samples: int = 80, seed: int = 1) -> dict:
    x = _correlated(np.random.default_rng(seed), (samples, 8), 3)
    return {"x": x, "flag": np.array(flag), "deeper": np.array(deeper)}


def _gram(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    return rows.T @ rows


def _stats_of(statistics, layer):
    (key,) = layer.stats_keys
    return statistics[key]


def _nodes(model, attribute: str) -> list[str]:
    """The op types of the body in ``attribute`` (at any depth)."""
    return [n.op_type for scope, g in walk_graphs(model.graph) if scope and scope[-1].attribute == attribute
            for n in g.node]


def test_layers_in_bodies_are_found_with_the_path_to_their_body():
    layers, skipped = find_layers(_if_model())
    where = {layer.input: describe(layer.scope) for layer in layers}
    assert where == {"p": "If 'y' then_branch", "a0": "If 'y' then_branch > If 'a' then_branch",
                     "n": "If 'y' else_branch"}
    assert skipped == []


def test_a_branch_is_measured_on_the_samples_that_ran_it_and_only_on_those():
    model = _if_model()
    layers = {layer.input: layer for layer in find_layers(model)[0]}
    data = _if_data(True)
    x = data["x"].astype(np.float64)
    statistics = onnxcomp.calibrate(model, data, progress=False)
    relu = np.maximum(x, 0)
    then = _stats_of(statistics, layers["p"])
    assert (then.rows, then.samples) == (80, 80)
    np.testing.assert_allclose(then.gram, _gram(relu), rtol=1e-6)
    np.testing.assert_allclose(then.total, relu.sum(0), rtol=1e-6)
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W")).astype(np.float64)
    np.testing.assert_allclose(_stats_of(statistics, layers["a0"]).gram, _gram(relu @ w), rtol=1e-5)
    assert _stats_of(statistics, layers["n"]).rows == 0  # the else branch never ran
    # The other branch's samples: only the else branch's layer sees rows.
    other = onnxcomp.calibrate(model, _if_data(False), progress=False)
    assert [_stats_of(other, layers[name]).rows for name in ("p", "a0", "n")] == [0, 0, 80]
    np.testing.assert_allclose(_stats_of(other, layers["n"]).gram, _gram(-x), rtol=1e-6)


def test_the_branch_that_ran_is_rewritten_in_place_and_the_other_is_left_dense():
    model = _if_model()
    exact, _ = onnxcomp.compress(model, _if_data(True), keep=1.0, progress=False, check_latency=False)
    for flag in (True, False):
        assert_same_outputs(model, exact, _if_data(flag, seed=7), rtol=1e-6)
    small, report = onnxcomp.compress(model, _if_data(True), rank=2, progress=False, check_latency=False)
    onnx.checker.check_model(small, full_check=True)
    assert [i.name for i in small.graph.input] == ["x", "flag", "deeper"]
    status = {row.name: row.status for row in report.layers}
    assert sum(s == "compressed" for s in status.values()) == 2
    assert any("which no calibration sample ran" in s for s in status.values())
    assert _nodes(small, "then_branch").count("MatMul") == 4  # two layers, each two thin MatMuls
    assert sorted(_nodes(small, "else_branch")) == ["Identity", "MatMul", "Neg"]  # the else branches, untouched
    assert_same_outputs(model, small, _if_data(False, seed=7), rtol=1e-6)  # the branch left dense
    # The branch that ran, compressed, is what the same layers give in a main graph on the same data.
    flat = _build(FLAT_THEN, 0, W=(8, 6), U=(6, 6))
    flat_small, _ = onnxcomp.compress(flat, {"x": _if_data(True)["x"]}, rank=2, progress=False, check_latency=False)
    test = _if_data(True, seed=7)
    expected = onnxcomp.runtime.make_session(flat_small).run(None, {"x": test["x"]})[0]
    got = onnxcomp.runtime.make_session(small).run(None, test)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert np.abs(got - onnxcomp.runtime.make_session(model).run(None, test)[0]).max() > 1e-3  # rank 2: not exact


def test_fail_if_unchanged_when_no_sample_ran_any_layer_body():
    model = _build(ONLY_ELSE_LAYER, 0, V=(8, 8))
    data = {name: value for name, value in _if_data(True).items() if name != "deeper"}
    with pytest.raises(onnxcomp.OnnxcompError, match="no compressible layer ran on the calibration data"):
        onnxcomp.compress(model, data, keep=0.5, progress=False, check_latency=False, fail_if_unchanged=True)
    same, report = onnxcomp.compress(model, data, keep=0.5, progress=False, check_latency=False)
    assert_same_outputs(model, same, {**data, "flag": np.array(False)}, rtol=0)
    assert "written unchanged" in report.warnings[-1]


def _loop_data(samples=40, steps=4, seed=2):
    return {"x": _correlated(np.random.default_rng(seed), (samples, 6), 2), "steps": np.array(steps, np.int64)}


def test_a_loop_body_layer_is_measured_over_every_iteration():
    model = _build(LOOP_MODEL, 3, W=(6, 6))
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    data = _loop_data()
    states, h = [], data["x"].astype(np.float64)
    for _ in range(4):
        states.append(h)
        h = np.tanh(h @ w)
    (layer,) = find_layers(model)[0]
    stats = _stats_of(onnxcomp.calibrate(model, data, progress=False), layer)
    assert (stats.rows, stats.samples) == (4 * 40, 40)  # every iteration's rows, of 40 samples
    np.testing.assert_allclose(stats.gram, _gram(np.concatenate(states)), rtol=1e-5)
    exact, _ = onnxcomp.compress(model, data, keep=1.0, progress=False, check_latency=False)
    assert_same_outputs(model, exact, _loop_data(seed=9), rtol=1e-6)
    small, _ = onnxcomp.compress(model, data, rank=2, progress=False, check_latency=False)
    onnx.checker.check_model(small, full_check=True)
    assert _nodes(small, "body").count("MatMul") == 2


def _scan_data(samples=30, seed=4):
    rng = np.random.default_rng(seed)
    return {"h0": _correlated(rng, (samples, 6), 2), "seq": _correlated(rng, (samples, 5, 6), 2)}


def test_a_scan_body_layer_reading_the_per_step_input_is_measured_over_every_step():
    model = _build(SCAN_MODEL, 5, W=(6, 6), U=(6, 4))
    data = _scan_data()
    layers = {layer.input: layer for layer in find_layers(model)[0]}
    statistics = onnxcomp.calibrate(model, data, progress=False)
    steps = _stats_of(statistics, layers["xt"])
    assert (steps.rows, steps.samples) == (5 * 30, 30)
    np.testing.assert_allclose(steps.gram, _gram(data["seq"].reshape(-1, 6)), rtol=1e-5)
    exact, _ = onnxcomp.compress(model, data, keep=1.0, progress=False, check_latency=False)
    assert_same_outputs(model, exact, _scan_data(seed=8), rtol=1e-6)
    small, report = onnxcomp.compress(model, data, rank=2, progress=False, check_latency=False)
    onnx.checker.check_model(small, full_check=True)
    assert [row.status for row in report.layers] == ["compressed", "compressed"]
    assert [o.name for o in small.graph.output] == ["h", "out"]


def test_inspect_says_that_layers_in_bodies_are_not_in_the_timed_share(tmp_path, capsys):
    from onnxcomp.cli import main

    path = tmp_path / "if.onnx"
    onnx.save(_if_model(), path)
    assert main(["inspect", str(path), "--input-shape", "x:1,8"]) == 0
    out = capsys.readouterr().out
    assert any("in body" in line for line in out.splitlines())  # the column of the layer table
    assert "3 of these layers are inside If/Loop/Scan bodies" in out
