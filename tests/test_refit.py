"""Bias re-estimation: layer output means on what the compressed model feeds each layer, set back to the original's."""

import numpy as np
import onnx
import pytest

import onnxcomp
from onnxcomp.calibration.means import output_means
from onnxcomp.config import RankChoice, SolveConfig
from onnxcomp.decompose.solve import layer_problem, solve_layers
from onnxcomp.model import find_layers
from onnxcomp.passes import apply_decompositions
from onnxcomp.refit import refit_biases
from onnxcomp.runtime import make_session
from models import build, conv_model

# Three layers with ReLUs between: a layer's output mean, measured after the layers above it were
# corrected, is moved exactly to the original's; the last one's is the model's. The 8 -> 1 layer
# stays dense at rank 1 (not cheaper), and its shift goes into a new Add.
CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 12] x) => (float[N, 1] y) {
    h = MatMul (x, w1)
    r = Relu (h)
    g = Gemm <transB = 1> (r, w2, c2)
    s = Relu (g)
    y = MatMul (s, w3)
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


def _one_shot(model, calibration):
    """The layers, the uncentered rank-1 plan (its means are off) and the model it gives."""
    layers, _ = find_layers(model)
    statistics = onnxcomp.calibrate(model, {"x": calibration}, progress=False)
    problems = {layer.name: layer_problem(layer, statistics.of_layer(layer)) for layer in layers}
    config = SolveConfig(centered=False, ranks=RankChoice(rank=1))
    solved = solve_layers(problems, {layer.name: (config, None) for layer in layers})
    plan = [(layer, solved[layer.name]) for layer in layers if not isinstance(solved[layer.name], str)]
    return layers, plan, apply_decompositions(model, plan)


def test_refit_moves_rewritten_and_dense_layers_to_the_original_means():
    model = _chain()
    calibration = _inputs()
    layers, plan, one_shot = _one_shot(model, calibration)
    assert len(plan) == 2  # the 8 -> 1 MatMul stays dense
    refit = refit_biases(model, layers, plan, [{"x": calibration[:50]}, {"x": calibration[50:]}], one_shot)
    assert (refit.stages, refit.dense_layers) == (3, 1)
    want = make_session(model).run(None, {"x": calibration})[0].mean(axis=0)
    before = make_session(one_shot).run(None, {"x": calibration})[0].mean(axis=0)
    after = make_session(refit.model).run(None, {"x": calibration})[0].mean(axis=0)
    assert np.abs(before - want).max() > 1e-2 * np.abs(want).max()
    np.testing.assert_allclose(after, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert [n.op_type for n in refit.model.graph.node][-2:] == ["MatMul", "Add"]  # the dense MatMul's shift


class _Judge:
    """A judge whose losses are given: which model does refit_biases return?"""

    def __init__(self, losses):
        self.losses = iter(losses)

    def loss(self, model):
        return next(self.losses)


@pytest.mark.parametrize("losses, kept", [((0.2, 0.1), True), ((0.1, 0.2), False), ((0.1, float("nan")), False)])
def test_the_judge_keeps_the_one_shot_model_unless_the_refit_scores_better(losses, kept):
    model = _chain()
    calibration = _inputs()
    layers, plan, one_shot = _one_shot(model, calibration)
    result = refit_biases(model, layers, plan, [{"x": calibration}], one_shot, _Judge(losses))
    assert result.kept is kept
    assert (result.model is one_shot) is (not kept)
    assert (result.rejected is None) is kept


def test_refit_needs_calibration_data_not_statistics(tmp_path):
    model = _chain()
    path = tmp_path / "s.npz"
    onnxcomp.calibrate(model, {"x": _inputs()}, progress=False).save(path)
    with pytest.raises(onnxcomp.OnnxcompError, match="give it with --data, not --stats"):
        onnxcomp.compress(model, {"x": _inputs()}, stats=str(path), keep=0.5, refit_bias=True, progress=False,
                          check_latency=False)


def test_a_one_pass_iterator_is_enough():
    model = _chain()
    batches = iter([{"x": part} for part in np.split(_inputs(), 4)])
    _, report = onnxcomp.compress(model, batches, rank=1, centered=False, refit_bias=True, progress=False,
                                  check_latency=False)
    assert any(w.startswith("bias re-estimation of 2 rewritten and 1 dense layer(s), 3 stage(s): validation loss")
               for w in report.warnings)


def test_levels_follow_the_graph_into_bodies():
    from onnxcomp.refit import layer_levels
    from model.test_subgraphs import _if_model

    model = _if_model()
    layers, _ = find_layers(model)
    assert {layer.input: level for layer, level in zip(layers, layer_levels(model, layers).values())} == {
        "p": 1, "a0": 2, "n": 1}


# A MatMul followed by the Add of its bias, as exporters write Linear: the chain's bias correction is
# folded into that Add, past the MatMul output the means are measured at.
LINEAR = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 12] x) => (float[N, 8] y) {
    h = MatMul (x, w1)
    hb = Add (h, b1)
    r = Relu (hb)
    y = MatMul (r, w2)
}
"""


def test_a_bias_folded_into_the_following_add_is_counted_once():
    model = build(LINEAR, 0, w1=(12, 10), b1=(10,), w2=(10, 8))
    calibration = _inputs()
    layers, _ = find_layers(model)
    statistics = onnxcomp.calibrate(model, {"x": calibration}, progress=False)
    problems = {layer.name: layer_problem(layer, statistics.of_layer(layer)) for layer in layers}
    config = SolveConfig(ranks=RankChoice(rank=2))  # centered: the first chain's correction goes into b1
    solved = solve_layers(problems, {layer.name: (config, None) for layer in layers})
    plan = [(layer, solved[layer.name]) for layer in layers]
    one_shot = apply_decompositions(model, plan)
    assert "Add" in [n.op_type for n in one_shot.graph.node][:3]  # folded, no Add of its own
    refit = refit_biases(model, layers, plan, [{"x": calibration}], one_shot)
    expose = [onnx.helper.make_tensor_value_info("hb", onnx.TensorProto.FLOAT, None)]
    means = []
    for candidate in (model, refit.model):
        probe = onnx.ModelProto()
        probe.CopyFrom(candidate)
        probe.graph.output.extend(expose)
        means.append(make_session(probe).run(["hb", "y"], {"x": calibration}))
    # The first layer's output with its bias: the original's mean exactly; the model's output too.
    for want, got in zip(*means):
        np.testing.assert_allclose(got.mean(axis=0), want.mean(axis=0), rtol=1e-4, atol=1e-5 * np.abs(want).max())
