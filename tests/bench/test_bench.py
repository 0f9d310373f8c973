"""`onnxcomp bench`: output error, agreement, accuracy, sizes, latency, and bad input."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxcomp.bench import bench
from onnxcomp.cli import main
from onnxcomp.errors import OnnxcompError

from checks import assert_cli_error
from models import EXAMPLE, build, gemm_model

FAST = dict(repeats=20, warmup=3)  # enough for a sanity check, quick on a shared machine

MLP = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 16] x) => (float[N, 5] logits, float[N, 32] hidden) {
    hidden = Gemm <transB = 1> (x, w1, b1)
    r = Relu (hidden)
    logits = Gemm <transB = 1> (r, w2, b2)
}
"""


def mlp(seed=0):
    return build(MLP, seed, w1=(32, 16), b1=(32,), w2=(5, 32), b2=(5,))


def weights(model):
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}


def forward(model, x):
    """The MLP in NumPy (float64), independent of onnxruntime."""
    w = weights(model)
    hidden = x.astype(np.float64) @ w["w1"].T + w["b1"]
    logits = np.maximum(hidden, 0) @ w["w2"].T + w["b2"]
    return {"logits": logits, "hidden": hidden}


def perturbed(model, scale=0.05, seed=1):
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    rng = np.random.default_rng(seed)
    for i, tensor in enumerate(copy.graph.initializer):
        value = numpy_helper.to_array(tensor)
        noisy = (value + scale * rng.standard_normal(value.shape) * np.abs(value).mean()).astype(np.float32)
        copy.graph.initializer[i].CopyFrom(numpy_helper.from_array(noisy, tensor.name))
    return copy


def data(samples=50, seed=2):
    return np.random.default_rng(seed).standard_normal((samples, 16)).astype(np.float32)


def run_cli(capsys, *args):
    code = main(["bench", *[str(a) for a in args]])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- the measurements


def test_model_against_itself():
    model = mlp()
    result = bench(model, model, data(), batch_sizes=(1, 8), eval_batch_size=16, **FAST)
    for errors in result.outputs.values():
        assert errors["relative_l2"] == 0 and errors["max_abs"] == 0 and errors["cosine"] == 1.0
    assert result.top1_output == "logits" and result.top1_agreement == 1.0
    assert result.original.params == result.compressed.params == 32 * 16 + 32 + 5 * 32 + 5
    assert result.original.macs_per_sample == 16 * 32 + 32 * 5
    assert result.ratios == {"params": 1.0, "macs_per_sample": 1.0, "file_bytes": 1.0}
    assert [l.batch_size for l in result.latency] == [1, 8]
    for latency in result.latency:
        assert latency.pairs == 20 and latency.warmup == 3
        assert latency.original.p10_ms <= latency.original.median_ms <= latency.original.p90_ms
        # The same model twice: the measurement itself must not favour either side.
        assert 0.5 < latency.ratio < 2.0, latency


def test_perturbed_copy_errors_match_numpy():
    original, changed, x = mlp(), perturbed(mlp()), data(50)
    # 50 samples in batches of 16: the sums must add up across batches (16+16+16+2).
    result = bench(original, changed, x, batch_sizes=(4,), eval_batch_size=16, **FAST)
    a, b = forward(original, x), forward(changed, x)
    for name in ("logits", "hidden"):
        ref, new = a[name].ravel(), b[name].ravel()
        got = result.outputs[name]
        np.testing.assert_allclose(got["relative_l2"], np.linalg.norm(new - ref) / np.linalg.norm(ref), rtol=1e-4)
        np.testing.assert_allclose(got["cosine"], ref @ new / np.linalg.norm(ref) / np.linalg.norm(new), rtol=1e-6)
        np.testing.assert_allclose(got["max_abs"], np.abs(new - ref).max(), rtol=1e-4)
        assert got["relative_l2"] > 1e-3  # really perturbed
    expected = np.mean(a["logits"].argmax(1) == b["logits"].argmax(1))
    assert result.top1_agreement == pytest.approx(expected)


def test_accuracy_with_labels_matches_numpy(tmp_path):
    original, changed, x = mlp(), perturbed(mlp(), scale=0.3), data(60)
    labels = np.random.default_rng(3).integers(0, 5, size=60)
    expected = {
        "original": np.mean(forward(original, x)["logits"].argmax(1) == labels),
        "compressed": np.mean(forward(changed, x)["logits"].argmax(1) == labels),
    }
    from_array = bench(original, changed, x, labels=labels, batch_sizes=(2,), **FAST)
    # The same labels as a key of the .npz: taken as labels, not fed to the model.
    np.savez(tmp_path / "held.npz", x=x, labels=labels)
    from_npz = bench(original, changed, tmp_path / "held.npz", batch_sizes=(2,), **FAST)
    for result in (from_array, from_npz):
        assert result.accuracy["original"] == pytest.approx(expected["original"])
        assert result.accuracy["compressed"] == pytest.approx(expected["compressed"])
    assert from_npz.accuracy["labels"] == "held.npz:labels"
    assert from_npz.inputs == {"x": [60, 16]}


def test_fixed_batch_model_pads_the_last_batch():
    """A model with a fixed batch of 5 and 12 samples: 3 runs, the last padded, its extra rows dropped."""
    original, changed = gemm_model(seed=0), gemm_model(seed=4)
    a = np.random.default_rng(5).standard_normal((12, 12)).astype(np.float32)
    result = bench(original, changed, a, batch_sizes=(1, 32), **FAST)
    w_a, w_b = weights(original), weights(changed)
    ref = a.astype(np.float64) @ w_a["w"] + w_a["c"]
    new = a.astype(np.float64) @ w_b["w"] + w_b["c"]
    np.testing.assert_allclose(result.outputs["y"]["relative_l2"],
                               np.linalg.norm(new - ref) / np.linalg.norm(ref), rtol=1e-4)
    assert result.top1_agreement == pytest.approx(np.mean(ref.argmax(1) == new.argmax(1)))
    assert [l.batch_size for l in result.latency] == [5]
    assert any("fixed batch size of 5" in note for note in result.notes)


def test_reader_data_is_read_through():
    """A CalibrationDataReader-style object (get_next() -> dict or None) gives the same result as the array."""
    x = data(30)

    class Reader:
        def __init__(self):
            self.batches = iter([{"x": x[:7]}, {"x": x[7:20]}, {"x": x[20:]}])

        def get_next(self):
            return next(self.batches, None)

    model, changed = mlp(), perturbed(mlp())
    from_reader = bench(model, changed, Reader(), batch_sizes=(1,), **FAST)
    from_array = bench(model, changed, x, batch_sizes=(1,), **FAST)
    assert from_reader.samples == 30
    assert from_reader.outputs["logits"]["relative_l2"] == pytest.approx(from_array.outputs["logits"]["relative_l2"])


def test_file_size_counts_external_data(tmp_path):
    model = mlp()
    onnx.save_model(model, tmp_path / "inline.onnx")
    onnx.save_model(model, tmp_path / "split.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="split.onnx.data", size_threshold=0)
    result = bench(tmp_path / "inline.onnx", tmp_path / "split.onnx", data(8), batch_sizes=(1,), **FAST)
    split = (tmp_path / "split.onnx").stat().st_size + (tmp_path / "split.onnx.data").stat().st_size
    assert result.compressed.file_bytes == split
    assert result.original.file_bytes == (tmp_path / "inline.onnx").stat().st_size
    assert result.outputs["logits"]["relative_l2"] == 0


def test_nonfinite_outputs_are_reported_and_json_stays_valid(tmp_path):
    broken = mlp()
    w2 = numpy_helper.to_array(broken.graph.initializer[2]).copy()
    w2[0, 0] = np.nan
    broken.graph.initializer[2].CopyFrom(numpy_helper.from_array(w2, "w2"))
    result = bench(mlp(), broken, data(10), batch_sizes=(1,), **FAST)
    assert result.outputs["logits"]["nonfinite"] > 0
    result.save(tmp_path / "out.json")
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["outputs"]["logits"]["relative_l2"] is None


# ---------------------------------------------------------------- the command line


def test_cli_on_the_example_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    model = EXAMPLE / "digits_cnn.onnx"
    code, stdout, err = run_cli(capsys, model, model, "--data", EXAMPLE / "heldout.npz",
                                "--batch-sizes", "1", "8", "--repeats", "10", "--warmup", "2", "--json", out)
    assert code == 0, err
    assert "top-1 agreement (logits): 100.00% (500/500)" in stdout
    assert "99.80%" in stdout and f"wrote {out}" in stdout
    saved = json.loads(out.read_text())
    assert set(saved) == {"original", "compressed", "ratios", "data", "outputs", "top1_output", "top1_agreement",
                          "accuracy", "latency", "settings", "notes", "reach", "subnormals"}
    assert saved["data"] == {"samples": 500, "inputs": {"input": [500, 1, 32, 32]}}
    assert saved["accuracy"]["original"] == saved["accuracy"]["compressed"] == pytest.approx(0.998)
    assert saved["outputs"]["logits"]["relative_l2"] == 0 and saved["top1_agreement"] == 1.0
    assert saved["original"]["macs_per_sample"] == 16_876_160 and saved["original"]["params"] == 131_242
    assert [l["batch_size"] for l in saved["latency"]] == [1, 8]
    assert {"median_ms", "p10_ms", "p25_ms", "p75_ms", "p90_ms", "min_ms"} <= set(saved["latency"][0]["original"])


def test_floor_of_a_compressed_model(tmp_path, capsys):
    """The floor needs each layer's MACs kept: found again in the compressed model as its chain."""
    import onnxcomp

    original = onnxcomp.load_model(EXAMPLE / "digits_cnn.onnx")
    compressed, report = onnxcomp.compress(original, EXAMPLE / "calib.npz", rank=8, progress=False,
                                           check_latency=False)
    held_out = {"input": np.load(EXAMPLE / "heldout.npz")["input"][:40]}
    result = bench(original, compressed, held_out, batch_sizes=(1, 4), threads=1, **FAST)
    kept = result.reach["kept"]
    # conv2 (32x32x3x3) at rank 8: a 3x3 conv 32 -> 8 and a 1x1 conv 8 -> 32 at the same positions
    assert kept["/conv2/Conv"] == pytest.approx(8 * (32 * 9 + 32) / (32 * 32 * 9), rel=1e-12)
    rows = {row.name: row for row in report.layers}
    assert kept == pytest.approx({name: row.macs_after / row.macs_before for name, row in rows.items()}, rel=1e-12)
    for latency in result.latency:
        assert 0 < latency.rewritable_share <= 1 and 0 < latency.floor < 1
        # what the floor is: the untouched share + each layer's share x its MACs kept, so at least
        # the smallest fraction any layer keeps, and at most 1
        assert latency.floor >= min(kept.values()) * latency.rewritable_share + (1 - latency.rewritable_share) - 1e-9
    assert "floor" in result.table() and "rewritable" in result.table()
    assert result.to_dict()["latency"][0]["floor"] == result.latency[0].floor
    assert result.subnormals == {which: {"values": 0, "tensors": 0, "flushed_ratio": None}
                                 for which in ("original", "compressed")}


def test_subnormal_weights_counted_and_what_flushing_buys_timed(tmp_path):
    model = mlp()
    w1 = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w1[:4] = 1e-39  # four dead output channels
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "w1"))
    from onnxcomp.model import flush_model

    flushed, _ = flush_model(model)
    result = bench(model, flushed, data(), batch_sizes=(1,), **FAST)
    original = result.subnormals["original"]
    assert (original["values"], original["tensors"]) == (4 * 16, 1)
    assert original["flushed_ratio"] > 0  # its value is this machine's: a benchmark's business
    assert result.subnormals["compressed"] == {"values": 0, "tensors": 0, "flushed_ratio": None}
    assert "subnormal weights: the original model holds 64 in 1 tensor(s); with them set to 0" in result.table()
    assert result.outputs["logits"]["max_abs"] < 1e-30  # numerically the same model


def test_no_floor(tmp_path, capsys):
    model = tmp_path / "mlp.onnx"
    onnx.save_model(mlp(), model)
    np.save(tmp_path / "x.npy", data(20))
    out = tmp_path / "bench.json"
    code, stdout, err = run_cli(capsys, model, model, "--data", tmp_path / "x.npy", "--batch-sizes", "1",
                                "--repeats", "5", "--warmup", "1", "--no-floor", "--json", out)
    assert code == 0, err
    saved = json.loads(out.read_text())
    assert saved["reach"] is None and saved["subnormals"] is None and saved["latency"][0]["floor"] is None
    assert "Amdahl" not in stdout and "rewritable" not in stdout


def test_cli_labels_file(tmp_path, capsys):
    model = tmp_path / "mlp.onnx"
    onnx.save_model(mlp(), model)
    x, labels = data(20), np.arange(20) % 5
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", labels)
    code, stdout, err = run_cli(capsys, model, model, "--data", tmp_path / "x.npy", "--labels", tmp_path / "y.npy",
                                "--batch-sizes", "1", "--repeats", "5", "--warmup", "1")
    assert code == 0, err
    accuracy = np.mean(forward(mlp(), x)["logits"].argmax(1) == labels)
    assert f"{accuracy:.2%}" in stdout


def _bad(tmp_path, what):
    model = tmp_path / "mlp.onnx"
    onnx.save_model(mlp(), model)
    good = tmp_path / "good.npz"
    np.savez(good, x=data(10))
    cases = {
        "missing model": ([tmp_path / "nope.onnx", model, "--data", good], "model file not found"),
        "missing data": ([model, model, "--data", tmp_path / "nope.npz"], "data file not found"),
        "wrong names": ([model, model, "--data", "WRONG"], "missing input(s) ['x'] and unknown input(s) ['image']"),
        "nan": ([model, model, "--data", "NAN"], "NaN or Inf"),
        "float64": ([model, model, "--data", "F64"], "expected float32 data, got float64"),
        "label count": ([model, model, "--data", good, "--labels", "LABELS"], "3 labels"),
        "label range": ([model, model, "--data", "RANGE"], "scores 5 classes"),
        "cuda": ([model, model, "--data", good, "--provider", "cuda"], "no CUDAExecutionProvider"),
    }
    args, message = cases[what]
    np.savez(tmp_path / "wrong.npz", image=data(10))
    bad = data(10)
    bad[3, 4] = np.nan
    np.savez(tmp_path / "nan.npz", x=bad)
    np.save(tmp_path / "labels.npy", np.zeros(3, dtype=np.int64))
    np.save(tmp_path / "f64.npy", data(10).astype(np.float64))
    np.savez(tmp_path / "range.npz", x=data(10), labels=np.arange(10))
    swap = {"WRONG": tmp_path / "wrong.npz", "NAN": tmp_path / "nan.npz", "LABELS": tmp_path / "labels.npy",
            "F64": tmp_path / "f64.npy", "RANGE": tmp_path / "range.npz"}
    return [swap.get(a, a) for a in args], message


BAD_INPUTS = ["missing model", "missing data", "wrong names", "nan", "float64", "label count", "label range", "cuda"]


@pytest.mark.parametrize("what", BAD_INPUTS)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, what):
    if what == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    args, message = _bad(tmp_path, what)
    assert_cli_error(capsys, ["bench", *args, "--repeats", "2", "--warmup", "0"], message, no_files_in=tmp_path)


def test_api_rejects_bad_options():
    model = mlp()
    with pytest.raises(OnnxcompError, match="batch sizes"):
        bench(model, model, data(4), batch_sizes=(0,))
    with pytest.raises(OnnxcompError, match="unknown provider"):
        bench(model, model, data(4), provider="tpu")
    other = build(MLP.replace("float[N, 16] x", "float[N, 16] z").replace("(x, w1", "(z, w1"),
                  w1=(32, 16), b1=(32,), w2=(5, 32), b2=(5,))
    with pytest.raises(OnnxcompError, match="inputs differ"):
        bench(model, other, data(4))
