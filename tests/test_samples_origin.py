"""Figures say what their samples can show: data that does not vary is refused or warned about, a
validation set is called held out only when none of its samples is among the statistics' (by the
samples' digests), a drop finer than one validation sample and a single sample are warned about."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnxcomp import calibrate, compress
from onnxcomp.calibration.digests import sample_digests
from onnxcomp.calibration.quality import relative_variance
from onnxcomp.calibration.stats import InputStats, Statistics
from onnxcomp.cli import main

from models import build, conv_model, gemm_model


def _images(n=40, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 6, 11, 11)).astype(np.float32)


def _run(capsys, *args) -> tuple[int, str]:
    quiet = ["--quiet", "--no-latency-check"] if args[0] == "compress" else ["--quiet"]
    code = main([str(a) for a in args] + quiet)
    out, err = capsys.readouterr()
    return code, out + err


# ---------------------------------------------------------------- digests


def test_a_sample_has_the_same_digest_in_any_batch_and_another_sample_another():
    x = _images(6)
    whole = sample_digests({"x": x})
    assert len(set(whole.tolist())) == 6
    np.testing.assert_array_equal(np.concatenate([sample_digests({"x": x[:2]}), sample_digests({"x": x[2:]})]), whole)
    changed = x.copy()
    changed[4, 0, 0, 0] += 1e-6
    assert (sample_digests({"x": changed}) != whole).tolist() == [False] * 4 + [True, False]


def test_digests_are_saved_merged_and_missing_in_old_files(tmp_path):
    first, second = calibrate(conv_model(), _images(20), progress=False), calibrate(conv_model(), _images(10, 1),
                                                                                    progress=False)
    assert len(first.digests) == 20
    first.save(tmp_path / "s.npz")
    np.testing.assert_array_equal(Statistics.load(tmp_path / "s.npz").digests, first.digests)
    merged = first.merged(second)
    np.testing.assert_array_equal(merged.digests, np.concatenate([first.digests, second.digests]))
    first.digests = None  # as a file of an older version
    first.save(tmp_path / "old.npz")
    assert Statistics.load(tmp_path / "old.npz").digests is None
    assert first.merged(second).digests is None  # nobody can tell any more which samples they saw


# ---------------------------------------------------------------- held out, or not


def test_validation_data_that_is_the_calibration_file_is_in_sample(tmp_path, capsys):
    onnx.save(conv_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=_images())
    code, out = _run(capsys, "compress", tmp_path / "m.onnx", tmp_path / "o.onnx", "--data", tmp_path / "c.npz",
                     "--validation-data", tmp_path / "c.npz", "--keep", "0.5", "--report", tmp_path / "r.json")
    assert code == 0, out
    assert ("fidelity (IN-SAMPLE, 40 samples of --validation-data (every one of them also among the samples the "
            "statistics saw))") in out
    assert "warning: the fidelity above was measured on calibration samples (in-sample)" in out
    assert json.loads((tmp_path / "r.json").read_text())["fidelity"]["held_out"] is False


def test_validation_data_partly_from_the_calibration_data_is_in_sample():
    data, other = _images(), _images(10, 1)
    validation = np.concatenate([other, data[:3]])
    _, report = compress(conv_model(), data, keep=0.5, validation_data=validation, progress=False,
                         check_latency=False)
    assert report.fidelity.held_out is False
    assert report.fidelity.source == ("13 samples of --validation-data (3 of them also among the samples the "
                                      "statistics saw)")


def test_separate_validation_data_is_held_out():
    _, report = compress(conv_model(), _images(), keep=0.5, validation_data=_images(10, 1), progress=False,
                         check_latency=False)
    assert report.fidelity.held_out is True and report.fidelity.source == "10 samples of --validation-data"


def test_stats_of_the_data_given_make_it_in_sample_and_of_other_data_held_out(tmp_path, capsys):
    onnx.save(conv_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=_images())
    np.savez(tmp_path / "h.npz", x=_images(20, 1))
    assert _run(capsys, "calibrate", tmp_path / "m.onnx", tmp_path / "s.npz", "--data", tmp_path / "c.npz")[0] == 0
    for data, label in (("c.npz", "IN-SAMPLE, 40 samples of the data given besides --stats (every one of them "
                                  "also among the samples the statistics saw)"),
                        ("h.npz", "held-out, 20 samples of the data given besides --stats)")):
        code, out = _run(capsys, "compress", tmp_path / "m.onnx", tmp_path / "o.onnx", "--stats", tmp_path / "s.npz",
                         "--data", tmp_path / data, "--keep", "0.5")
        assert code == 0, out
        assert f"fidelity ({label}" in out


def test_stats_without_digests_are_not_known_to_be_held_out():
    statistics = calibrate(conv_model(), _images(), progress=False)
    statistics.digests = None
    _, report = compress(conv_model(), _images(20, 1), keep=0.5, stats=statistics, progress=False,
                         check_latency=False)
    assert report.fidelity.held_out is None
    assert "whether they saw these samples is unknown" in report.fidelity.source
    table = report.table()
    assert "fidelity (NOT KNOWN TO BE HELD OUT, 20 samples of the data given besides --stats" in table
    assert "may have been measured on calibration samples" in table


def test_repeated_samples_held_out_of_the_statistics_are_still_in_sample():
    """The default split holds out every 10th sample; copies of them remain in the statistics."""
    data = np.concatenate([_images(7)] * 11)  # 77 samples: every 9th held out, images 0 2 4 6 1 3 5 0
    _, report = compress(conv_model(), data, keep=0.5, progress=False, check_latency=False)
    assert report.fidelity.held_out is False
    assert report.fidelity.source == ("8 calibration samples held out of the statistics (every one of them also "
                                      "among the samples the statistics saw)")
    assert any("only 7 distinct samples among the 69 calibration samples" in w for w in report.warnings)


# ---------------------------------------------------------------- data that does not vary


def test_relative_variance_of_constant_and_varied_rows():
    constant, varied = InputStats.empty(3), InputStats.empty(3)
    constant.add_rows(np.full((10, 3), 2.5), 10)
    rows = np.random.default_rng(0).standard_normal((1000, 3))
    varied.add_rows(rows, 1000)
    assert relative_variance(constant) < 1e-12
    assert relative_variance(varied) == pytest.approx(rows.var(axis=0).sum() / np.square(rows).mean(axis=0).sum())
    assert relative_variance(InputStats.empty(3)) == 0.0


def _half_constant_model():
    """Two Gemms: the first reads the data, the second a constant (the data times 0, plus 1)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[N, 12] x) => (float[N, 9] y, float[N, 9] z) {
        y = Gemm (x, w)
        zero = Constant <value_float = 0.0> ()
        one = Constant <value_float = 1.0> ()
        h = Mul (x, zero)
        c = Add (h, one)
        z = Gemm (c, v)
    }
    """
    return build(text, w=(12, 9), v=(12, 9))


def test_a_layer_reading_a_constant_is_a_warning():
    x = np.random.default_rng(0).standard_normal((64, 12)).astype(np.float32)
    _, report = compress(_half_constant_model(), x, rank=2, progress=False, check_latency=False)
    assert any(w.startswith("1 layer(s) see an input of zero variance on the calibration data (e.g. 'Gemm_5')")  # the 6th node
               for w in report.warnings), report.warnings


def test_calibrate_refuses_copies_of_one_sample(tmp_path, capsys):
    onnx.save(conv_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.repeat(_images(1), 30, axis=0))
    code, out = _run(capsys, "calibrate", tmp_path / "m.onnx", tmp_path / "s.npz", "--data", tmp_path / "c.npz")
    assert code == 2 and "the 30 calibration samples behind the statistics are all the same sample" in out
    assert not (tmp_path / "s.npz").exists()


# ---------------------------------------------------------------- what the validation samples can show


def _classifier_data(n, seed):
    return np.random.default_rng(seed).standard_normal((n, 12)).astype(np.float32)


def test_a_max_drop_finer_than_one_validation_sample_is_said():
    model = gemm_model(m=1, k=12, n=9)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    _, report = compress(model, _classifier_data(200, 0), max_drop=0.01, metric="top1", progress=False,
                         check_latency=False)
    assert report.fidelity.samples == 20
    warning = next(w for w in report.warnings if w.startswith("--max-drop"))
    assert warning.startswith("--max-drop 0.01 with --metric top1 on 20 validation sample(s): one disagreement is a "
                              "drop of 0.05")
    assert "give --validation-data with well over 100 samples" in warning
    _, report = compress(model, _classifier_data(200, 0), max_drop=0.01, metric="top1", progress=False,
                         check_latency=False, validation_data=_classifier_data(400, 1))
    assert not any(w.startswith("--max-drop") for w in report.warnings)


def test_one_validation_sample_is_warned_about():
    _, report = compress(conv_model(), _images(), keep=0.5, validation_data=_images(1, 1), progress=False,
                         check_latency=False)
    assert report.fidelity.samples == 1
    assert any(w.startswith("only 1 validation sample(s) judged the result and the candidates (one sample has no "
                            "spread") for w in report.warnings)
