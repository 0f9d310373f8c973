"""NaN and Inf in a compressed model's outputs are an infinite error wherever a model is judged:
the metrics, the report, ``bench``, ``--max-drop``, the sensitivity probe, and a warning says so.

The model: a Gemm then a Sqrt. Its second channel is a ReLU-like input (many exact
zeros) that correlates with a large first channel; the rank-1 fit mixes some of the first channel
into the second, which then goes negative on some samples, and Sqrt makes those NaN.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcomp import compress
from onnxcomp.bench import bench
from onnxcomp.cli import main
from onnxcomp.metrics import ChannelErrors, ErrorSums, TopOneAgreement, standardized_error
from onnxcomp.runtime import make_session

SQRT_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 4] x) => (float[N, 4] y) {
    h = Gemm (x, w)
    y = Sqrt (h)
}
"""


def sqrt_model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(SQRT_MODEL)
    model.graph.initializer.append(numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"))
    onnx.checker.check_model(model, full_check=True)
    return model


def sqrt_data(n: int, seed: int) -> np.ndarray:
    """Non-negative inputs (so the original is finite): a wide channel, a ReLU of a correlated one,
    two uniform channels."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n)
    relu = np.maximum(a + 0.5 * rng.standard_normal(n), 0)
    return np.stack([10 * a + 40, relu, rng.uniform(1, 2, n), rng.uniform(1, 2, n)], 1).astype(np.float32)


def outputs(model, x) -> np.ndarray:
    return make_session(model).run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def rank_one():
    """(original, rank-1 compressed, validation data, report), with NaN in the compressed outputs."""
    model, validation = sqrt_model(), sqrt_data(100, 1)
    compressed, report = compress(model, sqrt_data(200, 0), rank=1, validation_data=validation, progress=False,
                                  check_latency=False)
    assert np.isfinite(outputs(model, validation)).all()
    assert np.isnan(outputs(compressed, validation)).sum() == 17  # the premise: NaN where the original is finite
    return model, compressed, validation, report


# ---------------------------------------------------------------- the measures


def test_a_nan_channel_is_an_infinite_standardised_error_not_a_dropped_one():
    ref = np.random.default_rng(0).standard_normal((50, 3))
    new = ref + 0.1
    new[7, 1] = np.nan
    errors = ChannelErrors()
    errors.add(ref, new)
    per_channel = errors.per_channel()
    assert math.isinf(per_channel[1])
    np.testing.assert_allclose(per_channel[[0, 2]], 0.1 / ref[:, [0, 2]].std(axis=0))
    assert math.isinf(errors.result())


def test_relative_l2_max_abs_and_cosine_of_nan_and_inf():
    for bad in (np.nan, np.inf, -np.inf):
        ref = np.ones(10)
        new = ref.copy()
        new[3] = bad
        sums = ErrorSums()
        sums.add(ref, new)
        result = sums.result()
        assert math.isinf(result["relative_l2"]) and math.isinf(result["max_abs"])
        assert math.isnan(result["cosine"])  # undefined, and never printed as "1.0"
        assert result["nonfinite"] == 1


def test_the_originals_own_nonfinite_values_reproduced_exactly_are_no_error():
    ref = np.array([[1.0, -np.inf], [2.0, np.nan], [3.0, 4.0]])
    sums, channels = ErrorSums(), ChannelErrors()
    sums.add(ref, ref.copy())
    channels.add(ref, ref.copy())
    assert sums.result()["relative_l2"] == 0 and sums.result()["nonfinite"] == 0
    assert channels.result() == 0


def test_an_output_of_weight_zero_holding_inf_does_not_make_the_combination_nan():
    from onnxcomp.config import OutputSpec

    specs = {"a": OutputSpec("a", 1.0), "b": OutputSpec("b", 0.0)}
    assert standardized_error({"a": 0.5, "b": math.inf}, specs) == 0.5
    assert math.isinf(standardized_error({"a": 0.5, "b": math.inf}))


def test_a_nan_row_never_agrees_on_top1():
    ref = np.array([[0.0, 1.0], [1.0, 0.0]])
    new = np.array([[np.nan, 0.0], [1.0, 0.0]])  # argmax of the NaN row would be 0: a disagreement anyway
    new2 = np.array([[0.0, np.nan], [1.0, 0.0]])  # argmax 1 = the original's class: still a disagreement
    for candidate in (new, new2):
        top1 = TopOneAgreement()
        top1.add(ref, candidate, 2)
        assert top1.agreement() == 0.5


# ---------------------------------------------------------------- where models are judged


def test_the_report_says_inf_and_warns(rank_one):
    _, _, _, report = rank_one
    assert math.isinf(report.fidelity.standardized)
    errors = report.fidelity.outputs["y"]
    assert math.isinf(errors["standardized"]) and math.isinf(errors["relative_l2"]) and errors["nonfinite"] == 17
    table = report.table()
    assert "standardised error inf" in table and "relative L2 inf" in table
    assert "hold 17 NaN or Inf value(s) where the original's hold finite ones" in table


def test_the_cli_prints_the_infinite_error_and_the_report_json_keeps_the_count(tmp_path, capsys):
    onnx.save(sqrt_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=sqrt_data(200, 0))
    np.savez(tmp_path / "v.npz", x=sqrt_data(100, 1))
    code = main([str(a) for a in ("compress", tmp_path / "m.onnx", tmp_path / "out.onnx", "--data", tmp_path / "c.npz",
                                  "--validation-data", tmp_path / "v.npz", "--rank", "1", "--quiet",
                                  "--no-latency-check", "--report", tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert "fidelity (held-out, 100 samples of --validation-data): standardised error inf" in out
    assert "warning: the compressed model's outputs hold 17 NaN or Inf value(s)" in out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["fidelity"]["standardized"] is None  # JSON has no inf: null, with the count beside it
    assert saved["fidelity"]["outputs"]["y"]["nonfinite"] == 17


def test_bench_says_inf_and_warns(rank_one):
    model, compressed, validation, _ = rank_one
    result = bench(model, compressed, validation, batch_sizes=(1,), repeats=3, warmup=1, floor=False)
    errors = result.outputs["y"]
    assert math.isinf(errors["standardized"]) and math.isinf(errors["relative_l2"]) and errors["nonfinite"] == 17
    assert any("NaN or Inf" in note and "'y' 17" in note for note in result.notes)
    assert "inf" in result.table()
    # the 17 broken samples never agree; the other 83 do (channel 1's argmax is channel 0 everywhere)
    assert result.top1_agreement == pytest.approx(0.83)


def test_max_drop_never_accepts_a_model_that_computes_nan():
    """Every compressed candidate computes NaN, so no drop, however large, accepts one: the model stays
    dense. (Counting NaN channels as 0, the search took the 10% point with a 'drop' of 0.7.)"""
    model, validation = sqrt_model(), sqrt_data(100, 1)
    compressed, report = compress(model, sqrt_data(200, 0), max_drop=5.0, rank_multiple=1,
                                  validation_data=validation, progress=False, check_latency=False)
    trials = report.settings["target"]["search"]["trials"]
    assert all(math.isinf(t["loss"]) for t in trials if t["fraction"] < 1)
    assert report.settings["target"]["search"]["fraction"] == 1.0
    assert np.isfinite(outputs(compressed, validation)).all()


@pytest.mark.parametrize("metric", ["top1", "cosine"])
def test_top1_and_cosine_score_a_nan_model_infinitely_worse(rank_one, metric):
    from onnxcomp.judge import Judge

    model, compressed, validation, _ = rank_one
    judge = Judge(model, {"x": validation}, "test", True, metric=metric)
    assert judge.loss(model) == 0
    assert math.isinf(judge.loss(compressed))


def test_the_sensitivity_probe_gives_a_layer_whose_noise_makes_nan_an_infinite_gain():
    model, validation = sqrt_model(), sqrt_data(100, 1)
    _, report = compress(model, sqrt_data(200, 0), target_macs=0.75, rank_multiple=1, sensitivity="on",
                         validation_data=validation, progress=False, check_latency=False)
    gains = report.settings["target"]["sensitivity"]["gains"]
    assert math.isinf(gains["Gemm_0"])


def test_an_exact_candidate_of_an_infinitely_sensitive_layer_costs_no_error():
    from onnxcomp.budget.plan import _weighted_error

    class Candidate:
        error = 0.0

    assert _weighted_error({"layer": math.inf}, "layer", Candidate()) == 0.0
    Candidate.error = 0.1
    assert math.isinf(_weighted_error({"layer": math.inf}, "layer", Candidate()))


def test_a_metric_returning_nan_for_the_original_is_an_error_and_for_a_candidate_an_infinite_loss(rank_one):
    from onnxcomp.errors import OnnxcompError
    from onnxcomp.judge import Judge

    model, compressed, validation, _ = rank_one
    judge = Judge(model, {"x": validation}, "test", True, metric=lambda session: math.nan)
    with pytest.raises(OnnxcompError, match="scores the original model nan"):
        judge.loss(model)
    calls = iter([1.0, math.nan])
    judge = Judge(model, {"x": validation}, "test", True, metric=lambda session: next(calls))
    assert math.isinf(judge.loss(compressed))
    judge = Judge(model, {"x": validation}, "test", True, metric=lambda session: "good")
    with pytest.raises(OnnxcompError, match="returned 'good': it must return a number"):
        judge.loss(model)
