"""The judge measures each output by what the graph says it is, against direct NumPy computations."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcomp.config import OutputSpec
from onnxcomp.judge import Judge
from onnxcomp.runtime import make_session

from model.test_semantics import ARGMAX, CTC, EMBEDDING, YOLOV8
from models import build


def _perturbed(model: onnx.ModelProto, size: float = 0.3, seed: int = 9, only=None) -> onnx.ModelProto:
    """The model with noise on every weight (or those named in ``only``): a candidate close to it."""
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    rng = np.random.default_rng(seed)
    for weight in changed.graph.initializer:
        if only is not None and weight.name not in only:
            continue
        value = numpy_helper.to_array(weight)
        noise = rng.standard_normal(value.shape) * value.std() * size
        weight.CopyFrom(numpy_helper.from_array((value + noise).astype(np.float32), weight.name))
    return changed


def _run(model, feed):
    return make_session(model).run(None, feed)


def _per_channel(ref, new, axis):
    """RMS over channels of each channel's RMS error over its standard deviation (no floor reached)."""
    ref, new = (np.moveaxis(np.asarray(v, np.float64), axis, -1).reshape(-1, ref.shape[axis]) for v in (ref, new))
    return float(np.sqrt(np.mean(np.mean((new - ref) ** 2, axis=0) / ref.var(axis=0))))


def _yolo():
    """The YOLOv8-shaped head with box values in pixels (hundreds) beside scores in [0, 1]."""
    model = build(YOLOV8, wb=(4, 8, 1, 1), wc=(3, 8, 1, 1))
    boxes = model.graph.initializer[0]
    boxes.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(boxes) * 100, boxes.name))
    rng = np.random.default_rng(0)
    feed = {"a": rng.standard_normal((6, 8, 8, 8)).astype(np.float32),
            "b": rng.standard_normal((6, 8, 4, 4)).astype(np.float32)}
    return model, feed


def test_yolo_head_is_judged_per_channel_on_axis_1():
    model, feed = _yolo()
    candidate = _perturbed(model, only={"wc"})  # the class scores change, the boxes do not
    ref, new = _run(model, feed)[0], _run(candidate, feed)[0]
    judged = Judge(model, feed, "test", True).fidelity(candidate).outputs["output0"]["standardized"]
    assert judged == pytest.approx(_per_channel(ref, new, 1), rel=1e-6)
    # The rank rule took the 80 anchors for channels, each mixing box pixels with class scores:
    # the scores' error vanished under the boxes' spread.
    by_rank = Judge(model, feed, "test", True, outputs=[OutputSpec("output0", 1.0, 2)])
    old = by_rank.fidelity(candidate).outputs["output0"]["standardized"]
    assert old == pytest.approx(_per_channel(ref, new, 2), rel=1e-6)
    scores = _per_channel(ref[:, 4:], new[:, 4:], 1)
    assert judged == pytest.approx(scores * math.sqrt(3 / 7), rel=1e-6)  # 3 of 7 channels changed
    assert judged > 10 * old


def _ctc():
    model = build(CTC, wc=(8, 4, 1, 1), w=(8, 6))
    feed = {"x": np.random.default_rng(1).standard_normal((7, 4, 1, 10)).astype(np.float32)}
    return model, feed


def _entropy(p):
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=-1)


def test_a_softmax_is_judged_by_divergence_with_top1_beside_it():
    model, feed = _ctc()
    candidate = _perturbed(model, 0.5)
    p, q = (np.asarray(o, np.float64).reshape(-1, 6) for o in (_run(model, feed)[0], _run(candidate, feed)[0]))
    js = np.mean(_entropy((p + q) / 2) - (_entropy(p) + _entropy(q)) / 2)
    spread = _entropy(p.mean(axis=0)) - np.mean(_entropy(p))
    fidelity = Judge(model, feed, "test", True).fidelity(candidate)
    errors = fidelity.outputs["probs"]
    assert errors["kind"] == "distribution"
    assert errors["standardized"] == pytest.approx(math.sqrt(js / spread), rel=1e-6)
    agreement = np.mean(p.argmax(1) == q.argmax(1))
    assert 0 < agreement < 1
    assert errors["top1_agreement"] == pytest.approx(agreement)
    assert fidelity.top1_agreement == pytest.approx(agreement)


def test_a_nonfinite_distribution_is_an_infinite_error():
    model, feed = _ctc()
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    weight = broken.graph.initializer[1]
    value = numpy_helper.to_array(weight).copy()
    value[0, 0] = np.nan
    weight.CopyFrom(numpy_helper.from_array(value, weight.name))
    fidelity = Judge(model, feed, "test", True).fidelity(broken)
    assert fidelity.outputs["probs"]["standardized"] == math.inf and fidelity.standardized == math.inf


def test_labels_are_judged_by_disagreement():
    model = build(ARGMAX, w=(12, 5))
    feed = {"x": np.random.default_rng(2).standard_normal((40, 12)).astype(np.float32)}
    candidate = _perturbed(model, 0.6)
    ref, new = _run(model, feed)[0], _run(candidate, feed)[0]
    rate = np.mean(ref != new)
    assert 0 < rate < 1
    errors = Judge(model, feed, "test", True).fidelity(candidate).outputs["label"]
    assert errors["standardized"] == pytest.approx(rate) and errors["disagreement"] == pytest.approx(rate)


def test_embeddings_are_judged_by_cosine():
    model = build(EMBEDDING, w=(12, 8))
    feed = {"x": np.random.default_rng(3).standard_normal((30, 9, 12)).astype(np.float32)}
    candidate = _perturbed(model)
    a, b = (np.asarray(o, np.float64) for o in (_run(model, feed)[0], _run(candidate, feed)[0]))
    cosine = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    unit = a / np.linalg.norm(a, axis=1, keepdims=True)
    variance = 1 - np.sum(unit.mean(0) ** 2)
    errors = Judge(model, feed, "test", True).fidelity(candidate).outputs["unit"]
    assert errors["mean_cosine"] == pytest.approx(np.mean(cosine))
    assert errors["standardized"] == pytest.approx(math.sqrt(2 * np.mean(1 - cosine) / variance), rel=1e-6)


def test_inspect_and_the_report_say_how_each_output_is_judged(tmp_path, capsys):
    import json

    from onnxcomp.cli import main

    model = build(CTC, wc=(8, 4, 1, 1), w=(8, 6))
    path, data, report = tmp_path / "ctc.onnx", tmp_path / "c.npz", tmp_path / "r.json"
    onnx.save(model, path)
    np.savez(data, x=np.random.default_rng(2).standard_normal((40, 4, 1, 10)).astype(np.float32))
    assert main(["inspect", str(path), "--no-timing"]) == 0
    assert "judged as: output probs: distribution, channel axis 2, from" in capsys.readouterr().out
    assert main(["compress", str(path), str(tmp_path / "out.onnx"), "--data", str(data), "--rank", "2", "--quiet",
                 "--no-latency-check", "--report", str(report)]) == 0
    assert "judged as: output probs: distribution, channel axis 2" in capsys.readouterr().out
    (meaning,) = json.loads(report.read_text())["settings"]["output_semantics"]
    assert meaning["kind"] == "distribution" and meaning["axis"] == 2 and "Softmax" in " ".join(meaning["evidence"])
