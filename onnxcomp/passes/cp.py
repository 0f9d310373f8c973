"""CP rewrite of a kxk Conv.

- 4way (Lebedev et al.): 1x1 conv C_in -> R (B^T), depthwise (group=R) kh x 1 conv (H)
  with the original stride_h, dilation_h and top/bottom pads, depthwise 1 x kw conv (V)
  with stride_w, dilation_w and left/right pads, 1x1 conv R -> C_out (A, bias).
- 3way: 1x1 conv C_in -> R, depthwise kh x kw conv (one kernel per component) with the
  original strides/pads/dilations/auto_pad, 1x1 conv R -> C_out (A, bias); 1-D and 3-D
  convs alike, in their own dims.

auto_pad SAME_UPPER / SAME_LOWER / VALID is given to each depthwise conv as is: the
ONNX rule pads each axis independently from (input size, kernel, stride, dilation)
of that axis alone, and an axis with kernel 1 and stride 1 gets no pad, so the kh x 1
conv pads the height exactly as the original did and the 1 x kw conv the width
(checked through onnxruntime in tests/test_cp.py, stride 2 included). This needs no
input size, so dynamic shapes keep working.
"""

from __future__ import annotations

import numpy as np

from ..decompose.solve import Decomposition
from ..model import TargetLayer
from .common import GraphEditor, pointwise_weight


def _auto_pad(attrs) -> str:
    value = attrs.get("auto_pad", "NOTSET")
    return value.decode() if isinstance(value, bytes) else str(value)


def rewrite_cp(editor: GraphEditor, layer: TargetLayer, decomposition: Decomposition) -> None:
    f, base, dtype = decomposition.factors, layer.name, layer.weight.dtype
    a, b = np.asarray(f.a), np.asarray(f.b)
    r = a.shape[1]
    dims = len(layer.kernel)
    attrs = layer.attrs
    auto_pad = _auto_pad(attrs)

    last = [editor.constant(f"{base}/cp_output_weight", pointwise_weight(a, dims), dtype)]
    if decomposition.bias is not None:
        last.append(editor.constant(f"{base}/bias", decomposition.bias, dtype))
    first = ("Conv", [editor.constant(f"{base}/cp_input_weight", pointwise_weight(b.T, dims), dtype)], {})

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
        steps = [
            first,
            ("Conv", [editor.constant(f"{base}/cp_vertical_weight", f.h.T[:, None, :, None], dtype)], vert),
            ("Conv", [editor.constant(f"{base}/cp_horizontal_weight", f.v.T[:, None, None, :], dtype)], horz),
            ("Conv", last, {}),
        ]
    else:
        depth = {"group": r, "kernel_shape": list(layer.kernel), "strides": list(attrs.get("strides", [1] * dims)),
                 "dilations": list(attrs.get("dilations", [1] * dims))}
        if auto_pad != "NOTSET":
            depth["auto_pad"] = auto_pad
        else:
            depth["pads"] = list(attrs.get("pads", [0] * (2 * dims)))
        kernels = np.asarray(f.kernel).reshape(r, 1, *layer.kernel)  # the solver's (R, 1, K) of an N-D kernel
        steps = [
            first,
            ("Conv", [editor.constant(f"{base}/cp_depthwise_weight", kernels, dtype)], depth),
            ("Conv", last, {}),
        ]
    editor.chain(editor.node(layer.output), steps)
