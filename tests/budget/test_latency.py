"""The latency cost model: timed chains are the chains the passes write, the cache, the budget's accounting."""


import numpy as np
import onnx
import pytest

import onnxcomp
from onnxcomp.budget.candidates import Candidate
from onnxcomp.budget.latency import LatencyTable, layer_model
from onnxcomp.cli import main
from onnxcomp.model import count_macs, find_layers, infer_shapes, with_input_shapes
from onnxcomp.runtime import Timer, make_session

from models import EXAMPLE, conv_model, gemm_model, matmul_model
from timers import MacTimer


def _only_layer(model, shape):
    layers, _ = find_layers(model, shape)
    shapes = infer_shapes(with_input_shapes(model, shape))
    return layers[0], shapes[layers[0].input]


CASES = [
    (conv_model("strides = [2, 2], pads = [1, 0, 2, 1]", c_in=6, c_out=8), {"x": [1, 6, 11, 11]},
     [Candidate("svd", (3,), 0, 0, 0.0), Candidate("tucker2", (4, 3), 0, 0, 0.0), Candidate("cp", (5,), 0, 0, 0.0)]),
    (conv_model('auto_pad = "SAME_UPPER", strides = [2, 1]', c_in=4, c_out=6), {"x": [1, 4, 11, 11]},
     [Candidate("svd", (2,), 0, 0, 0.0), Candidate("cp", (3,), 0, 0, 0.0, form="3way")]),
    (gemm_model("transA = 1, transB = 1", trans_a=True, trans_b=True), {}, [Candidate("svd", (4,), 0, 0, 0.0)]),
    (matmul_model(), {"x": [1, 7, 12]}, [Candidate("svd", (5,), 0, 0, 0.0)]),
]


@pytest.mark.parametrize("model, shape, candidates", CASES)
def test_timed_chains_run_like_the_layer(model, shape, candidates):
    """Each timed model computes the layer's output shape with the chain the pass writes."""
    layer, input_shape = _only_layer(model, shape)
    feed = {layer.input: np.ones(input_shape, np.float32)}
    dense = make_session(layer_model(layer, input_shape)).run(None, feed)[0]
    expected_shape = infer_shapes(with_input_shapes(model, shape))[layer.output]
    assert list(dense.shape) == [1 if d == "N" else d for d in expected_shape]
    for candidate in candidates:
        chain = layer_model(layer, input_shape, candidate)
        ops = [n.op_type for n in chain.graph.node]
        expected = {"svd": 2, "tucker2": 3, "cp": 4 if candidate.form in (None, "4way") else 3}[candidate.method]
        assert ops == [layer.op_type] * expected
        # the first node of the chain has the candidate's rank as its output width
        first_weight = chain.graph.node[0].input[1]
        first = onnx.numpy_helper.to_array(next(i for i in chain.graph.initializer if i.name == first_weight))
        rank = candidate.rank[-1]
        assert rank in first.shape
        assert make_session(chain).run(None, feed)[0].shape == dense.shape


def test_table_measures_once_and_caches_per_machine(tmp_path):
    model = conv_model(c_in=6, c_out=8)
    layer, input_shape = _only_layer(model, {"x": [1, 6, 11, 11]})
    candidate = Candidate("svd", (3,), 0, 0, 0.0)
    table = LatencyTable(MacTimer(), tmp_path / "latency.json")
    first = [table.layer_seconds(layer, input_shape), table.layer_seconds(layer, input_shape, candidate)]
    again = [table.layer_seconds(layer, input_shape), table.layer_seconds(layer, input_shape, candidate)]
    assert first == again and table.measured == 2  # the dense time, the chain's ratio
    assert first[1] < first[0]  # rank 3 of 8 outputs: fewer MACs
    macs = count_macs(layer_model(layer, input_shape, candidate), {"x": input_shape})
    assert first[1] == pytest.approx(1e-5 + 2e-6 * 2 + 1e-9 * macs, rel=1e-12)  # dense * ratio = the chain's time
    table.save()
    reloaded = LatencyTable(MacTimer(), tmp_path / "latency.json")
    assert reloaded.ratio(layer, input_shape, candidate) == first[1] / first[0]
    assert reloaded.measured == 0  # the ratio came from the file
    reloaded.layer_seconds(layer, input_shape)
    assert reloaded.measured == 1  # dense times are taken afresh in every process
    # another machine (here: another timer setting) does not reuse these ratios
    other = LatencyTable(Timer(threads=1, repeats=3, pairs=3), tmp_path / "latency.json")
    assert other.timer.machine() != "mac-timer"
    assert other.ratio(layer, input_shape, candidate) > 0 and other.measured == 2


def test_a_real_timing_is_positive_and_cached(tmp_path):
    model = conv_model(c_in=16, c_out=16, size=24)
    layer, input_shape = _only_layer(model, {"x": [1, 16, 24, 24]})
    table = LatencyTable(Timer(threads=1, repeats=3, pairs=5), tmp_path / "latency.json")
    seconds = table.layer_seconds(layer, input_shape)
    assert 0 < seconds < 0.1
    ratio = table.ratio(layer, input_shape, Candidate("svd", (2,), 0, 0, 0.0))
    assert 0 < ratio < 5
    assert table.layer_seconds(layer, input_shape) == seconds and table.measured == 2


@pytest.fixture()
def mac_machine(tmp_path):
    """compress() options timing on MacTimer, with the latency cache in a fresh folder."""
    return {"timer": MacTimer(), "latency_cache": tmp_path / "latency.json"}


@pytest.mark.parametrize("fraction", [0.5, 0.75])
def test_latency_budget_accounting_is_exact_on_an_additive_machine(mac_machine, fraction):
    """Where latency is a sum over nodes, the table's prediction is the measurement: the run
    overhead of each isolated timing cancels between the dense layers and the chains."""
    model = onnxcomp.load_model(EXAMPLE / "digits_cnn.onnx")
    _, report = onnxcomp.compress(model, EXAMPLE / "calib.npz", target_latency=fraction, progress=False,
                                  sensitivity="off", **mac_machine)
    target = report.settings["target"]
    assert target["predicted"] == pytest.approx(target["achieved"], rel=1e-9)
    assert target["achieved"] <= fraction + 1e-9
    assert target["achieved"] >= fraction - 0.1  # ranks are multiples of 8: a coarse grid on this small model
    # Ranks are multiples of 8, except in conv2 (32 x 288: its largest useful rank 28 holds fewer than
    # MIN_MULTIPLES multiples of 8, so it takes every rank).
    ranks = {row.name: row.rank[0] for row in report.layers if row.method}
    assert ranks and all(r % 8 == 0 for name, r in ranks.items() if name != "/conv2/Conv")
    rows = [row for row in report.layers if row.latency_before is not None]
    assert len(rows) == 6 and all(row.latency_after <= row.latency_before for row in rows)


def test_latency_budget_on_this_machine(tmp_path):
    model = onnxcomp.load_model(EXAMPLE / "digits_cnn.onnx")
    compressed, report = onnxcomp.compress(model, EXAMPLE / "calib.npz", target_latency=0.7, threads=1,
                                           progress=False, sensitivity="off", latency_cache=tmp_path / "latency.json")
    totals = report.totals
    assert 0 < totals["latency_after"] and 0 < totals["latency_before"]
    assert 0 < totals["latency_ratio"] < 1.5 and 0 < totals["latency_wall_ratio"] < 1.5  # accuracy: a benchmark's job
    assert report.settings["target"]["timed"] > 0 and (tmp_path / "latency.json").exists()
    assert "model latency" in report.table()


def test_cli_latency_errors(tmp_path, capsys):
    out = tmp_path / "small.onnx"
    args = ["compress", str(EXAMPLE / "digits_cnn.onnx"), str(out), "--data", str(EXAMPLE / "calib.npz"), "--quiet"]
    assert main(args + ["--target-latency", "1.5"]) == 2
    assert "--target-latency must be a fraction" in capsys.readouterr().err
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert main(args + ["--target-latency", "0.5", "--provider", "cuda"]) == 2
        assert "CUDAExecutionProvider" in capsys.readouterr().err
    assert main(args + ["--target-macs", "0.5", "--rank-multiple", "0"]) == 2
    assert "--rank-multiple" in capsys.readouterr().err
    assert not out.exists()


def test_profile_finds_every_layer_inside_the_optimised_model():
    """onnxruntime renames fused nodes (Conv+Relu in NCHWc is named after the Relu's output):
    the profile still gives each target layer its time, and the layers are most of the total."""
    model = onnxcomp.load_model(EXAMPLE / "digits_cnn.onnx")
    layers, _ = find_layers(model, {"input": [1, 1, 32, 32]})
    feed = {"input": np.load(EXAMPLE / "calib.npz")["input"][:1]}
    result = Timer(threads=1).profile(model, feed, layers, runs=3)
    assert set(result.layers) == {layer.output for layer in layers}
    assert all(seconds > 0 for seconds in result.layers.values())
    assert 0.5 * result.total < sum(result.layers.values()) <= result.total


def test_profile_finds_a_matmul_that_onnxruntime_fused_and_renamed():
    """onnxruntime names some fusions "<node name>/<fusion>/" (PP-OCRv4 rec's CTC head MatMul: 0.72 ms
    profiled as "p2o.MatMul.24/MatmulTransposeFusion/"): once missed, the layer looked 13x faster than it is."""
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[N, 12, 7] x) => (float[N, 7, 9] y) {
        t = Transpose <perm = [0, 2, 1]> (x)
        y = MatMul (t, w)
    }
    """)
    model.graph.node[1].name = "head"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((12, 9), np.float32), "w"))
    layers, _ = find_layers(model, {"x": [1, 12, 7]})
    result = Timer(threads=1).profile(model, {"x": np.ones((1, 12, 7), np.float32)}, layers, runs=2)
    assert set(result.layers) == {"y"} and result.layers["y"] == result.total > 0  # one fused node: all of it
