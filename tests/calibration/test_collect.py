"""Calibration: readers, im2col, and statistics from both instrumentation methods.

References are independent of the code under test: patches come from explicit
Python loops over output positions (and are checked against onnxruntime's own
Conv), Gram matrices from float64 NumPy products.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader

import onnxcomp
from onnxcomp.calibration.collect import collect_statistics
from onnxcomp.calibration.patches import im2col
from onnxcomp.calibration.readers import count_samples, iter_feeds
from onnxcomp.calibration.stats import Statistics
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import ConvGeometry, find_layers, load_model

RTOL = 1e-6


# ---------------------------------------------------------------- helpers


def _model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _conv_model(channels, out_channels, kernel, seed=0, **attrs):
    """x -> Relu -> Conv(attrs): the conv reads an intermediate tensor."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((out_channels, channels, *kernel)).astype(np.float32)
    bias = rng.standard_normal(out_channels).astype(np.float32)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Conv", ["r", "w", "b"], ["y"], kernel_shape=list(kernel), **attrs),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_channels, None, None])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )


def _same_pads(size, kernel, stride, dilation, upper):
    """ONNX auto_pad SAME_*: output ceil(size / stride), the odd pad at the end (UPPER) or start (LOWER)."""
    out = -(-size // stride)
    total = max(0, (out - 1) * stride + (kernel - 1) * dilation + 1 - size)
    small = total // 2
    return (small, total - small) if upper else (total - small, small)


def _naive_patches(x, kernel, strides=(1, 1), dilations=(1, 1), pads=(0, 0, 0, 0), auto_pad="NOTSET"):
    """im2col by explicit loops: one row per output position, (c, i, j) order, zeros outside the input."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        upper = auto_pad == "SAME_UPPER"
        (top, bottom), (left, right) = (
            _same_pads(h, kh, sh, dh, upper), _same_pads(w, kw, sw, dw, upper),
        )
    elif auto_pad == "VALID":
        top = left = bottom = right = 0
    else:
        top, left, bottom, right = pads
    out_h = (h + top + bottom - (kh - 1) * dh - 1) // sh + 1
    out_w = (w + left + right - (kw - 1) * dw - 1) // sw + 1
    rows = []
    for sample in range(n):
        for oy in range(out_h):
            for ox in range(out_w):
                row = []
                for ch in range(c):
                    for i in range(kh):
                        for j in range(kw):
                            yy, xx = oy * sh + i * dh - top, ox * sw + j * dw - left
                            inside = 0 <= yy < h and 0 <= xx < w
                            row.append(float(x[sample, ch, yy, xx]) if inside else 0.0)
                rows.append(row)
    return np.array(rows)


def _reference(rows):
    rows = np.asarray(rows, dtype=np.float64)
    return rows.T @ rows, rows.sum(axis=0)


def _assert_stats(stats, rows, samples):
    gram, total = _reference(rows)
    assert stats.rows == len(rows)
    assert stats.samples == samples
    np.testing.assert_array_equal(stats.gram, stats.gram.T)
    scale = np.abs(gram).max()
    np.testing.assert_allclose(stats.gram, gram, rtol=RTOL, atol=RTOL * scale)
    np.testing.assert_allclose(stats.total, total, rtol=RTOL, atol=RTOL * np.abs(total).max())


def _only(statistics):
    assert len(statistics) == 1
    return next(iter(statistics.values()))


def _run(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


# ---------------------------------------------------------------- conv patches

CONV_CASES = {
    "stride2": dict(kernel=(3, 3), strides=[2, 2], pads=[1, 1, 1, 1]),
    "dilation2": dict(kernel=(3, 3), dilations=[2, 2], pads=[2, 1, 2, 1]),
    "asymmetric_pads": dict(kernel=(2, 3), pads=[0, 2, 1, 0]),
    "same_upper": dict(kernel=(2, 2), strides=[2, 2], auto_pad="SAME_UPPER"),
    "same_lower": dict(kernel=(2, 2), strides=[2, 2], auto_pad="SAME_LOWER"),
    "same_lower_rectangular": dict(kernel=(3, 2), strides=[2, 1], auto_pad="SAME_LOWER"),
    "valid": dict(kernel=(3, 3), strides=[2, 2], auto_pad="VALID"),
    "pointwise": dict(kernel=(1, 1)),
    "pointwise_stride2": dict(kernel=(1, 1), strides=[2, 2]),
}


def _conv_geometry_args(case):
    return {
        "kernel": case["kernel"],
        "strides": tuple(case.get("strides", (1, 1))),
        "dilations": tuple(case.get("dilations", (1, 1))),
        "pads": tuple(case.get("pads", (0, 0, 0, 0))),
        "auto_pad": case.get("auto_pad", "NOTSET"),
    }


@pytest.mark.parametrize("name", CONV_CASES)
def test_naive_reference_matches_onnxruntime_conv(name):
    """The loop reference is what a Conv multiplies its weight with (pads, strides, dilations, auto_pad)."""
    case = dict(CONV_CASES[name])
    kernel = case.pop("kernel")
    model = _conv_model(3, 4, kernel, **case)
    x = np.random.default_rng(1).standard_normal((2, 3, 9, 8)).astype(np.float32)
    expected = _run(model, {"x": x})
    weight = numpy_helper.to_array(model.graph.initializer[0]).reshape(4, -1)
    bias = numpy_helper.to_array(model.graph.initializer[1])
    patches = _naive_patches(np.maximum(x, 0), **_conv_geometry_args(CONV_CASES[name]))
    n, c_out, out_h, out_w = expected.shape
    got = (patches @ weight.T.astype(np.float64) + bias).reshape(n, out_h, out_w, c_out).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", CONV_CASES)
def test_im2col_matches_naive_patches(name):
    args = _conv_geometry_args(CONV_CASES[name])
    x = np.random.default_rng(2).standard_normal((2, 3, 9, 8)).astype(np.float32)
    np.testing.assert_array_equal(im2col(x, ConvGeometry(**args)), _naive_patches(x, **args))


@pytest.mark.parametrize("name", CONV_CASES)
def test_conv_patch_statistics(name):
    case = dict(CONV_CASES[name])
    kernel = case.pop("kernel")
    model = _conv_model(3, 4, kernel, **case)
    layers, _ = find_layers(model)
    x = np.random.default_rng(3).standard_normal((5, 3, 9, 8)).astype(np.float32)
    # batch_size 3: two batches of different sizes through a dynamic batch dim.
    stats = collect_statistics(model, layers, x, batch_size=3, progress=False)
    assert list(stats) == [layers[0].stats_key]
    _assert_stats(_only(stats), _naive_patches(np.maximum(x, 0), **_conv_geometry_args(CONV_CASES[name])), 5)


@pytest.mark.parametrize("block_rows", [4, 20, 110])
def test_large_inputs_are_reduced_in_blocks(block_rows):
    """Budgets below one output row (6 patches), below one sample (54) and of two samples."""
    case = CONV_CASES["dilation2"]
    model = _conv_model(3, 4, case["kernel"], dilations=case["dilations"], pads=case["pads"])
    layers, _ = find_layers(model)
    x = np.random.default_rng(4).standard_normal((3, 3, 9, 8)).astype(np.float32)
    rows_bytes = 8 * 28 * block_rows  # rows of 27 values and a 1
    stats = collect_statistics(model, layers, x, progress=False, block_bytes=rows_bytes)
    _assert_stats(_only(stats), _naive_patches(np.maximum(x, 0), **_conv_geometry_args(case)), 3)


# ---------------------------------------------------------------- Gemm / MatMul rows


def _gemm_model(trans_a):
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((6, 4)).astype(np.float32)  # (out, in), transB=1
    bias = rng.standard_normal(6).astype(np.float32)
    shape = [4, "M"] if trans_a else ["M", 4]
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transA=int(trans_a), transB=1, alpha=0.5)
    return _model(
        [node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 6])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )


@pytest.mark.parametrize("trans_a", [False, True])
def test_gemm_row_statistics(trans_a):
    model = _gemm_model(trans_a)
    layers, _ = find_layers(model)
    rng = np.random.default_rng(6)
    batches = [rng.standard_normal((4, 7) if trans_a else (7, 4)).astype(np.float32) for _ in range(2)]
    stats = collect_statistics(model, layers, batches, progress=False)
    rows = np.concatenate([b.T if trans_a else b for b in batches])  # transA: the rows are A's columns
    _assert_stats(_only(stats), rows, 14)


MATMUL_ND = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[B, T, 5] x) => (float[B, T, 3] q, float[B, T, 2] k) {
    r = Relu(x)
    wq = Constant<value = float[5, 3] {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}>()
    q = MatMul(r, wq)
    k = MatMul(r, wk)
}
"""


def _matmul_model():
    model = onnx.parser.parse_model(MATMUL_ND)
    wk = np.arange(10, dtype=np.float32).reshape(5, 2)
    model.graph.initializer.append(numpy_helper.from_array(wk, "wk"))
    onnx.checker.check_model(model)
    return model


def test_nd_matmul_rows_and_a_shared_input_share_one_key():
    """Weights from a Constant node and from an initializer; both layers read r: one statistic."""
    model = _matmul_model()
    layers, _ = find_layers(model)
    assert len(layers) == 2 and layers[0].stats_key == layers[1].stats_key
    x = np.random.default_rng(7).standard_normal((3, 4, 5)).astype(np.float32)
    stats = collect_statistics(model, layers, {"x": x}, batch_size=2, progress=False)
    _assert_stats(_only(stats), np.maximum(x, 0).reshape(-1, 5), 3)


def test_statistics_of_a_graph_input_come_from_the_feed():
    model = _gemm_model(trans_a=False)
    layers, _ = find_layers(model)
    x = np.random.default_rng(8).standard_normal((9, 4)).astype(np.float32)
    stats = collect_statistics(model, layers, x, batch_size=4, progress=False)
    _assert_stats(_only(stats), x, 9)


# ---------------------------------------------------------------- merge, save, models


def test_merged_halves_equal_one_pass_and_survive_save_load(tmp_path):
    model = _conv_model(3, 4, (3, 3), strides=[2, 2], pads=[1, 1, 1, 1])
    layers, _ = find_layers(model)
    x = np.random.default_rng(9).standard_normal((6, 3, 9, 8)).astype(np.float32)
    whole = collect_statistics(model, layers, x, batch_size=2, progress=False)
    first = collect_statistics(model, layers, x[:4], batch_size=2, progress=False)
    second = collect_statistics(model, layers, x[4:], batch_size=2, progress=False)
    merged = first.merged(second)
    merged.save(tmp_path / "stats.npz")
    loaded = Statistics.load(tmp_path / "stats.npz")
    for stats in (merged, loaded):
        a, b = _only(stats), _only(whole)
        assert (a.rows, a.samples) == (b.rows, b.samples)
        np.testing.assert_allclose(a.gram, b.gram, rtol=1e-12, atol=1e-12 * np.abs(b.gram).max())
        np.testing.assert_allclose(a.total, b.total, rtol=1e-12, atol=1e-12 * np.abs(b.total).max())


def test_external_data_model_and_caller_model_untouched(tmp_path):
    model = _conv_model(3, 4, (3, 3), pads=[1, 1, 1, 1])
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    loaded = load_model(path)
    before = loaded.SerializeToString()
    layers, _ = find_layers(loaded)
    x = np.random.default_rng(10).standard_normal((2, 3, 6, 5)).astype(np.float32)
    from_proto = collect_statistics(loaded, layers, x, progress=False)
    from_path = collect_statistics(path, layers, x, progress=False)
    assert loaded.SerializeToString() == before
    np.testing.assert_array_equal(_only(from_proto).gram, _only(from_path).gram)
    _assert_stats(_only(from_proto), _naive_patches(np.maximum(x, 0), (3, 3), pads=(1, 1, 1, 1)), 2)


def test_unloaded_external_data_is_a_clear_error(tmp_path):
    model = _conv_model(3, 4, (3, 3))
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    bare = onnx.load(str(path), load_external_data=False)
    layers, _ = find_layers(load_model(path))
    with pytest.raises(OnnxcompError, match="external data that was not loaded"):
        collect_statistics(bare, layers, np.zeros((1, 3, 5, 5), np.float32), progress=False)


def test_input_shapes_fix_dynamic_dims_and_check_the_data():
    model = _conv_model(3, 4, (3, 3))
    layers, _ = find_layers(model)
    x = np.random.default_rng(11).standard_normal((4, 3, 6, 5)).astype(np.float32)
    stats = collect_statistics(model, layers, x, input_shapes={"x": [2, 3, 6, 5]}, progress=False)
    assert _only(stats).samples == 4
    with pytest.raises(OnnxcompError, match="dimension 2 is 6, but the model fixes it to 7"):
        collect_statistics(model, layers, x, input_shapes={"x": [2, 3, 7, 5]}, progress=False)


def test_layers_of_another_model_are_refused():
    layers, _ = find_layers(_matmul_model())
    with pytest.raises(OnnxcompError, match="not a tensor of this model"):
        collect_statistics(_gemm_model(False), layers, np.zeros((2, 4), np.float32), progress=False)


# ---------------------------------------------------------------- readers: accepted data

TWO_INPUTS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 4, 4] image, int64[N] label) => (float[N, 3, 4, 4] y) {
    y = Relu(image)
}
"""


def _single_input_model():
    return _conv_model(3, 2, (1, 1))


def _batches(data, model=None, batch_size=2):
    return list(iter_feeds(data, model or _single_input_model(), batch_size))


class _Reader(CalibrationDataReader):
    """onnxruntime's own reader protocol: get_next() until None."""

    def __init__(self, arrays):
        self.feeds = iter([{"x": a} for a in arrays])

    def get_next(self):
        return next(self.feeds, None)


def _images(n, seed=12):
    return np.random.default_rng(seed).standard_normal((n, 3, 4, 4)).astype(np.float32)


def test_whole_arrays_are_split_into_batches(tmp_path):
    x = _images(5)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "stored.npz", x=x)
    np.savez_compressed(tmp_path / "compressed.npz", x=x)
    for data in (x, {"x": x}, tmp_path / "x.npy", str(tmp_path / "stored.npz"), tmp_path / "compressed.npz"):
        batches = _batches(data)
        assert [b["x"].shape[0] for b in batches] == [2, 2, 1]
        np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)
        assert count_samples(data, _single_input_model()) == 5


def test_readers_and_iterables_are_taken_as_given():
    x = _images(5)
    parts = [x[:3], x[3:]]
    for data in (_Reader(parts), [{"x": p} for p in parts], iter(parts), parts):
        assert [b["x"].shape[0] for b in _batches(data)] == [3, 2]
    assert count_samples(parts, _single_input_model()) == 5
    assert count_samples(iter(parts), _single_input_model()) is None


def test_a_fixed_batch_dim_sets_the_batch_size():
    model = _conv_model(3, 2, (1, 1))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    assert [b["x"].shape[0] for b in _batches(_images(3), model, batch_size=32)] == [1, 1, 1]


def test_multi_input_model_from_npz(tmp_path):
    model = onnx.parser.parse_model(TWO_INPUTS)
    np.savez(tmp_path / "data.npz", image=_images(3), label=np.arange(3))
    batches = _batches(tmp_path / "data.npz", model)
    assert [sorted(b) for b in batches] == [["image", "label"]] * 2
    np.testing.assert_array_equal(batches[1]["label"], [2])


# ---------------------------------------------------------------- readers: bad data


def _corrupt_files(tmp_path):
    (tmp_path / "garbage.npy").write_bytes(b"not a numpy file")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    (tmp_path / "truncated.npy").write_bytes(_npy_bytes(_images(4))[:200])
    with zipfile.ZipFile(tmp_path / "truncated.npz", "w") as archive:
        archive.writestr("x.npy", _npy_bytes(_images(4))[:200])
    return ["garbage.npy", "truncated.npy", "garbage.npz", "truncated.npz"]


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


BAD_DATA = {
    "dtype": (lambda: _images(2).astype(np.float64), r"expected float32 data, got float64 .*does not cast"),
    "rank": (lambda: [_images(2)[0]],
             r"expected rank 4 like x float32 \[\?,3,\?,\?\], got rank 3 with shape \(3, 4, 4\)"),
    "fixed_dim": (lambda: np.zeros((2, 4, 4, 4), np.float32), r"dimension 1 is 4, but the model fixes it to 3"),
    "nan": (lambda: np.where(np.eye(4, dtype=bool), np.nan, _images(2)).astype(np.float32), r"holds 24 NaN or Inf"),
    "inf": (lambda: [{"x": np.full((1, 3, 4, 4), np.inf, np.float32)}], r"batch 0\) holds 48 NaN or Inf"),
    "unknown_name": (lambda: {"image": _images(2)},
                     r"missing input\(s\) \['x'\] and unknown input\(s\) \['image'\]; the model's inputs are \['x'\]"),
    "extra_name": (lambda: [{"x": _images(1), "y": _images(1)}],
                   r"unknown input\(s\) \['y'\]; the model's inputs are \['x'\]"),
    "empty_list": (lambda: [], r"calibration data is empty"),
    "empty_array": (lambda: np.zeros((0, 3, 4, 4), np.float32), r"calibration data is empty"),
    "empty_reader": (lambda: _Reader([]), r"calibration data is empty"),
    "empty_batch": (lambda: [np.zeros((0, 3, 4, 4), np.float32)], r"input 'x' \(batch 0\) is empty"),
    "bad_item": (lambda: ["x.npy"], r"calibration batch 0 is a str: expected a dict name -> array or an array"),
    "bad_type": (lambda: 42, r"unsupported calibration data of type int"),
}


@pytest.mark.parametrize("name", BAD_DATA)
def test_bad_data_is_a_one_line_error(name):
    make, message = BAD_DATA[name]
    with pytest.raises(OnnxcompError, match=message) as error:
        _batches(make())
    assert "\n" not in str(error.value)


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(OnnxcompError, match="calibration file not found: .*missing.npz"):
        _batches(tmp_path / "missing.npz")
    for name in _corrupt_files(tmp_path):
        with pytest.raises(OnnxcompError, match=f"cannot read calibration file .*{name}: ") as error:
            _batches(tmp_path / name)
        assert "pickle" not in str(error.value)
    (tmp_path / "data.csv").write_text("1,2,3")
    with pytest.raises(OnnxcompError, match="expected a .npy or .npz file"):
        _batches(tmp_path / "data.csv")


def test_npz_names_and_lengths_must_match(tmp_path):
    model = onnx.parser.parse_model(TWO_INPUTS)
    np.savez(tmp_path / "labels.npz", image=_images(3), labels=np.arange(3))
    with pytest.raises(OnnxcompError, match=r"missing input\(s\) \['label'\] and unknown input\(s\) \['labels'\]"):
        _batches(tmp_path / "labels.npz", model)
    np.savez(tmp_path / "lengths.npz", image=_images(3), label=np.arange(2))
    with pytest.raises(OnnxcompError, match="different numbers of samples"):
        _batches(tmp_path / "lengths.npz", model)


def test_an_array_cannot_feed_a_two_input_model():
    with pytest.raises(OnnxcompError, match=r"single-input model, but this model has 2 inputs \['image', 'label'\]"):
        _batches(_images(2), onnx.parser.parse_model(TWO_INPUTS))


RESHAPED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, L] x) => (float[M, 2] y) {
    shape = Constant<value = int64[2] {-1, 4}>()
    rows = Reshape(x, shape)
    w = Constant<value = float[4, 2] {1, 2, 3, 4, 5, 6, 7, 8}>()
    y = MatMul(rows, w)
}
"""


def test_onnxruntime_failures_name_the_batch():
    """Data that passes the static checks but not the model: L must be a multiple of 4."""
    model = onnx.parser.parse_model(RESHAPED)
    layers, _ = find_layers(model)
    good = np.ones((2, 8), np.float32)
    with pytest.raises(OnnxcompError, match="onnxruntime failed on calibration batch 1: .*Reshape"):
        collect_statistics(model, layers, [good, np.ones((2, 3), np.float32)], progress=False)


def test_the_sums_are_the_same_to_the_bit_on_any_number_of_workers():
    from models import EXAMPLE

    model = onnx.load(EXAMPLE / "digits_cnn.onnx")
    images = np.load(EXAMPLE / "calib.npz")["input"][:70]
    one = onnxcomp.calibrate(model, images, batch_size=16, threads=1, progress=False)
    for workers in (2, 3):
        many = onnxcomp.calibrate(model, images, batch_size=16, threads=workers, progress=False)
        assert list(many) == list(one)  # the layers' order
        for key in one:
            assert (many[key].rows, many[key].samples) == (one[key].rows, one[key].samples)
            assert np.array_equal(many[key].gram, one[key].gram) and np.array_equal(many[key].total, one[key].total)


def test_mirroring_the_upper_triangle_in_blocks():
    from onnxcomp.calibration.collect import _mirror_upper

    rng = np.random.default_rng(0)
    a = rng.standard_normal((11, 11))
    want = np.triu(a) + np.triu(a, 1).T
    for block in (1, 3, 4, 11, 64):
        np.testing.assert_array_equal(_mirror_upper(np.asfortranarray(a.copy()), block), want)


def test_overlapping_the_runs_with_the_products_gives_the_same_sums(monkeypatch):
    from models import EXAMPLE
    from onnxcomp.calibration import collect

    model = onnx.load(EXAMPLE / "digits_cnn.onnx")
    images = np.load(EXAMPLE / "calib.npz")["input"][:70]
    monkeypatch.setattr(collect, "available_cores", lambda: 1)  # never overlapped
    plain = onnxcomp.calibrate(model, images, batch_size=16, threads=1, progress=False)
    monkeypatch.setattr(collect, "available_cores", lambda: 8)  # one worker of eight cores: overlapped
    calls = []
    real = collect._overlapped
    monkeypatch.setattr(collect, "_overlapped", lambda *a: (calls.append(1), real(*a)))
    overlapped = onnxcomp.calibrate(model, images, batch_size=16, threads=1, progress=False)
    assert calls
    for key in plain:
        assert overlapped[key].rows == plain[key].rows and np.array_equal(overlapped[key].gram, plain[key].gram)


@pytest.mark.parametrize("module", ["numpy", "cupy"])
def test_device_products_give_the_host_statistics_to_float32_rounding(module):
    """The products of --device cuda (CuPy) run the same code as with NumPy in their place: patches
    built on the host, each block's Gram a float32 product, float64 sums kept on the device."""
    from models import EXAMPLE

    if module == "cupy":
        from onnxcomp.decompose.backend import cupy_or_none

        xp = cupy_or_none()
        if xp is None:
            pytest.skip("no CuPy with a CUDA device")
    else:
        xp = np
    model = onnx.load(EXAMPLE / "digits_cnn.onnx")
    images = np.load(EXAMPLE / "calib.npz")["input"][:64]
    layers, _ = find_layers(model)
    host = collect_statistics(model, layers, images, batch_size=16, progress=False)
    device = collect_statistics(model, layers, images, batch_size=16, progress=False, products_xp=xp)
    for key, want in host.items():
        got = device[key]
        assert (got.rows, got.samples) == (want.rows, want.samples)
        scale = np.abs(want.gram).max()
        assert np.abs(got.gram - want.gram).max() <= 1e-5 * scale  # float32 blocks of up to 8192 rows
        np.testing.assert_allclose(got.total, want.total, rtol=1e-5, atol=1e-5 * np.abs(want.total).max())
