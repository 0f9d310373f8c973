"""The command line end to end: the embedded example, and every kind of bad input."""

import json

import numpy as np
import onnx
import pytest

from onnxcomp.cli import main
from onnxcomp.model import count_macs, load_model
from onnxcomp.runtime import make_session

from checks import assert_cli_error
from models import EXAMPLE, conv_model


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_compress_example_end_to_end(tmp_path, capsys):
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    code, stdout, _ = run_cli(capsys, "compress", EXAMPLE / "digits_cnn.onnx", out,
                              "--data", EXAMPLE / "calib.npz", "--keep", "0.5", "--report", report, "--quiet")
    assert code == 0, stdout
    assert "fidelity (held-out, 26 calibration samples held out of the statistics): standardised error" in stdout
    data = json.loads(report.read_text())
    assert set(data) == {"settings", "totals", "fidelity", "latency", "warnings", "seconds", "layers", "blocks"}
    assert data["blocks"] is None  # a CNN: no transformer block parts
    assert data["fidelity"]["held_out"] and data["fidelity"]["samples"] == 26
    # fc1 reads 1024 features and the statistics hold 230 rows: its fit is said to be under-determined
    # (the latency guard may add a warning of its own: what it flags depends on this machine)
    data_warnings = [w for w in data["warnings"] if "run slower than they should" not in w]
    assert len(data_warnings) == 1 and "'/fc1/Gemm': 230 rows for 1024 dimensions" in data_warnings[0]
    # measured after writing: at batch 1 and at the calibration batch (32), with the Amdahl floor
    assert [b["batch"] for b in data["latency"]["batches"]] == [1, 32]
    assert all(0 < b["share"] <= 1 and 0 < b["floor"] < 1 for b in data["latency"]["batches"])
    assert "Amdahl floor of this compression" in stdout
    totals = data["totals"]
    assert totals["macs_after"] < 0.6 * totals["macs_before"]
    assert totals["layers_compressed"] >= 4
    compressed = load_model(out)
    onnx.checker.check_model(compressed, full_check=True)
    # The reported model MACs are what the written file really has.
    assert count_macs(compressed, {"input": [1, 1, 32, 32]}) == totals["macs_after"]
    held_out = np.load(EXAMPLE / "heldout.npz")
    logits = make_session(compressed).run(None, {"input": held_out["input"]})[0]
    assert (logits.argmax(1) == held_out["labels"]).mean() > 0.75  # 0.818 measured; the original has 0.998
    rows = {row["name"]: row for row in data["layers"]}
    assert rows["/conv2/Conv"]["status"] == "compressed" and 0 < rows["/conv2/Conv"]["relative_error"] < 1


def test_calibrate_then_compress_with_stats(tmp_path, capsys):
    stats = tmp_path / "stats.npz"
    code, stdout, _ = run_cli(capsys, "calibrate", EXAMPLE / "digits_cnn.onnx", stats,
                              "--data", EXAMPLE / "calib.npz", "--quiet")
    assert code == 0 and stats.is_file()
    out = tmp_path / "small.onnx"
    code, stdout, _ = run_cli(capsys, "compress", EXAMPLE / "digits_cnn.onnx", out, "--stats", stats,
                              "--energy", "0.9", "--quiet")
    assert code == 0 and out.is_file()


def test_inspect_lists_layers(capsys):
    code, stdout, _ = run_cli(capsys, "inspect", EXAMPLE / "digits_cnn.onnx")
    assert code == 0
    assert "/conv2/Conv" in stdout and "32x32x3x3" in stdout and "6 compressible layers" in stdout


@pytest.fixture
def small_model(tmp_path):
    path = tmp_path / "conv.onnx"
    onnx.save(conv_model(), path)
    return path


def save_data(tmp_path, **arrays):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def good_data():
    return np.random.default_rng(0).standard_normal((8, 6, 11, 11)).astype(np.float32)


def expect_error(capsys, tmp_path, args, message):
    """``args`` with an output file in tmp_path after the input model: the error contract, no output written."""
    command, model, *options = args
    args = [command, model, tmp_path / "out.onnx", *options, "--quiet"]
    assert_cli_error(capsys, args, message, no_files_in=tmp_path)


@pytest.mark.parametrize("form", ["4way", "3way"])
def test_cp_method_end_to_end(capsys, tmp_path, small_model, form):
    data = save_data(tmp_path, x=good_data())
    out, report = tmp_path / "cp.onnx", tmp_path / "cp.json"
    code, stdout, _ = run_cli(capsys, "compress", small_model, out, "--data", data, "--method", "cp",
                              "--cp-form", form, "--rank", "3", "--report", report, "--quiet")
    assert code == 0, stdout
    row = json.loads(report.read_text())["layers"][0]
    assert row["method"] == "cp" and row["rank"] == [3] and row["info"]["form"] == form
    ops = [n.op_type for n in load_model(out).graph.node]
    assert ops.count("Conv") == (4 if form == "4way" else 3)


DEPTHWISE = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 4, 6, 6] x) => (float[N, 4, 6, 6] y) {
    y = Conv <group = 4, pads = [1, 1, 1, 1]> (x, W)
}
"""


def test_a_model_whose_layers_all_stay_dense_is_written_unchanged(tmp_path, capsys):
    from models import build

    model = build(DEPTHWISE, W=(4, 1, 3, 3))
    source, out, data = tmp_path / "dw.onnx", tmp_path / "out.onnx", tmp_path / "c.npz"
    onnx.save(model, source)
    x = np.random.default_rng(0).standard_normal((20, 4, 6, 6)).astype(np.float32)
    np.savez(data, x=x)
    assert main(["compress", str(source), str(out), "--data", str(data), "--target-macs", "0.5", "--quiet",
                 "--report", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "depthwise" in printed and "the model is written unchanged" in printed
    assert load_model(out) == model
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["totals"]["macs_before"] == report["totals"]["macs_after"] == 4 * 9 * 36
    assert_cli_error(capsys, ["compress", source, tmp_path / "o2.onnx", "--data", data, "--target-macs", "0.5",
                              "--fail-if-unchanged"], "no compressible layers", None)
    assert not (tmp_path / "o2.onnx").exists()


def test_the_readme_lists_every_python_option_with_its_default():
    import inspect
    from pathlib import Path

    from onnxcomp.config import CompressConfig

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    python = readme[readme.index("## Python"):readme.index("## The report")]
    for name, parameter in inspect.signature(CompressConfig.from_options).parameters.items():
        default = parameter.default
        shown = f'"{default}"' if isinstance(default, str) else repr(default)
        assert f"`{name}={shown}`" in python, f"the README's Python options miss {name}={shown}"
