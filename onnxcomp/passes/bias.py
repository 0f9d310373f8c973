"""A layer kept dense, with a new bias: what bias re-estimation (``onnxcomp/refit.py``) writes for the
layers a budget left alone, whose inputs the compressed layers before them changed all the same.

- Conv / ConvTranspose: the bias input (added where there was none);
- Gemm: C as the per-output vector and beta = 1 (the layer's bias is beta * C);
- MatMul: the shift added to the constant bias of the Add that follows it (as exporters write
  Linear), else a new Add node.
"""

from __future__ import annotations

import numpy as np

from ..model import TargetLayer
from .common import GraphEditor
from .lowrank import fold_into_following_add


def rewrite_bias(editor: GraphEditor, layer: TargetLayer, bias: np.ndarray) -> None:
    """Give the dense node of ``layer`` the per-output ``bias`` (the whole of it: ``layer.bias`` plus
    the shift), its weight untouched."""
    node, dtype = editor.node_of(layer), layer.weight.dtype
    if layer.op_type in ("Conv", "ConvTranspose", "Gemm"):
        if layer.op_type == "Gemm":
            node.attrs["beta"] = 1.0
        constant = editor.constant(f"{layer.name}/bias", bias, dtype)
        if len(node.inputs) > 2:
            node.inputs[2] = constant
        else:
            node.inputs.append(constant)
    elif not fold_into_following_add(editor, node, bias, layer.name, dtype):
        editor.chain(node, [("MatMul", [node.inputs[1]], {}),
                            ("Add", [editor.constant(f"{layer.name}/bias", bias, dtype)], {})])
