"""Tucker-2 rewrite: Conv kxk -> 1x1 (C_in -> R_in) -> kxk (R_in -> R_out) -> 1x1 (R_out -> C_out).

1-D and 3-D convs get the same chain in their own dims (1 / k / 1, 1x1x1 / kxkxk / 1x1x1); a
grouped conv's groups share the ranks and each step is one grouped Conv.

The kxk core keeps the original strides, pads, dilations and auto_pad; the
1x1 convs have none of them, and the last conv carries the (corrected) bias.
A side kept at full rank (R_out = C_out, or else R_in = C_in) has a square
factor: it is folded into the core, and the chain is two convs (the cost model,
``tucker2_cost``, prices it so).
"""

from __future__ import annotations

import numpy as np

from ..decompose.factors import factor_parts, folded_sides
from ..decompose.solve import Decomposition
from ..model import TargetLayer
from .common import GraphEditor, grouped_steps, pointwise_weight, write_conv_chain
from .lowrank import SPATIAL_ATTRS


def rewrite_tucker2(editor: GraphEditor, layer: TargetLayer, decomposition: Decomposition) -> None:
    chains = [_steps(layer, factors) for factors in factor_parts(decomposition.factors)]
    write_conv_chain(editor, layer, grouped_steps(chains), decomposition.bias, layer.weight.dtype)


def _steps(layer: TargetLayer, factors) -> list:
    """The chain of one set of factors (a grouped conv: of one group) as (weight name, weight, attributes)."""
    u_out, core, u_in = factors.u_out, factors.core, factors.u_in  # (C_out,R_out) (R_out,R_in,kh,kw) (C_in,R_in)
    dims = len(layer.kernel)
    core = np.asarray(core).reshape(*core.shape[:2], -1)  # taps as one axis: the solver's 1 x K of an N-D kernel
    fold_out, fold_in = folded_sides(u_out.shape[0], u_in.shape[0], u_out.shape[1], u_in.shape[1])
    if fold_out:
        core = np.einsum("or,rik->oik", u_out, core)
    if fold_in:
        core = np.einsum("rik,ci->rck", core, u_in)
    spatial = {k: v for k, v in layer.attrs.items() if k in SPATIAL_ATTRS}
    steps = [] if fold_in else [("input_weight", pointwise_weight(u_in.T, dims), {})]
    steps.append(("core_weight", core.reshape(*core.shape[:2], *layer.kernel), spatial))
    if not fold_out:
        steps.append(("output_weight", pointwise_weight(u_out, dims), {}))
    return steps
