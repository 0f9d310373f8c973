"""Layers too wide for the machine's memory stay dense, with why, instead of exhausting it."""

import numpy as np
import pytest

import onnxcomp
import onnxcomp.pipeline as pipeline
from models import EXAMPLE
from onnxcomp.runtime import make_session


def test_a_layer_too_wide_for_memory_is_kept_dense_and_said(monkeypatch):
    images = np.load(EXAMPLE / "calib.npz")["input"][:64]
    # fc1 reads 1024 values: 6 float64 copies of its 1024 x 1024 second moment are 50 MB; the others' <= 16 MB.
    monkeypatch.setattr(pipeline, "available_memory", lambda: 60 * 2**20)
    model, report = onnxcomp.compress(str(EXAMPLE / "digits_cnn.onnx"), images, keep=0.5, progress=False,
                                      check_latency=False)
    rows = {row.name: row.status for row in report.layers}
    assert rows["/fc1/Gemm"] == ("skipped: input rows of 1024 values: its statistics and solve would need about "
                                 "48 MB, more than half of the 60 MB of memory here")
    assert sum(status == "compressed" for status in rows.values()) >= 3
    make_session(model).run(None, {"input": images[:2]})
    monkeypatch.setattr(pipeline, "available_memory", lambda: 1000)
    with pytest.raises(onnxcomp.OnnxcompError, match="too wide for this machine's memory"):
        onnxcomp.calibrate(str(EXAMPLE / "digits_cnn.onnx"), images, progress=False)
