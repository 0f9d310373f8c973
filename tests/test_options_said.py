"""Options are never taken silently or explained wrongly: a rank multiple asked for is kept everywhere
(or said why not), EVBMF works where it applies, bad values of the Python API are one-line errors
instead of a TypeError or a guess, and a provider that is not there is refused before any work."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxcomp
from onnxcomp.errors import OnnxcompError

from models import EXAMPLE, build, conv_model


def _images(n=40, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 6, 11, 11)).astype(np.float32)


def _conv_then_gemm():
    """A 3x3 conv (8 out, 54 in: cheaper ranks up to 6) and a Gemm of 968 x 64 (up to 60)."""
    return build("""
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[N, 6, 11, 11] x) => (float[N, 64] y) {
            h = Conv <pads = [1, 1, 1, 1]> (x, w)
            r = Relu (h)
            f = Flatten (r)
            y = Gemm (f, v)
        }
        """, w=(8, 6, 3, 3), v=(968, 64))


# ---------------------------------------------------------------- --rank-multiple


def test_an_asked_rank_multiple_is_kept_everywhere_and_said_where_a_layer_stays_dense():
    """Was: a layer without a multiple of 16 below its cheaper ranks took any rank (the report said 16)."""
    _, report = onnxcomp.compress(_conv_then_gemm(), _images(), target_macs=0.6, rank_multiple=16, progress=False,
                                  check_latency=False)
    rows = {row.name: row for row in report.layers}
    assert rows["Conv_0"].status == "kept: the budget keeps it dense"
    assert rows["Gemm_3"].status == "compressed" and rows["Gemm_3"].rank[0] % 16 == 0
    assert report.settings["rank_multiple"] == 16
    assert ("--rank-multiple 16: 1 layer(s) have no cheaper rank at a multiple of 16 and stay dense (e.g. 'Conv_0': "
            "ranks up to 6 are cheaper than it)") in report.warnings


def test_the_default_multiple_still_gives_way_on_small_layers():
    _, report = onnxcomp.compress(_conv_then_gemm(), _images(), target_macs=0.6, progress=False, check_latency=False)
    assert not any(w.startswith("--rank-multiple") for w in report.warnings)


# ---------------------------------------------------------------- --evbmf


def test_evbmf_with_tucker2_ranks_the_matrix_layers_by_evbmf_of_their_matrix():
    """Was: 'no rank rule given' as soon as the model had a Gemm (the digits CNN has two)."""
    from onnxcomp.decompose.tucker2 import evbmf

    model = onnx.load(EXAMPLE / "digits_cnn.onnx")
    _, report = onnxcomp.compress(model, EXAMPLE / "calib.npz", method="tucker2", evbmf=True, progress=False,
                                  check_latency=False)
    rows = {row.name: row for row in report.layers}
    weight = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer
                  if t.name == next(n for n in model.graph.node if n.name == "/fc1/Gemm").input[1])
    assert rows["/fc1/Gemm"].rank == [evbmf(weight)[0]] and rows["/fc1/Gemm"].method == "svd"
    assert rows["/conv2/Conv"].method == "tucker2"


# ---------------------------------------------------------------- Python API values


@pytest.mark.parametrize("options, message", [
    ({"rank": 2.5}, "--rank must be a positive integer or R_OUT,R_IN, got 2.5"),
    ({"rank": True}, "--rank must be a positive integer or R_OUT,R_IN, got True"),
    ({"rank": "2"}, "--rank must be a positive integer or R_OUT,R_IN, got '2'"),
    ({"keep": True}, "--keep must be in (0, 1], got True"),
    ({"keep": "0.5"}, "--keep must be in (0, 1], got '0.5'"),
    ({"energy": True}, "--energy must be in (0, 1], got True"),
    ({"target_macs": True}, "--target-macs must be a fraction in (0, 1], got True"),
    ({"max_drop": True}, "--max-drop must be a non-negative number, got True"),
    ({"keep": 0.5, "batch_size": True}, "--batch-size must be a positive integer, got True"),
    ({"target_macs": 0.5, "rank_multiple": True}, "--rank-multiple must be a positive integer, got True"),
    ({"keep": 0.5, "input_shapes": {"x": [0, 6, 11, 11]}}, "each dimension is a positive size or -1"),
    ({"keep": 0.5, "input_shapes": {"x": [-2, 6, 11, 11]}}, "each dimension is a positive size or -1"),
    ({"keep": 0.5, "skip": 3}, "skip must be a name or a list of names, got 3"),
])
def test_bad_python_values_are_one_line_errors(options, message):
    with pytest.raises(OnnxcompError) as raised:
        onnxcomp.compress(conv_model(), _images(), progress=False, check_latency=False, **options)
    assert message in str(raised.value)


def test_numpy_numbers_are_numbers():
    _, report = onnxcomp.compress(conv_model(), _images(), rank=np.int64(2), progress=False, check_latency=False)
    assert report.layers[0].rank == [2] and type(report.settings["ranks"]["rank"]) is int
    _, report = onnxcomp.compress(conv_model(), _images(), keep=np.float32(0.5), progress=False, check_latency=False)
    assert report.settings["ranks"]["keep"] == 0.5


def test_a_string_skip_or_outputs_is_one_name_not_its_characters():
    """Was: skip="Conv" taken as ["C", "o", "n", "v"]."""
    _, report = onnxcomp.compress(_conv_then_gemm(), _images(), rank=4, skip="Conv", progress=False,
                                  check_latency=False)
    assert {row.name: row.status for row in report.layers} == {"Gemm_3": "compressed", "Conv_0": "skipped: --skip"}
    model = conv_model()
    model.graph.output[0].name = "logits"
    model.graph.node[-1].output[0] = "logits"
    _, report = onnxcomp.compress(model, _images(), rank=4, outputs="logits", progress=False, check_latency=False)
    assert report.settings["outputs"] == [{"name": "logits", "weight": 1.0, "axis": None}]


def test_a_model_with_unloaded_external_data_says_so(tmp_path):
    """Was: onnx's ValidationError from wherever the process runs ("... is not regular file")."""
    onnx.save_model(conv_model(), tmp_path / "e.onnx", save_as_external_data=True, location="e.weights",
                    size_threshold=0)
    bare = onnx.load(tmp_path / "e.onnx", load_external_data=False)
    with pytest.raises(OnnxcompError, match="the model's tensor 'w' is external data that was not loaded "
                                            r"\(file 'e.weights'\): pass the model's path"):
        onnxcomp.compress(bare, _images(), keep=0.5, progress=False, check_latency=False)


# ---------------------------------------------------------------- --provider


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_provider_cuda_without_cuda_is_refused_before_calibrating(tmp_path, capsys):
    """Was: minutes of calibration and solving, then a warning from the latency check."""
    from checks import assert_cli_error

    onnx.save(conv_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=_images())
    calls = []
    import onnxcomp.pipeline

    real = onnxcomp.pipeline.collect_statistics
    onnxcomp.pipeline.collect_statistics = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        assert_cli_error(capsys, ["compress", tmp_path / "m.onnx", tmp_path / "o.onnx", "--data", tmp_path / "c.npz",
                                  "--keep", "0.5", "--provider", "cuda", "--quiet"],
                         "--provider cuda: this onnxruntime", no_files_in=tmp_path)
    finally:
        onnxcomp.pipeline.collect_statistics = real
    assert not calls
