"""The built-in metrics a Judge scores candidates by, against direct NumPy computations on
onnxruntime's outputs of both models."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcomp.errors import OnnxcompError
from onnxcomp.judge import CosineMetric, Judge, TopOneMetric
from onnxcomp.runtime import make_session

from models import build

CLASSIFIER = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 12] x) => (float[N, 7] y) {
    y = MatMul (x, w)
}
"""
# Per position scores, as a CTC recogniser or a token classifier gives them; the mask is an input
# the model does not read (as many encoders' heads).
TOKENS = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, T, 12] x, int64[N, T] attention_mask) => (float[N, T, 7] y) {
    y = MatMul (x, w)
}
"""


def _perturbed(model: onnx.ModelProto, size: float = 0.4) -> onnx.ModelProto:
    """The model with noise added to its weight: a candidate that agrees with it on most inputs."""
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    weight = changed.graph.initializer[0]
    value = numpy_helper.to_array(weight)
    noise = np.random.default_rng(9).standard_normal(value.shape) * value.std() * size
    weight.CopyFrom(numpy_helper.from_array((value + noise).astype(np.float32), weight.name))
    return changed


def _outputs(model, feed):
    return make_session(model).run(None, feed)[0]


def test_top1_of_class_scores():
    model = build(CLASSIFIER, w=(12, 7))
    feed = {"x": np.random.default_rng(0).standard_normal((50, 12)).astype(np.float32)}
    candidate = _perturbed(model)
    judge = Judge(model, feed, "test", True, metric="top1")
    expected = np.mean(_outputs(model, feed).argmax(1) == _outputs(candidate, feed).argmax(1))
    assert 0.5 < expected < 1  # the check below can tell agreeing from disagreeing samples
    assert TopOneMetric().score(judge, candidate) == pytest.approx(expected)
    assert judge.loss(candidate) == pytest.approx(1 - expected)


def _token_feed(lengths=(9, 4, 7, 2, 9, 5)):
    rng = np.random.default_rng(1)
    mask = np.zeros((len(lengths), 9), np.int64)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return {"x": rng.standard_normal((len(lengths), 9, 12)).astype(np.float32), "attention_mask": mask}


def test_top1_per_position_of_token_scores():
    model = build(TOKENS, w=(12, 7))
    feed = _token_feed()
    candidate = _perturbed(model)
    agree = _outputs(model, feed).argmax(2) == _outputs(candidate, feed).argmax(2)  # [N, T]
    real = feed["attention_mask"] == 1
    assert agree.mean() != pytest.approx(agree[real].mean())  # the mask changes the answer
    plain = Judge(model, feed, "test", True, metric="top1")
    masked = Judge(model, feed, "test", True, metric="top1", row_mask="attention_mask")
    assert TopOneMetric().score(plain, candidate) == pytest.approx(agree.mean())
    assert TopOneMetric().score(masked, candidate) == pytest.approx(agree[real].mean())
    assert TopOneMetric().score(masked, model) == 1.0


def test_top1_refuses_outputs_that_are_not_scores():
    model = build(CLASSIFIER.replace("float[N, 7] y", "float[N] y"), w=(12,))  # one score per sample
    judge = Judge(model, {"x": np.ones((4, 12), np.float32)}, "test", True, metric="top1")
    with pytest.raises(OnnxcompError, match="--metric top1"):
        TopOneMetric().score(judge, model)


def test_cosine_per_sample():
    model = build(CLASSIFIER, w=(12, 7))
    feed = {"x": np.random.default_rng(0).standard_normal((20, 12)).astype(np.float32)}
    candidate = _perturbed(model)
    ref, new = (_outputs(m, feed).astype(np.float64) for m in (model, candidate))
    expected = np.mean(np.sum(ref * new, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(new, axis=1)))
    judge = Judge(model, feed, "test", True, metric="cosine")
    assert CosineMetric().score(judge, candidate) == pytest.approx(expected, rel=1e-6)
    assert judge.loss(model) == pytest.approx(0, abs=1e-7)
