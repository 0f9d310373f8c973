"""1-D and 3-D conv patches and their statistics against a loop im2col (itself checked against
onnxruntime's Conv), as test_collect.py does for 2-D."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from onnxcomp.calibration.collect import collect_statistics
from onnxcomp.calibration.patches import im2col
from onnxcomp.model import ConvGeometry, find_layers
from onnxcomp.runtime import make_session

from conv_reference import loop_patches
from models import conv_nd_model

CASES = {
    "1d_pad1": dict(kernel=(3,), pads=[1, 1]),
    "1d_stride2_dilation2": dict(kernel=(3,), strides=[2], dilations=[2], pads=[2, 1]),
    "1d_same_lower": dict(kernel=(4,), strides=[2], auto_pad="SAME_LOWER"),
    "1d_pointwise": dict(kernel=(1,)),
    "3d_pad1": dict(kernel=(3, 3, 3), pads=[1, 1, 1, 1, 1, 1]),
    "3d_mixed": dict(kernel=(2, 3, 1), strides=[2, 1, 1], dilations=[1, 2, 1], pads=[0, 1, 0, 1, 2, 0]),
    "3d_same_upper": dict(kernel=(3, 2, 2), strides=[1, 2, 2], auto_pad="SAME_UPPER"),
    "3d_valid": dict(kernel=(2, 2, 2), strides=[2, 2, 2], auto_pad="VALID"),
}
SIZES = {1: 11, 3: 5}


def _attrs(case) -> str:
    parts = [f"{k} = [{', '.join(map(str, v))}]" for k, v in case.items() if k in ("strides", "dilations", "pads")]
    if "auto_pad" in case:
        parts.append(f'auto_pad = "{case["auto_pad"]}"')
    return ", ".join(parts)


def _case(name):
    case = CASES[name]
    dims = len(case["kernel"])
    model = conv_nd_model(dims, _attrs(case), c_in=3, c_out=4, k=case["kernel"], size=SIZES[dims])
    geometry = {k: v for k, v in case.items() if k != "kernel"}
    return model, case["kernel"], geometry, dims


def _input(dims, samples, seed):
    return np.random.default_rng(seed).standard_normal((samples, 3, *[SIZES[dims]] * dims)).astype(np.float32)


@pytest.mark.parametrize("name", CASES)
def test_loop_patches_are_what_onnxruntime_multiplies(name):
    model, kernel, geometry, dims = _case(name)
    x = _input(dims, 2, 1)
    expected = make_session(model).run(None, {"x": x})[0]
    weight = numpy_helper.to_array(model.graph.initializer[0]).reshape(4, -1).astype(np.float64)
    bias = numpy_helper.to_array(model.graph.initializer[1])
    rows = loop_patches(x, kernel, **geometry) @ weight.T + bias
    got = rows.reshape(2, *expected.shape[2:], 4).transpose(0, dims + 1, *range(1, dims + 1))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", CASES)
def test_im2col_matches_loop_patches(name):
    _, kernel, geometry, dims = _case(name)
    x = _input(dims, 2, 2)
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in geometry.items()}
    np.testing.assert_array_equal(im2col(x, ConvGeometry(kernel, **args)), loop_patches(x, kernel, **geometry))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("block_bytes", [8 * 10 * 5, 2**20])  # a few rows per block, or whole batches
def test_collected_statistics_are_the_loop_patches_sums(name, block_bytes):
    model, kernel, geometry, dims = _case(name)
    layers, skipped = find_layers(model)
    assert not skipped and layers[0].kernel == kernel and layers[0].shape_text == "x".join(map(str, (4, 3, *kernel)))
    x = _input(dims, 5, 3)
    # batch_size 3: two batches of different sizes through the dynamic batch dim.
    stats = collect_statistics(model, layers, x, batch_size=3, progress=False, block_bytes=block_bytes,
                               precision="float64")
    (key, got), = stats.items()
    assert key == layers[0].stats_key
    rows = loop_patches(x, kernel, **geometry)
    assert (got.rows, got.samples) == (len(rows), 5)
    np.testing.assert_allclose(got.gram, rows.T @ rows, rtol=1e-12, atol=1e-12 * np.abs(rows).max() ** 2)
    np.testing.assert_allclose(got.total, rows.sum(0), rtol=1e-12, atol=1e-12 * np.abs(rows).max())
