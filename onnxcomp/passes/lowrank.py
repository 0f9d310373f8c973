"""SVD rewrite: one layer ``W`` becomes two thinner layers ``second @ first``.

- Conv kxk: kxk conv C_in -> r (the original strides, pads, dilations, auto_pad),
  then 1x1 conv r -> C_out with the bias (1-D and 3-D convs alike, in their own dims; a grouped
  conv's groups as one grouped Conv per step, ``group`` kept);
- Gemm: Gemm (A -> r, transA kept) then Gemm (r -> N) with the bias as C;
- MatMul: MatMul (K -> r) then MatMul (r -> N), plus an Add when there is a bias
  correction to carry.
"""

from __future__ import annotations

import numpy as np

from ..decompose.factors import factor_parts
from ..decompose.solve import Decomposition
from ..model import TargetLayer
from .common import GraphEditor, constant_value, grouped_steps, pointwise_weight, write_conv_chain

SPATIAL_ATTRS = ("kernel_shape", "strides", "pads", "dilations", "auto_pad")


def rewrite_lowrank(editor: GraphEditor, layer: TargetLayer, decomposition: Decomposition) -> None:
    bias, dtype, base = decomposition.bias, layer.weight.dtype, layer.name
    if layer.op_type == "Conv":
        spatial = {k: v for k, v in layer.attrs.items() if k in SPATIAL_ATTRS}
        chains = [[("first_weight", f.first.reshape(f.rank, -1, *layer.kernel), spatial),
                   ("second_weight", pointwise_weight(f.second, len(layer.kernel)), {})]
                  for f in factor_parts(decomposition.factors)]
        write_conv_chain(editor, layer, grouped_steps(chains), bias, dtype)
        return
    node = editor.node_of(layer)
    first, second = decomposition.factors.first, decomposition.factors.second
    rank = first.shape[0]
    if layer.op_type == "Gemm":
        first_inputs = [editor.constant(f"{base}/first_weight", first.T, dtype)]
        second_inputs = _with_bias(editor, base, second.T, bias, dtype)
        if editor.opset < 11:  # Gemm's C became optional in opset 11: before, a zero bias is written
            first_inputs.append(editor.constant(f"{base}/first_bias", np.zeros(rank), dtype))
            if len(second_inputs) == 1:
                second_inputs.append(editor.constant(f"{base}/bias", np.zeros(second.shape[0]), dtype))
        steps = [
            ("Gemm", first_inputs, {"transA": int(layer.trans_a)}),
            ("Gemm", second_inputs, {}),
        ]
    else:
        steps = [
            ("MatMul", [editor.constant(f"{base}/first_weight", first.T, dtype)], {}),
            ("MatMul", [editor.constant(f"{base}/second_weight", second.T, dtype)], {}),
        ]
        if bias is not None and not fold_into_following_add(editor, node, bias, base, dtype):
            steps.append(("Add", [editor.constant(f"{base}/bias", bias, dtype)], {}))
    editor.chain(node, steps)


def fold_into_following_add(editor: GraphEditor, node, shift: np.ndarray, base: str, dtype) -> bool:
    """MatMul + Add(constant bias), as exporters write Linear: add the shift to that bias.

    Saves the extra Add node the bias correction would otherwise need. Only
    when the Add is the MatMul's sole consumer and its bias is a constant
    vector (a fresh constant is made: the old one may be shared).
    """
    output = node.outputs[0]
    consumers = list(output.outputs)
    if len(consumers) != 1 or consumers[0].op != "Add" or output in editor.graph_of(node).outputs:
        return False
    add = consumers[0]
    other_index = 1 if add.inputs[0] is output else 0
    bias = constant_value(add.inputs[other_index])
    if bias is None or bias.size != shift.size or bias.shape[-1:] != shift.shape:
        return False
    folded = (bias.reshape(-1).astype(np.float64) + shift).reshape(bias.shape)
    add.inputs[other_index] = editor.constant(f"{base}/add_bias", folded, dtype)
    return True


def _with_bias(editor: GraphEditor, base: str, weight: np.ndarray, bias, dtype) -> list:
    inputs = [editor.constant(f"{base}/second_weight", weight, dtype)]
    if bias is not None:
        inputs.append(editor.constant(f"{base}/bias", bias, dtype))
    return inputs
