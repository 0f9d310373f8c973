"""Small test models, written in ONNX text with their weights filled in from a seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

# The embedded example: the digits CNN, its calibration and held-out data.
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits"


def build(text: str, seed: int = 0, **weights) -> onnx.ModelProto:
    """Parse ONNX text and give every initializer named in ``weights`` (name -> shape) random values."""
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    for name, shape in weights.items():
        value = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]) or 1)).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_model(attrs: str = "pads = [1, 1, 1, 1]", c_in=6, c_out=8, k=3, size=11, seed=0) -> onnx.ModelProto:
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[N, {c_in}, {size}, {size}] x) => (float[N, ?, ?, ?] y) {{
        h = Conv <{attrs}> (x, w, b)
        y = Relu (h)
    }}
    """
    return build(text, seed, w=(c_out, c_in, k, k), b=(c_out,))


def gemm_model(attrs: str = "", m=5, k=12, n=9, trans_a=False, trans_b=False, seed=0) -> onnx.ModelProto:
    a_shape = f"{k}, {m}" if trans_a else f"{m}, {k}"
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[{a_shape}] a) => (float[{m}, {n}] y) {{
        y = Gemm {f"<{attrs}>" if attrs else ""} (a, w, c)
    }}
    """
    return build(text, seed, w=(n, k) if trans_b else (k, n), c=(n,))


def matmul_model(k=12, n=9, seed=0) -> onnx.ModelProto:
    """N-D MatMul whose weight lives in a Constant node (as PP-OCR exports do)."""
    rng = np.random.default_rng(seed)
    values = ", ".join(f"{v:.6f}" for v in rng.standard_normal(k * n) / np.sqrt(k))
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[N, 7, {k}] x) => (float[N, 7, {n}] y) {{
        w = Constant <value = float[{k}, {n}] {{{values}}}> ()
        y = MatMul (x, w)
    }}
    """
    return build(text, seed)


def conv_nd_model(dims: int, attrs: str = "", c_in=4, c_out=6, k=3, size=7, group=1, seed=0,
                  relu: bool = False) -> onnx.ModelProto:
    """One Conv of ``dims`` spatial dims (1: Conv1d, 3: Conv3d) with a bias, on a dynamic batch;
    ``k``: the kernel size on every axis, or one per axis."""
    spatial = ", ".join([str(size)] * dims)
    attrs = ", ".join(a for a in (attrs, f"group = {group}" if group > 1 else "") if a)
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[N, {c_in}, {spatial}] x) => (float[N, {c_out}, {", ".join(["?"] * dims)}] y) {{
        {"h" if relu else "y"} = Conv {f"<{attrs}>" if attrs else ""} (x, w, b)
        {"y = Relu (h)" if relu else ""}
    }}
    """
    kernel = (k,) * dims if isinstance(k, int) else tuple(k)
    return build(text, seed, w=(c_out, c_in // group, *kernel), b=(c_out,))
