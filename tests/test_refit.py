"""Bias re-estimation: layer output means on what the compressed model feeds each layer, set back to the original's."""

import numpy as np
import onnx
import pytest

import onnxcomp
from onnxcomp.calibration.means import output_means
from onnxcomp.config import RankChoice, SolveConfig
from onnxcomp.decompose.solve import layer_problem, solve_layers
from onnxcomp.model import find_layers
from onnxcomp.refit import refit_biases
from onnxcomp.runtime import make_session
from models import build, conv_model

# A linear chain: the mean of every output is a linear function of the biases before it, so that a
# pass per layer of depth moves each mean exactly to the original's. The 8 -> 1 layer stays dense at
# rank 1 (not cheaper), so its shift goes into a new Add.
CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 12] x) => (float[N, 1] y) {
    h = MatMul (x, w1)
    g = Gemm <transB = 1> (h, w2, c2)
    y = MatMul (g, w3)
}
"""


def _chain():
    return build(CHAIN, 0, w1=(12, 10), w2=(8, 10), c2=(8,), w3=(8, 1))


def _inputs(samples=96, seed=1, dim=12):
    """Samples of one distribution (correlated features, a mean far from 0); ``seed`` draws the samples."""
    shape = np.random.default_rng(0)
    mix, mean = shape.standard_normal((4, dim)), 3 * shape.standard_normal(dim)
    return (np.random.default_rng(seed).standard_normal((samples, 4)) @ mix + mean).astype(np.float32)


def test_output_means_are_the_means_of_the_layer_outputs():
    model = conv_model(size=9)
    x = _inputs(20, dim=6 * 81).reshape(20, 6, 9, 9)
    (layer,) = find_layers(model)[0]
    means = output_means(model, [layer], [{"x": x[:8]}, {"x": x[8:]}])
    expose = onnx.ModelProto()
    expose.CopyFrom(model)
    expose.graph.output.append(onnx.helper.make_tensor_value_info(layer.output, onnx.TensorProto.FLOAT, None))
    conv = make_session(expose).run([layer.output], {"x": x})[0].astype(np.float64)
    np.testing.assert_allclose(means[layer.name], conv.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-7)


def test_refit_moves_rewritten_and_dense_layers_to_the_original_means():
    model = _chain()
    calibration, validation = _inputs(), _inputs(40, seed=2)
    options = dict(rank=1, centered=False, progress=False, check_latency=False)  # uncentered: means are off
    one_shot, _ = onnxcomp.compress(model, {"x": calibration}, validation_data={"x": validation}, **options)
    refit, report = onnxcomp.compress(model, {"x": calibration}, validation_data={"x": validation}, refit_bias=True,
                                      **options)
    statuses = [row.status for row in report.layers]
    assert statuses[:2] == ["compressed", "compressed"] and statuses[2].startswith("kept")
    want = make_session(model).run(None, {"x": calibration})[0].mean(axis=0)
    before = make_session(one_shot).run(None, {"x": calibration})[0].mean(axis=0)
    after = make_session(refit).run(None, {"x": calibration})[0].mean(axis=0)
    assert np.abs(before - want).max() > 1e-2 * np.abs(want).max()
    np.testing.assert_allclose(after, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert "Add" in [n.op_type for n in refit.graph.node]  # the dense MatMul's shift
    assert any(w.startswith("bias re-estimation of 2 rewritten and 1 dense layer(s)") for w in report.warnings)
    assert report.settings["refit_bias"] is True


class _Judge:
    """A judge whose losses are given: which model does refit_biases return?"""

    def __init__(self, losses):
        self.losses = iter(losses)

    def loss(self, model):
        return next(self.losses)


@pytest.mark.parametrize("losses, kept", [((0.2, 0.1), True), ((0.1, 0.2), False), ((0.1, float("nan")), False)])
def test_the_judge_keeps_the_one_shot_model_unless_the_refit_scores_better(losses, kept):
    model = _chain()
    layers, _ = find_layers(model)
    calibration = _inputs()
    one_shot, _ = onnxcomp.compress(model, {"x": calibration}, rank=1, centered=False, progress=False,
                                    check_latency=False, validation_data={"x": calibration})
    statistics = onnxcomp.calibrate(model, {"x": calibration}, progress=False)
    problems = {layer.name: layer_problem(layer, statistics.of_layer(layer)) for layer in layers}
    config = SolveConfig(centered=False, ranks=RankChoice(rank=1))
    solved = solve_layers(problems, {layer.name: (config, None) for layer in layers})
    plan = [(layer, solved[layer.name]) for layer in layers if not isinstance(solved[layer.name], str)]
    result = refit_biases(model, layers, plan, lambda: iter([{"x": calibration}]), one_shot, _Judge(losses))
    assert result.kept is kept
    assert (result.model is one_shot) is (not kept)


@pytest.mark.parametrize("kwargs, message", [
    ({"stats": "STATS"}, "give it with --data, not --stats"),
    ({"data": iter([{"x": _inputs()}])}, "not a one-pass iterator or reader"),
])
def test_refit_refuses_data_it_cannot_read_again(kwargs, message, tmp_path):
    model = _chain()
    if kwargs.get("stats") == "STATS":
        path = tmp_path / "s.npz"
        onnxcomp.calibrate(model, {"x": _inputs()}, progress=False).save(path)
        kwargs = {"stats": str(path), "data": {"x": _inputs()}}
    data = kwargs.pop("data")
    with pytest.raises(onnxcomp.OnnxcompError, match=message):
        onnxcomp.compress(model, data, keep=0.5, refit_bias=True, progress=False, check_latency=False, **kwargs)
