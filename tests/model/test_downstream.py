"""Outputs a compressed layer can change, and the fidelity that counts only those by default."""

from __future__ import annotations

import numpy as np
import onnx.parser
import pytest

from onnxcomp.model import find_layers
from onnxcomp.model.downstream import outputs_reached
from onnxcomp.pipeline import compress

from models import build

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 16] x) => (float[N, 12] y, float[N, 16] echo, int64[2] size) {
    h = MatMul (x, w)
    y = Relu (h)
    echo = Identity (x)
    size = Shape (x)
}
"""


def test_outputs_reached():
    model = build(TEXT, w=(16, 12))
    layers, _ = find_layers(model)
    assert outputs_reached(model, [layers[0].output]) == {"y"}
    assert outputs_reached(model, ["x"]) == {"y", "echo", "size"}
    assert outputs_reached(model, []) == set()


def test_control_flow_counts_every_output():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    net (bool c, float[2] x) => (float[2] y, float[2] z) {
        y = If (c) <then_branch = g1 () => (float[2] a) { a = Identity (x) },
                    else_branch = g2 () => (float[2] b) { b = Neg (x) }>
        z = Identity (x)
    }
    """)
    assert outputs_reached(model, ["nothing"]) == {"y", "z"}


def test_the_fidelity_counts_only_outputs_a_layer_changes():
    model = build(TEXT, w=(16, 12))
    data = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    _, report = compress(model, data, rank=3, progress=False, check_latency=False)
    fidelity = report.fidelity
    assert fidelity.outputs["echo"]["standardized"] == 0.0
    assert fidelity.outputs["y"]["standardized"] > 0.01
    assert fidelity.standardized == pytest.approx(fidelity.outputs["y"]["standardized"], rel=1e-12)
