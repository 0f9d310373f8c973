"""Calibration products: float32 per block (the default) and float64, and stride-1 convs by shifts.

References are float64 NumPy products of explicit im2col patches (``im2col`` is
itself checked against loop-built patches and onnxruntime's Conv in test_collect.py).

The float32 tolerance: each entry of a block's Gram is a sum of at most
``FLOAT32_BLOCK_ROWS`` = 8192 products rounded to float32 (unit roundoff
u = 2^-24 = 6e-8), and the blocks are then summed in float64. Rounding errors of
such sums grow like sqrt(n) u (the worst case n u is never approached by random
signs), so an entry is off by about sqrt(8192) u = 5.4e-6 of the scale
``sqrt(sum x_i^2 sum x_j^2)`` (Cauchy-Schwarz bounds sum |x_i x_j| by it) at
most; the tests allow twice that. float64 must agree to 1e-12 of that scale.
"""

from __future__ import annotations

import numpy as np
import pytest

import onnxcomp
from onnxcomp.calibration.collect import FLOAT32_BLOCK_ROWS, collect_statistics
from onnxcomp.calibration.patches import im2col
from onnxcomp.calibration.shifts import shift_plan
from onnxcomp.config import CompressConfig
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import ConvGeometry, find_layers

from checks import assert_cli_error
from models import EXAMPLE, conv_model, gemm_model

FLOAT32_TOLERANCE = 2 * np.sqrt(FLOAT32_BLOCK_ROWS) * 2.0**-24  # 1.1e-5
FLOAT64_TOLERANCE = 1e-12


def _assert_close(stats, rows, samples, tolerance):
    """Statistics against float64 sums of ``rows``, entry by entry on the scale sqrt(G_ii G_jj)."""
    rows = np.asarray(rows, dtype=np.float64)
    gram, total = rows.T @ rows, rows.sum(axis=0)
    assert stats.rows == len(rows) and stats.samples == samples
    np.testing.assert_array_equal(stats.gram, stats.gram.T)
    diag = np.sqrt(np.diag(gram))
    assert np.all(np.abs(stats.gram - gram) <= tolerance * np.outer(diag, diag) + 1e-300)
    assert np.all(np.abs(stats.total - total) <= tolerance * np.sqrt(len(rows)) * diag + 1e-300)


# ---------------------------------------------------------------- stride-1 convs by shifts

SHIFT_CASES = {
    "3x3_pad1": (ConvGeometry((3, 3), pads=(1, 1, 1, 1)), (2, 5, 7, 6)),
    "3x3_valid": (ConvGeometry((3, 3)), (2, 3, 7, 6)),
    "5x3_dilated_asymmetric": (ConvGeometry((5, 3), pads=(2, 0, 1, 1), dilations=(2, 1)), (3, 4, 9, 8)),
    "pads_larger_than_kernel": (ConvGeometry((3, 3), pads=(3, 0, 0, 2)), (2, 3, 5, 6)),
    "2x3_asymmetric": (ConvGeometry((2, 3), pads=(0, 2, 1, 0)), (2, 3, 9, 8)),
    "same_lower": (ConvGeometry((2, 2), auto_pad="SAME_LOWER"), (2, 3, 9, 8)),
    "same_upper": (ConvGeometry((3, 2), auto_pad="SAME_UPPER"), (2, 3, 9, 8)),
    "tiny_image": (ConvGeometry((3, 3), pads=(1, 1, 1, 1)), (2, 3, 2, 2)),
    "tiny_dilated": (ConvGeometry((3, 3), pads=(2, 2, 2, 2), dilations=(2, 2)), (2, 3, 2, 3)),
}


@pytest.mark.parametrize("name", SHIFT_CASES)
@pytest.mark.parametrize("block_rows", [1, 7, 10**6])
def test_shifted_products_are_the_patch_gram(name, block_rows):
    """Exact in float64 whatever the pads, dilations and blocks (with shifts forced where they cost more)."""
    geometry, shape = SHIFT_CASES[name]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) + 0.5
    plan = shift_plan(shape, geometry, always=True)
    gram, total = plan.reduce(x, np.float64, block_rows)
    patches = im2col(x, geometry)  # (c, i, j) order; the plan's is (i, j, c)
    kh, kw = geometry.kernel
    order = np.arange(plan.dim).reshape(shape[1], kh, kw).transpose(1, 2, 0).reshape(-1)
    patches = patches[:, order]
    expected = patches.T @ patches
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.triu(gram), np.triu(expected), rtol=0, atol=FLOAT64_TOLERANCE * scale)
    np.testing.assert_allclose(total, patches.sum(axis=0), rtol=0, atol=FLOAT64_TOLERANCE * scale)


def test_shifts_are_used_where_they_pay():
    """Stride-1 kxk convs on images of some size; not strided or 1x1 convs, nor tiny images."""
    same = ConvGeometry((3, 3), pads=(1, 1, 1, 1))
    assert shift_plan((32, 64, 40, 40), same).macs() < 0.45 * 32 * 1600 * 576 * 577 / 2
    assert shift_plan((32, 64, 40, 40), ConvGeometry((3, 3), strides=(2, 2), pads=(1, 1, 1, 1))) is None
    assert shift_plan((32, 64, 40, 40), ConvGeometry((1, 1))) is None
    assert shift_plan((32, 64, 2, 2), same) is None


# ---------------------------------------------------------------- float32 and float64 statistics

MODELS = {
    "conv_stride1": (lambda: conv_model("pads = [1, 1, 1, 1]", c_in=6, size=20), (6, 6, 20, 20)),
    "conv_stride2": (lambda: conv_model("pads = [1, 1, 1, 1], strides = [2, 2]", c_in=6, size=20), (6, 6, 20, 20)),
    "conv_1x1": (lambda: conv_model("pads = [0, 0, 0, 0]", c_in=6, k=1, size=20), (6, 6, 20, 20)),
    "gemm": (lambda: gemm_model(m=50, k=12, n=9), (50, 12)),
}


def _rows(model, x):
    layer = find_layers(model)[0][0]
    if layer.conv is None:
        return x.reshape(-1, layer.in_features)
    return im2col(x, layer.conv)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_statistics_agree_with_float64_numpy(name, precision):
    build, shape = MODELS[name]
    model = build()
    layers, _ = find_layers(model)
    x = (np.random.default_rng(1).standard_normal(shape) + 0.7).astype(np.float32)  # a mean, as after SiLU
    # block_bytes: many blocks in both precisions (rows of 55 float32 values: 80 rows per block)
    stats = collect_statistics(model, layers, x, batch_size=4, progress=False, precision=precision,
                               block_bytes=80 * 55 * 4)
    tolerance = FLOAT32_TOLERANCE if precision == "float32" else FLOAT64_TOLERANCE
    _assert_close(stats[layers[0].stats_key], _rows(model, x), shape[0], tolerance)


@pytest.mark.parametrize("name", MODELS)
def test_activations_too_large_for_float32_products_are_summed_in_float64(name):
    """Deep random-weight models reach activations of 1e20: their float32 squares overflow to inf,
    so those layer inputs take float64 products (the statistics stay finite and exact)."""
    build, shape = MODELS[name]
    model = build()
    layers, _ = find_layers(model)
    x = (1e20 * (np.random.default_rng(4).standard_normal(shape) + 0.7)).astype(np.float32)
    stats = collect_statistics(model, layers, x, batch_size=4, progress=False, precision="float32")
    entry = stats[layers[0].stats_key]
    assert np.isfinite(entry.gram).all()
    _assert_close(entry, _rows(model, x), shape[0], FLOAT64_TOLERANCE)


def test_float32_sums_do_not_grow_with_the_data():
    """Blocks of float32 products are summed in float64: 40 blocks of one row pattern sum to
    40 times one block's Gram to float64 accuracy, not float32's."""
    model = gemm_model(m=FLOAT32_BLOCK_ROWS, k=12, n=9)
    layers, _ = find_layers(model)
    x = (np.random.default_rng(2).standard_normal((FLOAT32_BLOCK_ROWS, 12)) + 0.7).astype(np.float32)
    one = collect_statistics(model, layers, [x], progress=False)[layers[0].stats_key]
    many = collect_statistics(model, layers, [x] * 40, progress=False)[layers[0].stats_key]
    np.testing.assert_allclose(many.gram, 40 * one.gram, rtol=1e-13)


def test_digits_example_agrees_across_precisions():
    """On the real layers of the example, float32 statistics are within the tolerance of float64's."""
    from onnxcomp.calibration.readers import read_arrays
    from onnxcomp.model import load_model

    model = load_model(EXAMPLE / "digits_cnn.onnx")
    data = read_arrays(EXAMPLE / "calib.npz", archive=True)
    s32, s64 = (onnxcomp.calibrate(model, data, progress=False, precision=p) for p in ("float32", "float64"))
    for key, exact in s64.items():
        diag = np.sqrt(np.diag(exact.gram))
        assert np.all(np.abs(s32[key].gram - exact.gram) <= FLOAT32_TOLERANCE * np.outer(diag, diag) + 1e-300), key


# ---------------------------------------------------------------- the option


def test_bad_precision_is_a_one_line_error(tmp_path, capsys):
    model = conv_model()
    layers, _ = find_layers(model)
    x = np.zeros((2, 6, 11, 11), np.float32)
    with pytest.raises(OnnxcompError, match="--precision: unknown value 'float16', use one of float32, float64"):
        collect_statistics(model, layers, x, progress=False, precision="float16")
    with pytest.raises(OnnxcompError, match="--precision: unknown value 'double'"):
        CompressConfig.from_options(rank=2, precision="double")
    for command in (["calibrate", EXAMPLE / "digits_cnn.onnx", tmp_path / "s.npz"],
                    ["compress", EXAMPLE / "digits_cnn.onnx", tmp_path / "out.onnx", "--rank", "2"]):
        assert_cli_error(capsys, [*command, "--data", EXAMPLE / "calib.npz", "--precision", "half", "--quiet"],
                         "--precision: unknown value 'half', use one of float32, float64", no_files_in=tmp_path)


def test_precision_reaches_the_statistics(tmp_path, capsys):
    """``calibrate --precision float64`` and the API give the same sums; float32 differs a little."""
    from onnxcomp.calibration.stats import Statistics
    from onnxcomp.cli import main

    path = tmp_path / "stats.npz"
    args = ["calibrate", EXAMPLE / "digits_cnn.onnx", path, "--data", EXAMPLE / "calib.npz", "--quiet"]
    assert main([str(a) for a in [*args, "--precision", "float64"]]) == 0
    from_cli = Statistics.load(path)
    from onnxcomp.calibration.readers import read_arrays
    from onnxcomp.model import load_model

    model, data = load_model(EXAMPLE / "digits_cnn.onnx"), read_arrays(EXAMPLE / "calib.npz", archive=True)
    exact = onnxcomp.calibrate(model, data, progress=False, precision="float64")
    single = onnxcomp.calibrate(model, data, progress=False)
    for key, stats in exact.items():
        np.testing.assert_array_equal(from_cli[key].gram, stats.gram)
    assert any(not np.array_equal(single[key].gram, stats.gram) for key, stats in exact.items())
