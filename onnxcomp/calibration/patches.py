"""im2col on NumPy: the patches a 1-D, 2-D or 3-D convolution multiplies its weight with.

A conv's input row ``x`` is one patch of length ``C * kh * kw`` (``C * prod(kernel)``
in N-D) taken at one output position, at the conv's strides and dilations, including
the zeros the padding brings in. ``W.reshape(C_out, -1)`` orders it ``(c, i, j)``.

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


def channel_last_order(channels: int, kernel: tuple[int, ...]) -> np.ndarray:
    """Index ``perm`` with ``row_cij = row_ijc[perm]`` for patches of this shape (any spatial dims)."""
    taps = int(np.prod(kernel))
    return np.arange(taps * channels).reshape(taps, channels).T.reshape(-1)


def channel_last_windows(x: np.ndarray, geometry: ConvGeometry, dtype=None) -> np.ndarray:
    """A strided view ``(N, *out, *kernel, C)`` of all patches of an ``(N, C, *spatial)`` tensor
    (``(N, Ho, Wo, kh, kw, C)`` for NCHW).

    It looks into one zero-padded channel-last copy of ``x`` (in ``dtype``,
    default ``x.dtype``), or into ``x`` itself where there is nothing to pad or
    convert; patches are not materialised.
    """
    n, c, *sizes = x.shape
    rank = len(sizes)
    pads = geometry.resolve_pads(*sizes)
    begin, end = pads[:rank], pads[rank:]
    last = x.transpose(0, *range(2, rank + 2), 1)  # channel-last view
    if not any(pads) and np.dtype(dtype or x.dtype) == x.dtype:
        padded = last  # nothing to pad (1x1 convs): a view, the blocks copy from it
    else:
        padded = np.zeros((n, *(b + s + e for b, s, e in zip(begin, sizes, end)), c), dtype=dtype or x.dtype)
        padded[(slice(None), *(slice(b, b + s) for b, s in zip(begin, sizes)))] = last
    out = geometry.output_size(*sizes)
    spans = [(k - 1) * d + 1 for k, d in zip(geometry.kernel, geometry.dilations)]
    # (N, *(padded - span + 1), C, *spans), then keep the strided positions and the dilated taps;
    # trailing positions that no output reaches drop out.
    windows = sliding_window_view(padded, spans, axis=tuple(range(1, rank + 1)))
    positions = tuple(slice(None, (o - 1) * s + 1, s) for o, s in zip(out, geometry.strides))
    taps = tuple(slice(None, None, d) for d in geometry.dilations)
    windows = windows[(slice(None), *positions, slice(None), *taps)]
    return windows.transpose(0, *range(1, rank + 1), *range(rank + 2, 2 * rank + 2), rank + 1)


def iter_patch_blocks(
    x: np.ndarray, geometry: ConvGeometry, max_rows: int, out: np.ndarray | None = None
) -> Iterator[np.ndarray]:
    """All patches of ``x``, ``max_rows`` rows at a time, channel-last ``(i, j, c)`` order.

    Rows run over (sample, output position in C order). Blocks are written into
    ``out`` (at least ``(max_rows, C*prod(kernel))``, any float dtype; extra columns
    are left alone) when given, so a caller can reuse one buffer and add
    columns of its own; each block is only valid until the next one.
    """
    windows = channel_last_windows(x, geometry)
    positions = windows.shape[: geometry.rank + 1]  # (N, *out)
    dim = int(np.prod(windows.shape[geometry.rank + 1 :]))
    if out is None:
        out = np.empty((min(max_rows, int(np.prod(positions))), dim))
    for index in _block_ranges(positions, max_rows):
        part = windows[index]
        block = out[: int(np.prod(part.shape[: len(positions)])), :dim]
        block.reshape(part.shape)[...] = part  # splitting axes never copies: this writes into out
        yield block


def _block_ranges(dims: tuple[int, ...], max_rows: int) -> Iterator[tuple[slice, ...]]:
    """Blocks of at most max_rows of the positions ``dims`` (sample, output axes...), in row order:
    whole trailing axes where they fit, steps along the first axis that does not."""
    if int(np.prod(dims)) == 0:
        return
    inner = int(np.prod(dims[1:]))
    if inner <= max_rows:
        step = max_rows // inner
        for start in range(0, dims[0], step):
            yield (slice(start, start + step), *(slice(None),) * (len(dims) - 1))
        return
    for first in range(dims[0]):
        for rest in _block_ranges(dims[1:], max_rows):
            yield (slice(first, first + 1), *rest)


def im2col(x: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """``(N*prod(out), C*prod(kernel))`` patches of an ``(N, C, *spatial)`` tensor in ``(c, taps...)``
    order (``(c, i, j)`` for NCHW), in float64."""
    windows = channel_last_windows(x, geometry, dtype=np.float64)
    rank = geometry.rank
    rows = int(np.prod(windows.shape[: rank + 1]))
    return windows.transpose(*range(rank + 1), 2 * rank + 1, *range(rank + 1, 2 * rank + 1)).reshape(rows, -1)
