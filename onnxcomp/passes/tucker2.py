"""Tucker-2 rewrite: Conv kxk -> 1x1 (C_in -> R_in) -> kxk (R_in -> R_out) -> 1x1 (R_out -> C_out).

The kxk core keeps the original strides, pads, dilations and auto_pad; the
1x1 convs have none of them, and the last one carries the (corrected) bias.
"""

from __future__ import annotations

from ..decompose.solve import Decomposition
from ..model import TargetLayer
from .common import GraphEditor
from .lowrank import SPATIAL_ATTRS


def rewrite_tucker2(editor: GraphEditor, layer: TargetLayer, decomposition: Decomposition) -> None:
    factors, base, dtype = decomposition.factors, layer.name, layer.weight.dtype
    u_out, core, u_in = factors.u_out, factors.core, factors.u_in  # (C_out,R_out) (R_out,R_in,kh,kw) (C_in,R_in)
    spatial = {k: v for k, v in layer.attrs.items() if k in SPATIAL_ATTRS}
    last = [editor.constant(f"{base}/output_weight", u_out[:, :, None, None], dtype)]
    if decomposition.bias is not None:
        last.append(editor.constant(f"{base}/bias", decomposition.bias, dtype))
    editor.chain(editor.node(layer.output), [
        ("Conv", [editor.constant(f"{base}/input_weight", u_in.T[:, :, None, None], dtype)], {}),
        ("Conv", [editor.constant(f"{base}/core_weight", core, dtype)], spatial),
        ("Conv", last, {}),
    ])
