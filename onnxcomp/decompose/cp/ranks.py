"""CP rank rules: the chain's cost, the largest rank accepted, the rank for a budget."""

from __future__ import annotations

import math

import numpy as np

from ...errors import OnnxcompError
from ..factors import CP_FORMS
from ..ranks import ChainCost, layer_budget


def check_form(form) -> None:
    if form not in CP_FORMS:
        raise OnnxcompError(f"unknown CP form {form!r}: use '4way' or '3way'")


def cp_cost(C_out, C_in, kh, kw, R, form="4way", in_positions: float = 1.0) -> ChainCost:
    """Cost of the CP chain.

    4way: ``params = C_in*R + R*kh + R*kw + R*C_out``; 3way: ``C_in*R + R*kh*kw + R*C_out``.
    MACs per output position are the same except that the first 1x1 conv runs at the
    input resolution (``in_positions`` input positions per output position, e.g.
    stride_h*stride_w) and, for 4way, the vertical depthwise conv at output height
    but input width (counted as ``sqrt(in_positions)``, exact for equal strides).
    """
    check_form(form)
    if form == "4way":
        params = C_in * R + R * kh + R * kw + R * C_out
        macs = in_positions * C_in * R + math.sqrt(in_positions) * R * kh + R * kw + R * C_out
    else:
        params = C_in * R + R * kh * kw + R * C_out
        macs = in_positions * C_in * R + R * kh * kw + R * C_out
    return ChainCost(int(params), float(macs))


def cp_max_rank(C_out, C_in, kh, kw, form="4way") -> int:
    """Largest rank accepted: the trivial CP-rank bound prod(dims) / max(dims)
    (any tensor of these dimensions is exactly a sum of that many components)."""
    check_form(form)
    dims = (C_out, C_in, kh, kw) if form == "4way" else (C_out, C_in, kh * kw)
    return int(np.prod(dims) // max(dims))


def cp_rank_for_fraction(C_out, C_in, kh, kw, fraction, *, form="4way", measure="params",
                         in_positions: float = 1.0) -> int:
    """Largest R whose chain keeps at most ``fraction`` of the dense layer's params (or MACs);
    at least 1, at most :func:`cp_max_rank`."""
    budget = layer_budget((C_out, C_in, kh, kw), fraction, measure)
    per_rank = cp_cost(C_out, C_in, kh, kw, 1, form, in_positions).value(measure)  # cost is linear in R
    r = math.floor(budget / per_rank + 1e-9)
    return max(1, min(r, cp_max_rank(C_out, C_in, kh, kw, form)))


def check_cp_rank(shape, rank, form) -> int:
    """``rank`` as an int in [1, :func:`cp_max_rank`]."""
    try:
        r = int(rank)
        if r != rank:
            raise ValueError
    except (TypeError, ValueError):
        raise OnnxcompError(f"CP rank must be an integer, got {rank!r}") from None
    top = cp_max_rank(*shape, form)
    if r < 1 or r > top:
        raise OnnxcompError(
            f"CP rank {r} out of range for a {'x'.join(map(str, shape))} conv ({form}): need 1 <= R <= {top}"
        )
    return r
