"""Tucker-2 rewrite: Conv kxk -> 1x1 (C_in -> R_in) -> kxk (R_in -> R_out) -> 1x1 (R_out -> C_out).

1-D and 3-D convs get the same chain in their own dims (1 / k / 1, 1x1x1 / kxkxk / 1x1x1).

The kxk core keeps the original strides, pads, dilations and auto_pad; the
1x1 convs have none of them, and the last conv carries the (corrected) bias.
A side kept at full rank (R_out = C_out, or else R_in = C_in) has a square
factor: it is folded into the core, and the chain is two convs (the cost model,
``tucker2_cost``, prices it so).
"""

from __future__ import annotations

import numpy as np

from ..decompose.factors import folded_sides
from ..decompose.solve import Decomposition
from ..model import TargetLayer
from .common import GraphEditor, pointwise_weight
from .lowrank import SPATIAL_ATTRS


def rewrite_tucker2(editor: GraphEditor, layer: TargetLayer, decomposition: Decomposition) -> None:
    factors, base, dtype = decomposition.factors, layer.name, layer.weight.dtype
    u_out, core, u_in = factors.u_out, factors.core, factors.u_in  # (C_out,R_out) (R_out,R_in,kh,kw) (C_in,R_in)
    dims = len(layer.kernel)
    core = np.asarray(core).reshape(*core.shape[:2], -1)  # taps as one axis: the solver's 1 x K of an N-D kernel
    fold_out, fold_in = folded_sides(u_out.shape[0], u_in.shape[0], u_out.shape[1], u_in.shape[1])
    if fold_out:
        core = np.einsum("or,rik->oik", u_out, core)
    if fold_in:
        core = np.einsum("rik,ci->rck", core, u_in)
    core = core.reshape(*core.shape[:2], *layer.kernel)
    spatial = {k: v for k, v in layer.attrs.items() if k in SPATIAL_ATTRS}
    bias = [] if decomposition.bias is None else [editor.constant(f"{base}/bias", decomposition.bias, dtype)]
    core_inputs = [editor.constant(f"{base}/core_weight", core, dtype)]
    steps = [] if fold_in else [
        ("Conv", [editor.constant(f"{base}/input_weight", pointwise_weight(u_in.T, dims), dtype)], {})]
    if fold_out:
        steps.append(("Conv", core_inputs + bias, spatial))
    else:
        steps += [("Conv", core_inputs, spatial),
                  ("Conv", [editor.constant(f"{base}/output_weight", pointwise_weight(u_out, dims), dtype)] + bias, {})]
    editor.chain(editor.node(layer.output), steps)
