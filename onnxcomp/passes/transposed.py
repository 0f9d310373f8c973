"""Rewrites of a ConvTranspose, from factors of its equivalent conv (model/transposed.py).

The solvers factor ``W_eq`` (the flipped, channel-swapped kernel of the plain conv over the
zero-stuffed input). A 1x1 conv commutes with the zero-stuffing and the padding (it maps
zeros to zeros and acts on each pixel alone), so every 1x1 factor stays a plain 1x1 Conv
and only the spatial factor becomes a ConvTranspose with the original attributes
(strides, pads, dilations, output_padding, auto_pad, output_shape), its weight mapped
back by the same flip:

- SVD: ConvTranspose C_in -> r, then 1x1 Conv r -> C_out with the bias;
- Tucker-2: 1x1 Conv C_in -> R_in, ConvTranspose core R_in -> R_out, 1x1 Conv R_out -> C_out
  with the bias (a side kept at full rank folded into the core, as for a Conv);
- CP: 1x1 Conv C_in -> R, depthwise ConvTranspose (3way kh x kw; 4way kh x 1 then 1 x kw: the
  stuffing and padding of each axis are independent), 1x1 Conv R -> C_out with the bias.
"""

from __future__ import annotations

import numpy as np

from ..decompose.factors import folded_sides
from ..decompose.solve import Decomposition
from ..errors import OnnxcompError
from ..model import TargetLayer
from ..model.transposed import flip_transpose
from .common import GraphEditor

# What a ConvTranspose core keeps of the original node: everything but its weight's channels.
TRANSPOSED_ATTRS = ("kernel_shape", "strides", "pads", "dilations", "auto_pad", "output_padding", "output_shape")


def _spatial(layer: TargetLayer) -> dict:
    return {k: v for k, v in layer.attrs.items() if k in TRANSPOSED_ATTRS}


def _bias(editor: GraphEditor, layer: TargetLayer, decomposition: Decomposition) -> list:
    bias = decomposition.bias
    return [] if bias is None else [editor.constant(f"{layer.name}/bias", bias, layer.weight.dtype)]


def rewrite_lowrank_transposed(editor: GraphEditor, layer: TargetLayer, decomposition: Decomposition) -> None:
    first, second = decomposition.factors.first, decomposition.factors.second  # (r, C_in*kh*kw), (C_out, r)
    base, dtype, rank = layer.name, layer.weight.dtype, first.shape[0]
    kh, kw = layer.kernel
    core = flip_transpose(first.reshape(rank, -1, kh, kw))  # (C_in, r, kh, kw)
    last = [editor.constant(f"{base}/second_weight", second.reshape(second.shape[0], rank, 1, 1), dtype)]
    steps = [
        ("ConvTranspose", [editor.constant(f"{base}/first_weight", core, dtype)], _spatial(layer)),
        ("Conv", last + _bias(editor, layer, decomposition), {}),
    ]
    editor.chain(editor.node_of(layer), steps)


def rewrite_tucker2_transposed(editor: GraphEditor, layer: TargetLayer, decomposition: Decomposition) -> None:
    factors, base, dtype = decomposition.factors, layer.name, layer.weight.dtype
    u_out, core, u_in = factors.u_out, factors.core, factors.u_in  # (C_out,R_out) (R_out,R_in,kh,kw) (C_in,R_in)
    fold_out, fold_in = folded_sides(u_out.shape[0], u_in.shape[0], u_out.shape[1], u_in.shape[1])
    if fold_out:
        core = np.einsum("or,rikl->oikl", u_out, core)
    if fold_in:
        core = np.einsum("rikl,ci->rckl", core, u_in)
    core_step = [editor.constant(f"{base}/core_weight", flip_transpose(core), dtype)]
    steps = [] if fold_in else [
        ("Conv", [editor.constant(f"{base}/input_weight", u_in.T[:, :, None, None], dtype)], {})]
    if fold_out:
        steps.append(("ConvTranspose", core_step + _bias(editor, layer, decomposition), _spatial(layer)))
    else:
        steps += [("ConvTranspose", core_step, _spatial(layer)),
                  ("Conv", [editor.constant(f"{base}/output_weight", u_out[:, :, None, None], dtype)]
                   + _bias(editor, layer, decomposition), {})]
    editor.chain(editor.node_of(layer), steps)


def rewrite_cp_transposed(editor: GraphEditor, layer: TargetLayer, decomposition: Decomposition) -> None:
    """CP: 1x1 Conv C_in -> R, depthwise ConvTranspose (group R; 4way: kh x 1 then 1 x kw, each with
    its axis' attributes), 1x1 Conv R -> C_out with the bias. A depthwise ConvTranspose's kernel is
    its conv kernel flipped (each group maps one channel to one)."""
    f, base, dtype = decomposition.factors, layer.name, layer.weight.dtype
    a, b = np.asarray(f.a), np.asarray(f.b)
    r = a.shape[1]
    first = ("Conv", [editor.constant(f"{base}/cp_input_weight", b.T[:, :, None, None], dtype)], {})
    last = ("Conv", [editor.constant(f"{base}/cp_output_weight", a[:, :, None, None], dtype)]
            + _bias(editor, layer, decomposition), {})
    if f.form == "3way":
        kernel = np.asarray(f.kernel)[:, None, ::-1, ::-1]  # (R, 1, kh, kw)
        middle = [("ConvTranspose", [editor.constant(f"{base}/cp_depthwise_weight", kernel, dtype)],
                   {**_spatial(layer), "group": r})]
    else:
        h, v = np.asarray(f.h)[::-1].T, np.asarray(f.v)[::-1].T  # (R, kh), (R, kw), flipped
        middle = [
            ("ConvTranspose", [editor.constant(f"{base}/cp_vertical_weight", h[:, None, :, None], dtype)],
             _axis_attrs(layer, 0, r)),
            ("ConvTranspose", [editor.constant(f"{base}/cp_horizontal_weight", v[:, None, None, :], dtype)],
             _axis_attrs(layer, 1, r)),
        ]
    editor.chain(editor.node_of(layer), [first, *middle, last])


def _axis_attrs(layer: TargetLayer, axis: int, groups: int) -> dict:
    """The attributes of a depthwise ConvTranspose along one axis (a kernel, stride and output_padding
    of 1, 1, 0 on the other: no stuffing, no padding there). auto_pad pads each axis from its own
    size, kernel and stride alone, so it is given as is; an output_shape would need the other axis'
    size, unknown without the input's."""
    geometry = layer.transposed
    if geometry.output_shape is not None:
        raise OnnxcompError(f"CP 4way does not rewrite ConvTranspose layer {layer.name!r} (it has an output_shape): "
                            "use --cp-form 3way, --method svd or tucker2")

    def one(values, other):
        return [values[0], other] if axis == 0 else [other, values[1]]

    top, left, bottom, right = geometry.pads
    attrs = {"group": groups, "kernel_shape": one(geometry.kernel, 1), "strides": one(geometry.strides, 1),
             "dilations": one(geometry.dilations, 1), "output_padding": one(geometry.output_padding, 0)}
    if geometry.auto_pad != "NOTSET":
        attrs["auto_pad"] = geometry.auto_pad
    else:
        attrs["pads"] = [top, 0, bottom, 0] if axis == 0 else [0, left, 0, right]
    return attrs
