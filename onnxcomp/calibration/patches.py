"""im2col on NumPy: the patches a 2-D convolution multiplies its weight with.

A conv's input row ``x`` is one patch of length ``C * kh * kw`` taken at one
output position, at the conv's strides and dilations, including the zeros the
padding brings in. ``W.reshape(C_out, -1)`` orders it ``(c, i, j)``.

Building patches in that order from an NCHW tensor copies runs of ``kw``
values at a time; building them in ``(i, j, c)`` order from a channel-last
(NHWC) copy of the input copies runs of ``C`` values, about twice as fast for
ResNet-50's 3x3 convs (64 ms against 133 ms for one batch of layer1 on this
machine). The Gram matrix of permuted rows is the permuted Gram matrix, so the
streaming code works channel-last and permutes the (small) sums once at the
end with :func:`channel_last_order`; :func:`im2col` returns ``(c, i, j)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..model import ConvGeometry


def channel_last_order(channels: int, kernel: tuple[int, int]) -> np.ndarray:
    """Index ``perm`` with ``row_cij = row_ijc[perm]`` for patches of this shape."""
    kh, kw = kernel
    return np.arange(kh * kw * channels).reshape(kh, kw, channels).transpose(2, 0, 1).reshape(-1)


def channel_last_windows(x: np.ndarray, geometry: ConvGeometry, dtype=None) -> np.ndarray:
    """A strided view ``(N, Ho, Wo, kh, kw, C)`` of all patches of an NCHW tensor.

    It looks into one zero-padded channel-last copy of ``x`` (in ``dtype``,
    default ``x.dtype``), or into ``x`` itself where there is nothing to pad or
    convert; patches are not materialised.
    """
    n, c, h, w = x.shape
    top, left, bottom, right = geometry.resolve_pads(h, w)
    if not (top or left or bottom or right) and np.dtype(dtype or x.dtype) == x.dtype:
        padded = x.transpose(0, 2, 3, 1)  # nothing to pad (1x1 convs): a view, the blocks copy from it
    else:
        padded = np.zeros((n, h + top + bottom, w + left + right, c), dtype=dtype or x.dtype)
        padded[:, top : top + h, left : left + w, :] = x.transpose(0, 2, 3, 1)
    (kh, kw), (sh, sw), (dh, dw) = geometry.kernel, geometry.strides, geometry.dilations
    out_h, out_w = geometry.output_size(h, w)
    span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    # (N, Hp-span+1, Wp-span+1, C, span_h, span_w), then keep the strided positions
    # and the dilated taps; trailing rows/cols that no output reaches drop out.
    windows = sliding_window_view(padded, (span_h, span_w), axis=(1, 2))
    windows = windows[:, : (out_h - 1) * sh + 1 : sh, : (out_w - 1) * sw + 1 : sw, :, ::dh, ::dw]
    return windows.transpose(0, 1, 2, 4, 5, 3)


def iter_patch_blocks(
    x: np.ndarray, geometry: ConvGeometry, max_rows: int, out: np.ndarray | None = None
) -> Iterator[np.ndarray]:
    """All patches of ``x``, ``max_rows`` rows at a time, channel-last ``(i, j, c)`` order.

    Rows run over (sample, output row, output column). Blocks are written into
    ``out`` (at least ``(max_rows, C*kh*kw)``, any float dtype; extra columns
    are left alone) when given, so a caller can reuse one buffer and add
    columns of its own; each block is only valid until the next one.
    """
    windows = channel_last_windows(x, geometry)
    n, out_h, out_w = windows.shape[:3]
    dim = int(np.prod(windows.shape[3:]))
    if out is None:
        out = np.empty((min(max_rows, n * out_h * out_w), dim))
    for samples, out_rows, out_cols in _block_ranges(n, out_h, out_w, max_rows):
        part = windows[samples, out_rows, out_cols]
        block = out[: int(np.prod(part.shape[:3])), :dim]
        block.reshape(part.shape)[...] = part  # splitting axes never copies: this writes into out
        yield block


def _block_ranges(n: int, out_h: int, out_w: int, max_rows: int) -> Iterator[tuple[slice, slice, slice]]:
    """(samples, output rows, output columns) blocks of at most max_rows patches, in row order."""
    if n * out_h * out_w == 0:
        return
    if out_h * out_w <= max_rows:
        step = max_rows // (out_h * out_w)
        for start in range(0, n, step):
            yield slice(start, start + step), slice(None), slice(None)
    elif out_w <= max_rows:
        step = max_rows // out_w
        for sample in range(n):
            for start in range(0, out_h, step):
                yield slice(sample, sample + 1), slice(start, start + step), slice(None)
    else:
        for sample in range(n):
            for row in range(out_h):
                for start in range(0, out_w, max_rows):
                    yield slice(sample, sample + 1), slice(row, row + 1), slice(start, start + max_rows)


def im2col(x: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """``(N*Ho*Wo, C*kh*kw)`` patches of an NCHW tensor in ``(c, i, j)`` order, in float64."""
    windows = channel_last_windows(x, geometry, dtype=np.float64)
    n, out_h, out_w, kh, kw, c = windows.shape
    return windows.transpose(0, 1, 2, 5, 3, 4).reshape(n * out_h * out_w, c * kh * kw)
