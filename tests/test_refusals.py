"""What onnxcomp refuses, and how: every user mistake is one line ``onnxcomp: error: ...``, exit code 2,
no file left behind, and found before the expensive work where that can be checked cheaply.

The cases below are also the README's table "What onnxcomp refuses, and how":
``python tests/test_refusals.py`` prints it from these very cases (the test at the end checks that
the README holds exactly that table).
"""

from __future__ import annotations

import errno
import re
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # run as a script from the checkout: this onnxcomp and the test helpers
    sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import pytest  # noqa: E402

from onnxcomp.errors import OnnxcompError  # noqa: E402
from onnxcomp.io import staged  # noqa: E402

from checks import assert_cli_error, cli_error  # noqa: E402
from models import EXAMPLE, build, conv_model, gemm_model  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"


def _model(folder: Path, model=None, name="model.onnx") -> Path:
    path = folder / name
    onnx.save(model if model is not None else conv_model(), path)
    return path


def _data(folder: Path, name="data.npz", **arrays) -> Path:
    path = folder / name
    np.savez(path, **(arrays or {"x": _images()}))
    return path


def _images(n=20, dtype=np.float32):
    return np.random.default_rng(0).standard_normal((n, 6, 11, 11)).astype(dtype)


def _overflowing(folder):
    """Activations that overflow float32: x * 1e30 * 1e30 before a conv."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[N, 6, 11, 11] x) => (float[N, 8, 11, 11] y) {
        big = Constant <value_float = 1e30> ()
        h = Mul (x, big)
        g = Mul (h, big)
        y = Conv <pads = [1, 1, 1, 1]> (g, w)
    }
    """
    return _model(folder, build(text, w=(8, 6, 3, 3)))


def _zeroed_input():
    """A conv that reads its input times 0: whatever the data, its input never varies."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[N, 6, 11, 11] x) => (float[N, 8, 11, 11] y) {
        zero = Constant <value_float = 0.0> ()
        g = Mul (x, zero)
        y = Conv <pads = [1, 1, 1, 1]> (g, w)
    }
    """
    return build(text, w=(8, 6, 3, 3))


def _shared_weights(folder):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[N, 6, 11, 11] x) => (float[N, 6, 11, 11] z) {
        y = Conv <pads = [1, 1, 1, 1]> (x, w)
        z = Conv <pads = [1, 1, 1, 1]> (y, w)
    }
    """
    return _model(folder, build(text, w=(6, 6, 3, 3)))


def _convtranspose(folder):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[N, 6, 11, 11] x) => (float[N, 8, 22, 22] y) {
        y = ConvTranspose <strides = [2, 2], output_shape = [22, 22]> (x, w)
    }
    """
    return _model(folder, build(text, w=(6, 8, 3, 3)))


def _other_models_stats(folder):
    """Statistics of a model with the same layer inputs but other weights."""
    from onnxcomp.pipeline import calibrate

    stats = folder / "other.npz"
    calibrate(conv_model(seed=5), _images(), progress=False).save(stats)
    return stats


def _nan_file(folder):
    values = _images()
    values[3, 2, 1, 1] = np.nan
    return _data(folder, x=values)


# case id -> (what the user did, the arguments (a function of the case's folder), part of the message)
CASES = {
    "missing model": ("a model file that does not exist",
                      lambda f: ["compress", f / "none.onnx", f / "out.onnx", "--keep", "0.5", "--norm", "frobenius"],
                      "model file not found"),
    "corrupt model": ("a file that is not an ONNX model",
                      lambda f: ["compress", _corrupt(f), f / "out.onnx", "--keep", "0.5", "--norm", "frobenius"],
                      "cannot read ONNX model"),
    "no layers": ("a model without Conv/Gemm/MatMul layers with constant weights",
                  lambda f: ["compress", _model(f, onnx.parser.parse_model(
                      '<ir_version: 8, opset_import: ["" : 17]> net (float[1, 4] x) => (float[1, 4] y) '
                      '{ y = Relu (x) }')), f / "out.onnx", "--keep", "0.5", "--norm", "frobenius",
                      "--fail-if-unchanged"],
                  "no compressible layers"),
    "shared weights only": ("every layer's weight is shared with another node",
                            lambda f: ["compress", _shared_weights(f), f / "out.onnx", "--data", _data(f),
                                       "--target-params", "0.5", "--fail-if-unchanged"],
                            "is shared with 1 other node input"),
    "batch axis not an axis": ("`--batch-axis` with an axis that is not an integer",
                               lambda f: ["compress", _model(f), f / "out.onnx", "--data", _data(f), "--keep", "0.5",
                                          "--batch-axis", "x:last"],
                               "--batch-axis x: the axis must be an integer >= 0 or none"),
    "batch axis of nothing": ("`--batch-axis` naming neither an input nor an output",
                              lambda f: ["compress", _model(f), f / "out.onnx", "--data", _data(f), "--keep", "0.5",
                                         "--batch-axis", "state:1"],
                              "--batch-axis 'state': the model has no input or output of that name"),
    "held input given per sample": ("data for a scalar input given one value per sample",
                                    lambda f: ["compress", _model(f, onnx.parser.parse_model(
                                        '<ir_version: 8, opset_import: ["" : 17]> net (float[N, 4] x, float s) => '
                                        '(float[N, 4] y) { h = Mul (x, s) \n y = Relu (h) }')), f / "out.onnx",
                                        "--data", _data(f, x=np.ones((20, 4), np.float32),
                                                        s=np.ones(20, np.float32)), "--keep", "0.5"],
                                    "input 's' has no sample axis"),
    "output is the input": ("writing the compressed model over the original",
                            lambda f: ["compress", _model(f), f / "model.onnx", "--data", _data(f), "--keep", "0.5"],
                            "is the input model"),
    "statistics over the model": ("`calibrate` writing the statistics over the model",
                                  lambda f: ["calibrate", _model(f), f / "model.onnx", "--data", _data(f)],
                                  "the statistics <dir>/model.onnx is the input model"),
    "statistics over the data": ("`calibrate` writing the statistics over the calibration data",
                                 lambda f: ["calibrate", _model(f), f / "data.npz", "--data", _data(f)],
                                 "is the calibration data (--data)"),
    "output over the data": ("the compressed model written over the calibration data",
                             lambda f: ["compress", _model(f), f / "data.npz", "--data", _data(f), "--keep", "0.5"],
                             "the output <dir>/data.npz is the calibration data (--data)"),
    "output over the statistics": ("the compressed model written over the --stats file",
                                   lambda f: ["compress", _model(f), f / "s.npz", "--stats", _stats(f),
                                              "--keep", "0.5"],
                                   "is the statistics (--stats)"),
    "output over external data": ("the compressed model written over the input's external data file",
                                  lambda f: ["compress", _external_model(f), f / "ext.weights", "--data", _data(f),
                                             "--keep", "0.5"],
                                  "is the input model's external data"),
    "output a hard link of the input": ("an output path that is a hard link of the model",
                                        lambda f: ["compress", _model(f), _hard_link(f / "model.onnx", f / "l.onnx"),
                                                   "--data", _data(f), "--keep", "0.5"],
                                        "is the input model"),
    "report over the output": ("--report naming the compressed model's own path",
                               lambda f: ["compress", _model(f), f / "out.onnx", "--data", _data(f), "--keep", "0.5",
                                          "--report", f / "out.onnx"],
                               "the report <dir>/out.onnx is the output <dir>/out.onnx"),
    "report over the data": ("--report naming the calibration data",
                             lambda f: ["compress", _model(f), f / "out.onnx", "--data", _data(f), "--keep", "0.5",
                                        "--report", f / "data.npz"],
                             "the report <dir>/data.npz is the calibration data (--data)"),
    "report over validation data": ("--report naming the --validation-data file",
                                    lambda f: ["compress", _model(f), f / "out.onnx", "--data", _data(f),
                                               "--validation-data", _data(f, "v.npz"), "--keep", "0.5",
                                               "--report", f / "v.npz"],
                                    "is the validation data (--validation-data)"),
    "bench json over a model": ("`bench --json` naming the compressed model",
                                lambda f: ["bench", _model(f), _model(f, conv_model(seed=1), "small.onnx"),
                                           "--data", _data(f), "--json", f / "small.onnx"],
                                "the JSON output (--json) <dir>/small.onnx is the compressed model"),
    "output is a folder": ("an output path that is a folder",
                           lambda f: ["compress", _model(f), _folder(f), "--data", _data(f), "--keep", "0.5"],
                           "is a folder"),
    "output name too long": ("an output file name longer than the file system allows (NAME_MAX, 255 bytes)",
                             lambda f: ["compress", _model(f), f / ("m" * 251 + ".onnx"), "--data", _data(f),
                                        "--keep", "0.5"],
                             "mmmm.onnx: File name too long"),
    "output path too long": ("an output path longer than PATH_MAX (4096 bytes)",
                             lambda f: ["compress", _model(f), f / ("d/" * 2100 + "out.onnx"), "--data", _data(f),
                                        "--keep", "0.5"],
                             "d/d/out.onnx: File name too long"),
    "output into a folder that takes no file": ("an output in a folder where no file can be created (/proc, a "
                                                "read-only mount: a real probe, before any work)",
                                                lambda f: ["compress", _model(f), "/proc/out.onnx", "--data", _data(f),
                                                           "--keep", "0.5"],
                                                "cannot write output /proc/out.onnx: its folder takes no new file"),
    "report into a folder that takes no file": ("--report in a folder where no file can be created (so the model "
                                                "is not written either)",
                                                lambda f: ["compress", _model(f), f / "out.onnx", "--data", _data(f),
                                                           "--keep", "0.5", "--report", "/proc/r.json"],
                                                "cannot write report /proc/r.json: its folder takes no new file"),
    "data is a FIFO": ("--data naming a FIFO (reading it would block forever)",
                       lambda f: ["compress", _model(f), f / "out.onnx", "--data", _fifo(f), "--keep", "0.5"],
                       "is not a regular file (a FIFO, a device or a socket)"),
    "model is a FIFO": ("a model path naming a FIFO",
                        lambda f: ["compress", _fifo(f), f / "out.onnx", "--data", _data(f), "--keep", "0.5"],
                        "model file <dir>/fifo is not a regular file"),
    "unknown option": ("an option onnxcomp does not have (argparse's errors are one line too)",
                       lambda f: ["compress", _model(f), f / "out.onnx", "--data", _data(f), "--keep", "0.5",
                                  "--rnak", "3"],
                       "unrecognized arguments: --rnak 3 (see onnxcomp compress --help)"),
    "missing argument": ("a command without its required arguments",
                         lambda f: ["compress", _model(f), "--keep", "0.5"],
                         "the following arguments are required: output (see onnxcomp compress --help)"),
    "missing output folder": ("an output in a folder that does not exist",
                              lambda f: ["compress", _model(f), f / "no" / "out.onnx", "--data", _data(f),
                                         "--keep", "0.5"],
                              "output folder does not exist"),
    "missing report folder": ("--report into a folder that does not exist (checked before any work)",
                              lambda f: ["compress", _model(f), f / "out.onnx", "--data", _data(f), "--keep", "0.5",
                                         "--report", f / "no" / "r.json"],
                              "report folder does not exist"),
    "calibrate into missing folder": ("`calibrate` into a folder that does not exist",
                                      lambda f: ["calibrate", _model(f), f / "no" / "s.npz", "--data", _data(f)],
                                      "statistics folder does not exist"),
    "calibrate into a folder": ("`calibrate` into a path that is a folder",
                                lambda f: ["calibrate", _model(f), _folder(f), "--data", _data(f)],
                                "statistics path"),
    "merge another model": ("`calibrate --merge` of statistics collected on another model",
                            lambda f: ["calibrate", _model(f), f / "s.npz", "--data", _data(f), "--merge",
                                       _other_models_stats(f)],
                            "collected on another model"),
    "row mask not an input": ("--row-mask naming something that is not a model input",
                              lambda f: ["compress", _model(f), f / "out.onnx", "--data", _data(f), "--keep", "0.5",
                                         "--row-mask", "attention_mask"],
                              "is not an input of the model"),
    "stats of another model": ("`compress --stats` with statistics of another model",
                               lambda f: ["compress", _model(f), f / "out.onnx", "--stats", _other_models_stats(f),
                                          "--keep", "0.5"],
                               "collected on another model"),
    "skip matches nothing": ("--skip with a name that is no layer",
                             lambda f: ["compress", _model(f), f / "out.onnx", "--data", _data(f), "--keep", "0.5",
                                        "--skip", "/conv9/Conv"],
                             "--skip '/conv9/Conv' matches no compressible layer"),
    "keep out of range": ("--keep outside (0, 1], with data that would fail later (so: checked first)",
                          lambda f: ["compress", _model(f), f / "out.onnx", "--data", _nan_file(f), "--keep", "1.5"],
                          "--keep must be in (0, 1], got 1.5"),
    "rank zero": ("--rank 0", lambda f: ["compress", _model(f), f / "out.onnx", "--data", _nan_file(f), "--rank", "0"],
                  "--rank must be a positive integer"),
    "energy out of range": ("--energy outside (0, 1]",
                            lambda f: ["compress", _model(f), f / "out.onnx", "--data", _nan_file(f),
                                       "--energy", "0"],
                            "--energy must be in (0, 1], got 0.0"),
    "budget out of range": ("a budget fraction outside (0, 1]",
                            lambda f: ["compress", _model(f), f / "out.onnx", "--data", _nan_file(f),
                                       "--target-macs", "1.5"],
                            "--target-macs must be a fraction in (0, 1]"),
    "wrong input name": ("calibration data named for other inputs",
                         lambda f: ["compress", _model(f), f / "out.onnx", "--data", _data(f, image=_images()),
                                    "--keep", "0.5"],
                         "missing input(s) ['x'] and unknown input(s) ['image']"),
    "wrong dtype": ("float64 data for a float32 input (never cast silently)",
                    lambda f: ["compress", _model(f), f / "out.onnx", "--data", _data(f, x=_images(dtype=np.float64)),
                               "--keep", "0.5"],
                    "expected float32 data, got float64"),
    "wrong rank": ("data of the wrong rank",
                   lambda f: ["compress", _model(f), f / "out.onnx", "--data", _data(f, x=_images()[:, 0]),
                              "--keep", "0.5"],
                   "expected rank 4"),
    "nan in data": ("NaN in the calibration data",
                    lambda f: ["compress", _model(f), f / "out.onnx", "--data", _nan_file(f), "--keep", "0.5"],
                    "holds 1 NaN or Inf"),
    "all-zero data": ("all-zero calibration data (copies of one sample: nothing varies)",
                      lambda f: ["compress", _model(f), f / "out.onnx", "--data", _data(f, x=_images() * 0),
                                 "--keep", "0.5"],
                      "calibration samples behind the statistics are all the same sample"),
    "constant layer inputs": ("calibration data whose samples differ but no layer input varies",
                              lambda f: ["compress", _model(f, _zeroed_input()), f / "out.onnx", "--data", _data(f),
                                         "--keep", "0.5"],
                              "every layer input has zero variance on the 12 calibration sample(s): statistics"),
    "empty data": ("no samples", lambda f: ["compress", _model(f), f / "out.onnx", "--data", _data(f, x=_images(0)),
                                            "--keep", "0.5"],
                   "calibration data is empty"),
    "overflowing activations": ("a model whose activations overflow float32 on the data",
                                lambda f: ["compress", _overflowing(f), f / "out.onnx", "--data", _data(f),
                                           "--keep", "0.5"],
                                "layer input 'g' holds"),
    "rank too large": ("a rank larger than the layer",
                       lambda f: ["compress", _model(f), f / "out.onnx", "--data", _data(f), "--rank", "9"],
                       "larger than layer"),
    "cp 4way on a ConvTranspose": ("`--method cp` (4way) on a ConvTranspose with an `output_shape`",
                              lambda f: ["compress", _convtranspose(f), f / "out.onnx", "--data", _data(f),
                                         "--keep", "0.5", "--method", "cp"],
                              "CP 4way does not rewrite ConvTranspose layer"),
    "data norm without data": ("the data norm without data or statistics",
                               lambda f: ["compress", _model(f), f / "out.onnx", "--keep", "0.5"],
                               "the data norm needs calibration data"),
    "max drop without data": ("--max-drop without data to judge by",
                              lambda f: ["compress", _model(f), f / "out.onnx", "--max-drop", "0.1", "--norm",
                                         "frobenius"],
                              "--max-drop needs data"),
    "rank multiple no layer can use": ("--rank-multiple larger than every layer's cheaper ranks (checked before "
                                       "calibration)",
                                       lambda f: _compress(f, "--target-macs", "0.5", "--rank-multiple", "100000"),
                                       "--rank-multiple 100000: no layer has a rank at a multiple of 100000"),
    "rank multiple without a budget": ("--rank-multiple with a per-layer rule, which has no candidates to round",
                                       lambda f: _compress(f, "--keep", "0.5", "--rank-multiple", "8"),
                                       "--rank-multiple rounds the candidate ranks of a budget"),
    "evbmf without tucker2": ("--evbmf with another method than tucker2", lambda f: _compress(f, "--evbmf"),
                              "--evbmf chooses Tucker-2 ranks: use it with --method tucker2 (got --method svd)"),
    "output axis out of range": ("--outputs with a channel axis the output does not have (not taken modulo)",
                                 lambda f: _compress(f, "--keep", "0.5", "--outputs", "y:1:5"),
                                 "--outputs y:1:5: output 'y' has rank 4, so its channel axis is one of -4..3"),
    "input shape of size 0": ("--input-shape with a dimension 0 or below -1",
                              lambda f: _compress(f, "--keep", "0.5", "--input-shape", "x:0,6,11,11"),
                              "bad --input-shape for 'x': [0, 6, 11, 11]: each dimension is a positive size or -1"),
    "bad validation data": ("--validation-data of the wrong dtype (the message names that file)",
                            lambda f: _compress(f, "--keep", "0.5", "--validation-data",
                                                _data(f, "v.npz", x=_images(dtype=np.float64))),
                            "input 'x' (validation batch 0 of <dir>/v.npz): expected float32 data, got float64"),
    "transposed rows of an input": ("a Gemm with transA=1 reading a model input whose samples are not on axis 1",
                                    lambda f: _compress(f, "--keep", "0.5", model=gemm_model("transA = 1", trans_a=True),
                                                        data={"a": np.ones((12, 5), np.float32)}),
                                    "reads its rows along axis 1 of input 'a', but its samples are taken along axis 0"),
    "report over the input model": ("--report naming the input model",
                                    lambda f: _compress(f, "--keep", "0.5", "--report", f / "model.onnx"),
                                    "the report <dir>/model.onnx is the input model <dir>/model.onnx"),
    "unknown output": ("--outputs naming an output the model does not have",
                       lambda f: ["compress", _model(f), f / "out.onnx", "--data", _data(f), "--keep", "0.5",
                                  "--outputs", "boxes:2"],
                       "--outputs names 'boxes'"),
}


def _compress(folder: Path, *options, model=None, data=None) -> list:
    """``compress`` of the conv model (or ``model``) on the images (or the arrays ``data``) into out.onnx."""
    return ["compress", _model(folder, model), folder / "out.onnx", "--data", _data(folder, **(data or {})), *options]


def _stats(folder: Path) -> Path:
    from onnxcomp.pipeline import calibrate

    stats = folder / "s.npz"
    calibrate(conv_model(), _images(), progress=False).save(stats)
    return stats


def _external_model(folder: Path) -> Path:
    """ext.onnx with its weights in ext.weights beside it."""
    path = folder / "ext.onnx"
    onnx.save_model(conv_model(), path, save_as_external_data=True, location="ext.weights", size_threshold=0)
    return path


def _hard_link(target: Path, link: Path) -> Path:
    import os

    if not target.exists():
        _model(target.parent, name=target.name)
    os.link(target, link)
    return link


def _with_quiet(args: list) -> list:
    """``--quiet`` (no progress bars) for the commands that have it."""
    return [*args, "--quiet"] if args[0] in ("compress", "calibrate") else args


def _corrupt(folder: Path) -> Path:
    path = folder / "bad.onnx"
    path.write_bytes(b"garbage" * 100)
    return path


def _fifo(folder: Path) -> Path:
    import os

    path = folder / "fifo"
    os.mkfifo(path)
    return path


def _folder(folder: Path) -> Path:
    path = folder / "a folder"
    path.mkdir()
    return path


@pytest.mark.parametrize("case", CASES)
def test_refused_with_one_line_exit_2_and_no_file(case, tmp_path, capsys):
    _, arguments, message = CASES[case]
    args = arguments(tmp_path)  # builds the inputs: they may be in tmp_path, nothing else may appear
    message = message.replace("<dir>", str(tmp_path))
    assert_cli_error(capsys, _with_quiet(args), message, no_files_in=tmp_path)


def test_a_full_disk_is_a_one_line_error_and_leaves_nothing(tmp_path):
    """ENOSPC while writing (here raised by the writer) is the user's to fix, and no staged file stays."""
    with pytest.raises(OnnxcompError, match="cannot write output .*No space left on device"):
        with staged(tmp_path / "out.onnx") as folder:
            (folder / "out.onnx").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_outputs_are_world_readable_like_every_other_output(tmp_path, capsys):
    from onnxcomp.cli import main

    report, out, stats, bench = (tmp_path / name for name in ("r.json", "out.onnx", "s.npz", "b.json"))
    assert main(["compress", str(EXAMPLE / "digits_cnn.onnx"), str(out), "--data", str(EXAMPLE / "calib.npz"),
                 "--keep", "0.5", "--report", str(report), "--quiet"]) == 0
    assert main(["calibrate", str(EXAMPLE / "digits_cnn.onnx"), str(stats), "--data", str(EXAMPLE / "calib.npz"),
                 "--quiet"]) == 0
    assert main(["bench", str(EXAMPLE / "digits_cnn.onnx"), str(out), "--data", str(EXAMPLE / "heldout.npz"),
                 "--batch-sizes", "1", "--repeats", "3", "--warmup", "1", "--json", str(bench)]) == 0
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (report, out, stats, bench)}
    assert set(modes.values()) == {oct(0o644 & ~_umask())}, modes


def test_a_dynamic_batch_kept_dynamic_by_input_shape(tmp_path, capsys):
    """--input-shape x:-1,... fixes the other dimensions and keeps the batch dynamic (batch-20 data)."""
    from onnxcomp.cli import main

    model, data, out = _model(tmp_path), _data(tmp_path), tmp_path / "out.onnx"
    assert main(["compress", str(model), str(out), "--data", str(data), "--keep", "0.5", "--input-shape",
                 "x:-1,6,11,11", "--quiet"]) == 0, capsys.readouterr().err
    assert out.is_file()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- the README's table


def refusal_table() -> str:
    """The README table of these cases, with the exact message each one gives."""
    rows = ["| what you did | what onnxcomp says (exit code 2, nothing written) |", "| --- | --- |"]
    for what, arguments, _ in CASES.values():
        with tempfile.TemporaryDirectory() as folder:
            message = cli_error(_with_quiet(arguments(Path(folder))))
            message = message.replace(folder, "<dir>").replace("onnxcomp: error: ", "")
        message = re.sub(r"fingerprint \w+, this model \w+", "fingerprint ..., this model ...", message)
        rows.append(f"| {what} | `` {message.strip()} `` |")
    return "\n".join(rows)


def test_the_readme_table_is_these_cases():
    assert refusal_table() in README.read_text(), "regenerate it: python tests/test_refusals.py"


if __name__ == "__main__":
    print(refusal_table())
