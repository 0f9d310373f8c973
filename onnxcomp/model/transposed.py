"""ConvTranspose as a plain convolution over its zero-stuffed input.

A 2-D ConvTranspose with weight ``W_t`` of shape (C_in, C_out, kh, kw), strides s,
pads, dilations d and output_padding a computes, per axis, exactly the stride-1 Conv
(same dilation) of its input with ``s - 1`` zeros stuffed between neighbouring pixels,
padded by ``d (k - 1) - pad`` on each side (plus ``a`` at the end; a negative pad
crops), with the kernel flipped spatially and its channel axes swapped:
``W_eq[o, c, i, j] = W_t[c, o, kh-1-i, kw-1-j]``. So a transposed layer is seen as
``y = W_eq x + b`` on the im2col patches of that stuffed input, and the data-aware
solvers apply unchanged. The map between the two weight forms is its own inverse.

Statistics then cost what stride-1 patches of an input s_h s_w times larger cost
(most of its entries zero); simple and exact, fine for the decoder layers met so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layers import ConvGeometry


def flip_transpose(weight: np.ndarray) -> np.ndarray:
    """(A, B, kh, kw) -> (B, A, kh, kw) flipped spatially: ConvTranspose weight <-> equivalent Conv weight."""
    return np.ascontiguousarray(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))


@dataclass(frozen=True)
class TransposedGeometry:
    """A ConvTranspose's spatial attributes: how its input becomes the equivalent conv's input."""

    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    output_padding: tuple[int, int] = (0, 0)
    auto_pad: str = "NOTSET"
    output_shape: tuple[int, int] | None = None

    @property
    def equivalent(self) -> ConvGeometry:
        """The plain conv over :meth:`stuffed` inputs: stride 1, the same dilation, no pads."""
        return ConvGeometry(kernel=self.kernel, dilations=self.dilations)

    def resolve_pads(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Explicit (top, left, bottom, right) pads for an input of this size, as onnxruntime
        resolves auto_pad and output_shape (the larger half at the end for SAME_UPPER, at the start
        for SAME_LOWER and for an output_shape without auto_pad; checked in tests/test_convtranspose.py)."""
        if self.auto_pad == "VALID":
            return (0, 0, 0, 0)
        if self.auto_pad == "NOTSET" and self.output_shape is None:
            return self.pads
        begin, end = [], []
        for axis, size in enumerate((height, width)):
            k, s, d, a = self.kernel[axis], self.strides[axis], self.dilations[axis], self.output_padding[axis]
            target = self.output_shape[axis] if self.output_shape is not None else size * s
            total = s * (size - 1) + a + (k - 1) * d + 1 - target
            small, large = total // 2, total - total // 2
            first, last = (small, large) if self.auto_pad == "SAME_UPPER" else (large, small)
            if total < 0:  # an output_shape beyond the natural size: onnxruntime adds it at the end
                first, last = 0, total
            begin.append(first)
            end.append(last)
        return (begin[0], begin[1], end[0], end[1])

    def stuffed(self, x: np.ndarray) -> np.ndarray:
        """The NCHW input of the equivalent conv: ``x`` zero-stuffed, then padded (or cropped)."""
        n, c, h, w = x.shape
        pads = self.resolve_pads(h, w)
        places, crops, sizes = [], [], []
        for axis, size in enumerate((h, w)):
            reach, stride = self.dilations[axis] * (self.kernel[axis] - 1), self.strides[axis]
            begin = reach - pads[axis]
            end = reach - pads[axis + 2] + self.output_padding[axis]
            span = stride * (size - 1) + 1  # the stuffed input
            full = max(begin, 0) + span + max(end, 0)
            places.append(slice(max(begin, 0), max(begin, 0) + span, stride))
            crops.append(slice(max(-begin, 0), full - max(-end, 0)))
            sizes.append(full)
        out = np.zeros((n, c, *sizes), dtype=x.dtype)
        out[:, :, places[0], places[1]] = x
        return out[:, :, crops[0], crops[1]]

    def key(self) -> str:
        pads = self.auto_pad if self.auto_pad != "NOTSET" else ",".join(map(str, self.pads))
        shape = "" if self.output_shape is None else f" out{self.output_shape[0]}x{self.output_shape[1]}"
        return (f"s{self.strides[0]}x{self.strides[1]} p{pads} "
                f"a{self.output_padding[0]}x{self.output_padding[1]}{shape}")


def transposed_geometry(attrs: dict, kernel: tuple[int, int]) -> TransposedGeometry:
    """The geometry of a 2-D ConvTranspose node's attributes (``node_attributes``)."""
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    shape = attrs.get("output_shape")
    return TransposedGeometry(
        kernel=kernel,
        strides=tuple(attrs.get("strides", [1, 1])),
        dilations=tuple(attrs.get("dilations", [1, 1])),
        pads=(pads[0], pads[1], pads[2], pads[3]),
        output_padding=tuple(attrs.get("output_padding", [0, 0])),
        auto_pad=auto_pad,
        # output_shape may list the batch and channel dims too: its last two are the spatial ones
        output_shape=None if shape is None else (int(shape[-2]), int(shape[-1])),
    )
