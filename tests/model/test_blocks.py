"""Transformer block parts from node names, and the report's per-part summary."""

from __future__ import annotations

import pytest

from onnxcomp.model.blocks import block_index, block_role
from onnxcomp.report import LayerRow, Report

BERT = "/model/model.0/auto_model/encoder/layer.{i}/{part}/MatMul"


@pytest.mark.parametrize("name, role", [
    (BERT.format(i=0, part="attention/self/query"), "attention q"),
    (BERT.format(i=0, part="attention/self/key"), "attention k"),
    (BERT.format(i=0, part="attention/self/value"), "attention v"),
    (BERT.format(i=0, part="attention/output/dense"), "attention out"),
    (BERT.format(i=0, part="intermediate/dense"), "MLP up"),
    (BERT.format(i=0, part="output/dense"), "MLP down"),
    ("/model/layers.3/self_attn/q_proj/MatMul", "attention q"),
    ("/model/layers.3/self_attn/o_proj/MatMul", "attention out"),
    ("/model/layers.3/mlp/gate_proj/MatMul", "MLP up"),
    ("/model/layers.3/mlp/down_proj/MatMul", "MLP down"),
    ("/transformer/h.1/attn/c_attn/MatMul", "attention qkv"),
    ("/transformer/h.1/attn/c_proj/MatMul", "attention out"),
    ("/transformer/h.1/mlp/c_fc/MatMul", "MLP up"),
    ("/transformer/h.1/mlp/c_proj/MatMul", "MLP down"),
    ("/distilbert/transformer/layer.2/attention/q_lin/MatMul", "attention q"),
    ("/distilbert/transformer/layer.2/ffn/lin2/MatMul", "MLP down"),
    ("/classifier/MatMul", "other"),
    ("conv1", "other"),
])
def test_block_role(name, role):
    assert block_role(name) == role


def test_block_index():
    assert block_index(BERT.format(i=11, part="output/dense")) == 11
    assert block_index("/model/layers.3/mlp/up_proj/MatMul") == 3
    assert block_index("/transformer/h.1/attn/c_attn/MatMul") == 1
    assert block_index("/classifier/MatMul") is None
    assert block_index("/backbone/stage2/Conv") is None


def _row(i, part, before, after, error):
    return LayerRow(BERT.format(i=i, part=part), "MatMul", "384x384", "compressed", macs_before=before,
                    macs_after=after, relative_error=error)


def test_the_report_sums_macs_per_part_and_per_block():
    rows = [_row(0, "attention/self/query", 100, 50, 0.1), _row(0, "intermediate/dense", 400, 400, None),
            _row(1, "attention/self/query", 100, 30, 0.2), _row(1, "intermediate/dense", 400, 100, 0.3)]
    report = Report({}, rows, {})
    blocks = report.blocks()
    assert blocks["roles"]["attention q"] == {"layers": 2, "macs_before": 200, "macs_after": 80, "kept": 0.4,
                                               "max_relative_error": 0.2}
    assert blocks["roles"]["MLP up"]["kept"] == 500 / 800
    assert blocks["blocks"]["0"]["kept"] == 450 / 500 and blocks["blocks"]["1"]["kept"] == 130 / 500
    assert report.to_dict()["blocks"] == blocks


def test_no_block_summary_for_a_cnn():
    rows = [LayerRow("conv1", "Conv", "-", "compressed", macs_before=10, macs_after=5),
            LayerRow("fc", "Gemm", "-", "compressed", macs_before=10, macs_after=5)]
    assert Report({}, rows, {}).blocks() is None
