"""Valid input that once ended in an internal error (exit 1): each is a good run now."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxcomp
from onnxcomp.budget.candidates import Candidate
from onnxcomp.budget.latency import LatencyTable
from onnxcomp.cli import main
from onnxcomp.model import find_layers
from onnxcomp.runtime import make_session, output_array

from models import build, conv_model
from timers import MacTimer

ROOT = Path(__file__).resolve().parent.parent


def _x(n=64, k=12, seed=0):
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


def _cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out + err


# ---------------------------------------------------------------- a sequence output


SEQUENCE_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 12] x) => (seq(float[N, 9]) s) {
    y = Gemm (x, w)
    s = SequenceConstruct (y, y)
}
"""


def test_a_sequence_output_is_judged_as_its_elements(tmp_path, capsys):
    """Was: AttributeError: 'list' object has no attribute 'ndim'."""
    model = build(SEQUENCE_MODEL, w=(12, 9))
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=_x())
    np.savez(tmp_path / "h.npz", x=_x(30, seed=1))
    code, out = _cli(capsys, "compress", tmp_path / "m.onnx", tmp_path / "o.onnx", "--data", tmp_path / "c.npz",
                     "--validation-data", tmp_path / "h.npz", "--rank", "3", "--quiet", "--no-latency-check")
    assert code == 0, out
    compressed = onnx.load(tmp_path / "o.onnx")
    feed = {"x": _x(30, seed=1)}
    want, got = (np.stack(make_session(m).run(None, feed)[0], axis=1) for m in (model, compressed))
    expected = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 0 < expected < 1
    assert f"relative L2 {expected:.4g}" in out
    code, out = _cli(capsys, "bench", tmp_path / "m.onnx", tmp_path / "o.onnx", "--data", tmp_path / "h.npz",
                     "--batch-sizes", "1", "--repeats", "3", "--warmup", "1", "--no-floor")
    assert code == 0, out
    assert f"{expected:.3g}" in out
    assert "top-1 agreement: n/a" in out  # [N, elements, 9]: not class scores


def test_output_arrays_of_sequences_maps_and_optionals():
    a, b = np.ones((4, 3)), np.zeros((4, 2))
    assert output_array([a, a]).shape == (4, 2, 3)
    np.testing.assert_array_equal(output_array([a, b]), np.concatenate([a, b], axis=1))
    assert output_array([a, np.ones(5)]).shape == (17,)
    np.testing.assert_array_equal(output_array([{1: 0.25, 0: 0.75}, {0: 0.5, 1: 0.5}]), [[0.75, 0.25], [0.5, 0.5]])
    assert output_array(None).size == 0 and output_array([]).size == 0
    assert output_array(a) is not None and output_array(a).shape == (4, 3)


# ---------------------------------------------------------------- Gemm before opset 11


@pytest.mark.parametrize("opset", [9, 10])
def test_a_gemm_before_opset_11_gets_a_bias_and_is_the_data_aware_optimum(opset):
    """Gemm's C is optional from opset 11 only: the chain's first Gemm is written with a zero bias."""
    rng = np.random.default_rng(opset)
    weight, bias = rng.standard_normal((12, 9)).astype(np.float32), rng.standard_normal(9).astype(np.float32)
    model = onnx.parser.parse_model(f"""
        <ir_version: 5, opset_import: ["" : {opset}]>
        g (float[N, 12] x) => (float[N, 9] y) {{ y = Gemm (x, w, b) }}
        """)
    model.graph.initializer.extend([numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    x = (_x(300) @ rng.standard_normal((12, 12)) + 1.0).astype(np.float32)
    stats = onnxcomp.calibrate(model, x, progress=False, precision="float64")
    small, _ = onnxcomp.compress(model, stats=stats, rank=3, progress=False, check_latency=False)
    onnx.checker.check_model(small, full_check=True)
    assert [(n.op_type, len(n.input)) for n in small.graph.node] == [("Gemm", 3), ("Gemm", 3)]
    # the centred data-aware optimum, dense: [W^T S^1/2]_3 S^-1/2, bias corrected by the mean
    x64 = x.astype(np.float64)
    mean, covariance = x64.mean(axis=0), np.cov(x64, rowvar=False, bias=True)
    values, vectors = np.linalg.eigh(covariance)
    root = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    u, s, vt = np.linalg.svd(weight.T.astype(np.float64) @ root)
    best = (u[:, :3] * s[:3]) @ vt[:3] @ np.linalg.inv(root)
    expected = x64 @ best.T + bias + (weight.T - best) @ mean
    got = make_session(small).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


# ---------------------------------------------------------------- generated names


def _unnamed_beside_gemm_0():
    model = build("""
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[N, 12] x) => (float[N, 9] z) {
            y = Gemm (x, w)
            z = Gemm (y, v)
        }
        """, w=(12, 9), v=(9, 9))
    model.graph.node[1].name = "Gemm_0"  # the name the unnamed first Gemm would have been given
    return model


def test_a_generated_layer_name_never_takes_another_nodes_or_tensors_name():
    """Was: both layers called Gemm_0, one's factors written into the other (ShapeInferenceError)."""
    model = _unnamed_beside_gemm_0()
    layers, _ = find_layers(model)
    assert [layer.name for layer in layers] == ["Gemm_0_2", "Gemm_0"]
    model.graph.node[0].output[0] = "Gemm_0_2"  # a tensor of that name: taken too
    model.graph.node[1].input[0] = "Gemm_0_2"
    assert [layer.name for layer in find_layers(model)[0]] == ["Gemm_0_3", "Gemm_0"]
    twice = _unnamed_beside_gemm_0()
    twice.graph.node[0].name = "Gemm_0"  # two nodes of one name
    assert [layer.name for layer in find_layers(twice)[0]] == ["Gemm_0", "Gemm_0_2"]


def test_a_model_with_an_unnamed_gemm_beside_gemm_0_compresses():
    model, x = _unnamed_beside_gemm_0(), _x()
    small, report = onnxcomp.compress(model, x, rank=3, progress=False, check_latency=False)
    assert [row.name for row in report.layers] == ["Gemm_0_2", "Gemm_0"]
    assert [row.status for row in report.layers] == ["compressed", "compressed"]
    exact, _ = onnxcomp.compress(model, x, rank=9, progress=False, check_latency=False)
    want = make_session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(make_session(exact).run(None, {"x": x})[0], want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())


# ---------------------------------------------------------------- a damaged latency cache


@pytest.mark.parametrize("damage", ["ratio a string", "ratio negative", "ratio true", "section a list"])
def test_a_latency_cache_with_values_of_the_wrong_type_is_measured_again(tmp_path, damage):
    """Was: TypeError. A damaged cache is a cache that is not there."""
    layers, _ = find_layers(conv_model(), {"x": [1, 6, 11, 11]})
    candidate, path = Candidate("svd", (3,), 0, 0, 0.0), tmp_path / "latency.json"
    table = LatencyTable(MacTimer(), path)
    ratio = table.ratio(layers[0], [1, 6, 11, 11], candidate)
    table.save()
    cache = json.loads(path.read_text())
    (section, ratios), = cache.items()
    (key, _), = ratios.items()
    cache[section] = {"ratio a string": {key: "fast"}, "ratio negative": {key: -1.0}, "ratio true": {key: True},
                      "section a list": [ratio]}[damage]
    path.write_text(json.dumps(cache))
    again = LatencyTable(MacTimer(), path)
    assert again.ratio(layers[0], [1, 6, 11, 11], candidate) == ratio and again.measured == 2


# ---------------------------------------------------------------- a closed stdout


def test_a_closed_stdout_ends_the_printing_quietly_after_every_file_is_written(tmp_path):
    """Was: BrokenPipeError, exit 1, with the model written anyway (and the report not)."""
    onnx.save(conv_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((20, 6, 11, 11)).astype(np.float32))
    read, write = os.pipe()
    os.close(read)  # nobody reads: the first print meets EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "onnxcomp", "compress", tmp_path / "m.onnx", tmp_path / "o.onnx",
                               "--data", tmp_path / "c.npz", "--keep", "0.5", "--quiet", "--no-latency-check",
                               "--report", tmp_path / "r.json"], stdout=write, stderr=subprocess.PIPE,
                              cwd=ROOT, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr.decode() == ""
    assert (tmp_path / "o.onnx").is_file() and json.loads((tmp_path / "r.json").read_text())["layers"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "m.onnx", "o.onnx", "r.json"]
