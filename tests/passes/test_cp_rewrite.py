"""CP rewrite through onnxruntime: the rewritten chain computes what the original conv does
(exact CP factors, every padding/stride/dilation case), for both forms (seeded, small)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcomp.decompose.cp import cp_decompose
from onnxcomp.decompose.solve import Decomposition
from onnxcomp.model import find_layers
from onnxcomp.passes.common import GraphEditor
from onnxcomp.passes.cp import rewrite_cp
from onnxcomp.runtime import make_session

from models import conv_model
from realistic_stats import exact_cp_weight, realistic_patch_covariance

C_OUT, C_IN, K = 8, 6, 3


def exact_factors(form, rank, c_out=C_OUT, c_in=C_IN, kh=K, kw=K, seed=0):
    return exact_cp_weight(form, rank, c_out, c_in, kh, kw, seed)


def model_with_weight(attrs, w, seed=0):
    model = conv_model(attrs, c_in=C_IN, c_out=C_OUT, k=K, size=11, seed=seed)
    for i, init in enumerate(model.graph.initializer):
        if init.name == "w":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(w.astype(np.float32), "w"))
    return model


def rewrite(model, form, rank, w64=None, s=None):
    layers, _ = find_layers(model)
    (layer,) = layers
    kh, kw = layer.kernel
    w = layer.weight.astype(np.float64).reshape(layer.out_features, -1, kh, kw) if w64 is None else w64
    if s is None:
        s = np.eye(w[0].size)
    res = cp_decompose(w, s, rank, form=form)
    bias = None if layer.bias is None else layer.bias.astype(np.float64)
    editor = GraphEditor(model)
    rewrite_cp(editor, layer, Decomposition("cp", res.factors, bias, (rank,), 0, 0, res.error, None))
    out = editor.export()
    onnx.checker.check_model(out, full_check=True)
    return out, res


def run(model, x):
    return make_session(model).run(None, {"x": x})[0]


CONV_CASES = [
    "pads = [1, 1, 1, 1]",
    "pads = [0, 1, 2, 0]",
    "strides = [2, 2], pads = [0, 1, 2, 1]",
    "strides = [2, 1], dilations = [2, 2], pads = [2, 0, 1, 2]",
    'auto_pad = "SAME_UPPER", strides = [2, 2]',
    'auto_pad = "SAME_UPPER", strides = [2, 1]',  # (onnxruntime rejects dilation with SAME_*)
    'auto_pad = "SAME_LOWER", strides = [1, 2]',
    'auto_pad = "VALID", strides = [1, 2]',
]


@pytest.mark.parametrize("form", ["4way", "3way"])
@pytest.mark.parametrize("attrs", CONV_CASES)
def test_rewrite_exact_cp_matches_original(attrs, form):
    w = exact_factors(form, 4)
    w32 = w.astype(np.float32)
    model = model_with_weight(attrs, w32)
    out, res = rewrite(model, form, 4, w32.astype(np.float64))
    assert res.relative_error < 1e-12
    x = np.random.default_rng(1).standard_normal((2, C_IN, 11, 11)).astype(np.float32)
    expected, got = run(model, x), run(out, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    ops = [(n.op_type, next((a.i for a in n.attribute if a.name == "group"), 1)) for n in out.graph.node]
    depthwise = [("Conv", 4)] * (2 if form == "4way" else 1)
    assert ops == [("Conv", 1), *depthwise, ("Conv", 1), ("Relu", 1)]
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]


def test_rewrite_data_aware_recovers_exact_cp_under_realistic_stats():
    s, _ = realistic_patch_covariance(C_IN, 3, 3, 2)
    w = exact_factors("4way", 5).astype(np.float32)
    model = model_with_weight("pads = [1, 1, 1, 1]", w)
    out, res = rewrite(model, "4way", 5, w.astype(np.float64), s)
    assert res.relative_error < 1e-10
    x = np.random.default_rng(2).standard_normal((1, C_IN, 11, 11)).astype(np.float32)
    expected, got = run(model, x), run(out, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
