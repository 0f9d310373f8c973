"""The peer suite: the ONNX project's backend test models shipped in the installed onnx wheel.

Each model with a Conv, ConvTranspose, Gemm or MatMul that onnxruntime runs is compressed with its
test input plus 15 perturbed copies as calibration data: ``keep=1.0`` must give the original's
output on the test input (1e-4 relative) with the same inputs and outputs; ``keep=0.5`` a model that
passes onnx.checker and runs with the original's output names and shapes, finite (a model whose
layers all stay dense, plain depthwise convolutions, is written unchanged with a warning). Cases onnxcomp
cannot do yet are strict xfails with the reason, so one that starts passing must be moved out.
"""

import glob
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import onnxcomp

DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# The zoo-shaped `light` models that run in a few seconds (the others take minutes: CI time);
# ONNXCOMP_ALL_LIGHT=1 runs all nine (the whole suite of 40 models).
FAST_LIGHT = ("light_squeezenet", "light_shufflenet", "light_densenet121")
ALL_LIGHT = os.environ.get("ONNXCOMP_ALL_LIGHT") == "1"
NOT_YET: dict[str, str] = {}


def _cases():
    cases = []
    for folder in sorted(glob.glob(os.path.join(DATA, "pytorch-*", "*"))):
        cases += [(os.path.basename(folder), path, folder) for path in glob.glob(os.path.join(folder, "*.onnx"))]
    light = sorted(glob.glob(os.path.join(DATA, "light", "*.onnx"))) if ALL_LIGHT else [
        os.path.join(DATA, "light", f"{name}.onnx") for name in FAST_LIGHT]
    cases += [(os.path.basename(path)[: -len(".onnx")], path, None) for path in light]
    return [c for c in cases if os.path.exists(c[1]) and _has_layer(c[1])]


def _has_layer(path):
    return bool({n.op_type for n in onnx.load(path, load_external_data=False).graph.node} & LAYER_OPS)


def _session(model):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _test_input(model, folder):
    initializers = {t.name for t in model.graph.initializer}
    real = [i for i in model.graph.input if i.name not in initializers]
    if folder is not None:
        files = sorted(glob.glob(os.path.join(folder, "test_data_set_0", "input_*.pb")))
        return {i.name: numpy_helper.to_array(onnx.load_tensor(f)) for i, f in zip(real, files)}
    rng = np.random.default_rng(0)
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in real}


def _calibration(feed):
    """The test input and 15 copies with noise of 0.1 times its spread, or of its size where it has none
    (test_operator_conv's input is all ones: copies of it alone are refused as constant data)."""
    rng = np.random.default_rng(1)
    return {name: np.concatenate([x] + [x + 0.1 * _spread(x) * rng.standard_normal(x.shape).astype(x.dtype)
                                        for _ in range(15)]) for name, x in feed.items()}


def _spread(x):
    return x.std() or np.abs(x).mean() or 1.0


def _params():
    params = []
    for name, path, folder in _cases():
        reason = NOT_YET.get(name)
        marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
        params.append(pytest.param(path, folder, id=name, marks=marks))
    return params


@pytest.mark.parametrize("path, folder", _params())
def test_backend_model_compresses(path, folder):
    model = onnx.load(path)
    try:
        _session(model)
    except Exception:  # e.g. Gemm at opset 6, which onnxruntime no longer implements
        pytest.skip("onnxruntime does not run the original")
    feed = _test_input(model, folder)
    reference = _session(model).run(None, feed)
    calibration = _calibration(feed)

    exact, _ = onnxcomp.compress(model, calibration, keep=1.0, progress=False, check_latency=False)
    assert [i.name for i in exact.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in exact.graph.output] == [o.name for o in model.graph.output]
    for got, want in zip(_session(exact).run(None, feed), reference):
        assert np.linalg.norm(got - want) <= 1e-4 * max(np.linalg.norm(want), 1e-30)

    small, report = onnxcomp.compress(model, calibration, keep=0.5, progress=False, check_latency=False)
    onnx.checker.check_model(small)
    outputs = _session(small).run(None, feed)
    assert [o.name for o in small.graph.output] == [o.name for o in model.graph.output]
    assert [o.shape for o in outputs] == [r.shape for r in reference]
    assert all(np.isfinite(o).all() for o in outputs)
