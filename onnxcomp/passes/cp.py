"""CP rewrite of a kxk Conv.

- 4way (Lebedev et al.): 1x1 conv C_in -> R (B^T), depthwise (group=R) kh x 1 conv (H)
  with the original stride_h, dilation_h and top/bottom pads, depthwise 1 x kw conv (V)
  with stride_w, dilation_w and left/right pads, 1x1 conv R -> C_out (A, bias).
- 3way: 1x1 conv C_in -> R, depthwise kh x kw conv (one kernel per component) with the
  original strides/pads/dilations/auto_pad, 1x1 conv R -> C_out (A, bias); 1-D and 3-D
  convs alike, in their own dims.

A grouped conv's groups share the rank: each step is one grouped Conv (the depthwise ones with
``group = G * R``).

auto_pad SAME_UPPER / SAME_LOWER / VALID is given to each depthwise conv as is: the
ONNX rule pads each axis independently from (input size, kernel, stride, dilation)
of that axis alone, and an axis with kernel 1 and stride 1 gets no pad, so the kh x 1
conv pads the height exactly as the original did and the 1 x kw conv the width
(checked through onnxruntime in tests/test_cp.py, stride 2 included). This needs no
input size, so dynamic shapes keep working.
"""

from __future__ import annotations

import numpy as np

from ..decompose.factors import factor_parts
from ..decompose.solve import Decomposition
from ..model import TargetLayer
from .common import GraphEditor, grouped_steps, pointwise_weight, write_conv_chain


def _auto_pad(attrs) -> str:
    value = attrs.get("auto_pad", "NOTSET")
    return value.decode() if isinstance(value, bytes) else str(value)


def rewrite_cp(editor: GraphEditor, layer: TargetLayer, decomposition: Decomposition) -> None:
    chains = [_steps(layer, factors) for factors in factor_parts(decomposition.factors)]
    write_conv_chain(editor, layer, grouped_steps(chains), decomposition.bias, layer.weight.dtype)


def _steps(layer: TargetLayer, f) -> list:
    """The chain of one set of factors (a grouped conv: of one group) as (weight name, weight, attributes)."""
    a, b = np.asarray(f.a), np.asarray(f.b)
    r = a.shape[1]
    dims = len(layer.kernel)
    attrs = layer.attrs
    auto_pad = _auto_pad(attrs)
    first = ("cp_input_weight", pointwise_weight(b.T, dims), {})
    last = ("cp_output_weight", pointwise_weight(a, dims), {})
    if f.form == "4way":  # 2-D only (the solver refuses it for other kernels)
        kh, kw = layer.kernel
        sh, sw = list(attrs.get("strides", [1, 1]))
        dh, dw = list(attrs.get("dilations", [1, 1]))
        top, left, bottom, right = list(attrs.get("pads", [0, 0, 0, 0]))
        vert = {"group": r, "kernel_shape": [kh, 1], "strides": [sh, 1], "dilations": [dh, 1]}
        horz = {"group": r, "kernel_shape": [1, kw], "strides": [1, sw], "dilations": [1, dw]}
        if auto_pad != "NOTSET":
            vert["auto_pad"] = horz["auto_pad"] = auto_pad
        else:
            vert["pads"] = [top, 0, bottom, 0]
            horz["pads"] = [0, left, 0, right]
        return [first, ("cp_vertical_weight", f.h.T[:, None, :, None], vert),
                ("cp_horizontal_weight", f.v.T[:, None, None, :], horz), last]
    depth = {"group": r, "kernel_shape": list(layer.kernel), "strides": list(attrs.get("strides", [1] * dims)),
             "dilations": list(attrs.get("dilations", [1] * dims))}
    if auto_pad != "NOTSET":
        depth["auto_pad"] = auto_pad
    else:
        depth["pads"] = list(attrs.get("pads", [0] * (2 * dims)))
    kernels = np.asarray(f.kernel).reshape(r, 1, *layer.kernel)  # the solver's (R, 1, K) of an N-D kernel
    return [first, ("cp_depthwise_weight", kernels, depth), last]
