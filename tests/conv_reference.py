"""An independent im2col for convs of any spatial rank: explicit Python loops over output
positions and kernel taps, zeros outside the input (tests in 1-D and 3-D check it against
onnxruntime's own Conv before trusting it)."""

from __future__ import annotations

import itertools

import numpy as np


def same_pads(size, kernel, stride, dilation, upper):
    """ONNX auto_pad SAME_*: output ceil(size / stride), the odd pad at the end (UPPER) or start (LOWER)."""
    out = -(-size // stride)
    total = max(0, (out - 1) * stride + (kernel - 1) * dilation + 1 - size)
    small = total // 2
    return (small, total - small) if upper else (total - small, small)


def explicit_pads(sizes, kernel, strides, dilations, pads, auto_pad):
    """(begins, ends) per axis."""
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pairs = [same_pads(*args, auto_pad == "SAME_UPPER") for args in zip(sizes, kernel, strides, dilations)]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    if auto_pad == "VALID" or not pads:
        return [0] * len(sizes), [0] * len(sizes)
    return list(pads[: len(sizes)]), list(pads[len(sizes) :])


def loop_patches(x, kernel, strides=None, dilations=None, pads=None, auto_pad="NOTSET", groups=1, group=0):
    """Rows (N * prod(out), C * prod(kernel)) in (c, taps...) order; with ``groups``, the patches of
    input channel block ``group`` only (what that group's filters read)."""
    n, c, *sizes = x.shape
    rank = len(sizes)
    strides, dilations = strides or [1] * rank, dilations or [1] * rank
    begins, ends = explicit_pads(sizes, kernel, strides, dilations, pads, auto_pad)
    out = [(s + b + e - (k - 1) * d - 1) // st + 1
           for s, b, e, k, d, st in zip(sizes, begins, ends, kernel, dilations, strides)]
    width = c // groups
    channels = range(group * width, (group + 1) * width)
    rows = []
    for sample in range(n):
        for position in itertools.product(*map(range, out)):
            row = []
            for ch in channels:
                for tap in itertools.product(*map(range, kernel)):
                    index = [p * st + t * d - b for p, t, st, d, b in zip(position, tap, strides, dilations, begins)]
                    inside = all(0 <= i < s for i, s in zip(index, sizes))
                    row.append(float(x[(sample, ch, *index)]) if inside else 0.0)
            rows.append(row)
    return np.array(rows)
