"""Image-like conv-input statistics for tests and benchmarks (no data files needed).

Real conv inputs are not white: channels are correlated (they are mixtures of a
few underlying features), neighbouring pixels are correlated (features are
spatially smooth), ReLU makes them non-negative, sparse and non-Gaussian, and
zero padding puts exact zeros into the border patches. An identity-like S hides
every difference between data-aware and Frobenius compression; this one does not.
"""

from __future__ import annotations

import os
import time

import numpy as np


def _smooth_fields(rng, n_images, n_fields, size, scales):
    """(n_images, n_fields, size, size) Gaussian random fields, field f with length scale scales[f]."""
    noise = rng.standard_normal((n_images, n_fields, size, size))
    freq = np.fft.fftfreq(size)
    f2 = freq[:, None] ** 2 + freq[None, :] ** 2
    # Gaussian filter in the frequency domain, one length scale per field
    filt = np.exp(-2.0 * (np.pi**2) * f2[None, :, :] * (np.asarray(scales)[:, None, None] ** 2))
    fields = np.fft.ifft2(np.fft.fft2(noise) * filt[None], axes=(-2, -1)).real
    fields /= fields.std(axis=(0, 2, 3), keepdims=True) + 1e-12
    return fields


def realistic_activations(c_in, seed, *, n_images=8, size=16, n_fields=None):
    """(n_images, c_in, size, size) ReLU'd activations from a few smooth fields mixed across channels."""
    rng = np.random.default_rng(seed)
    if n_fields is None:
        n_fields = int(min(max(4, c_in // 4), 64))
    scales = rng.uniform(0.7, 3.0, size=n_fields)  # each field its own smoothness: S is not separable
    fields = _smooth_fields(rng, n_images, n_fields, size, scales)
    amp = 1.0 / np.sqrt(1.0 + np.arange(n_fields))  # a decaying spectrum of features
    mix = rng.standard_normal((c_in, n_fields)) * amp[None, :]
    bias = rng.normal(-0.3, 0.5, size=c_in)  # varied sparsity after the ReLU
    gain = rng.lognormal(0.0, 0.5, size=c_in)  # varied channel scales
    pre = np.einsum("cf,nfhw->nchw", mix, fields, optimize=True) + bias[None, :, None, None]
    pre += 0.1 * rng.standard_normal(pre.shape)  # a little independent noise: full rank
    return np.maximum(pre, 0.0) * gain[None, :, None, None]


def im2col_stats(acts, kh, kw, *, pad=None, batch=4):
    """Sums over all (c, i, j)-ordered patches of a stride-1 conv with zero padding.

    Returns (rows, sum, sum of outer products), accumulated image by image.
    """
    n, c, h, w = acts.shape
    if pad is None:
        pad = (kh // 2, kw // 2)
    ph, pw = pad
    oh, ow = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    d = c * kh * kw
    total = np.zeros(d)
    gram = np.zeros((d, d))
    rows = 0
    for start in range(0, n, batch):
        x = acts[start:start + batch]
        xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
        b = x.shape[0]
        cols = np.empty((b, oh, ow, c, kh, kw))
        for i in range(kh):
            for j in range(kw):
                cols[:, :, :, :, i, j] = xp[:, :, i:i + oh, j:j + ow].transpose(0, 2, 3, 1)
        cols = cols.reshape(b * oh * ow, d)
        total += cols.sum(axis=0)
        gram += cols.T @ cols
        rows += cols.shape[0]
    return rows, total, gram


def realistic_patch_covariance(c_in, kh, kw, seed, *, n_images=None, size=16, n_fields=None):
    """Covariance S (d x d, d = c_in*kh*kw, ordered (c, i, j)) and mean of conv input patches.

    Activations: ``n_fields`` spatially smooth Gaussian fields (each with its own
    length scale), mixed into ``c_in`` channels with a decaying spectrum, shifted,
    ReLU'd and rescaled per channel; patches by im2col with zero padding
    (``same`` convolution). By default enough images are drawn for about 4*d
    patches, so S is full rank but strongly non-white (condition number ~1e4-1e6).
    """
    d = c_in * kh * kw
    if n_images is None:
        n_images = max(2, int(np.ceil(4 * d / (size * size))))
    acts = realistic_activations(c_in, seed, n_images=n_images, size=size, n_fields=n_fields)
    rows, total, gram = im2col_stats(acts, kh, kw)
    mean = total / rows
    s = gram / rows - np.outer(mean, mean)
    s = 0.5 * (s + s.T)
    return s, mean


def decaying_conv_weight(c_out, c_in, kh, kw, seed, *, decay=0.7):
    """Random conv weight with power-law decaying spectra in both channel modes.

    ``W = Z x_1 (A diag(i^-decay)) x_2 (B diag(j^-decay))`` with a Gaussian core Z
    and random orthogonal A, B: like trained layers, neither mode is flat.
    """
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((c_out, c_in, kh, kw))
    a, _ = np.linalg.qr(rng.standard_normal((c_out, c_out)))
    b, _ = np.linalg.qr(rng.standard_normal((c_in, c_in)))
    a = a * (1.0 + np.arange(c_out)) ** -decay
    b = b * (1.0 + np.arange(c_in)) ** -decay
    w = np.einsum("oa,cb,abij->ocij", a, b, z, optimize=True)
    return w / np.linalg.norm(w) * np.sqrt(c_out)


def exact_cp_weight(form, rank, c_out, c_in, kh, kw, seed=0):
    """A conv weight that is exactly a sum of ``rank`` CP components of ``form`` ("4way": A, B, H, V;
    "3way": A, B, K), Gaussian factors, scaled to entries of order 1 / sqrt(c_in)."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((c_out, rank)), rng.standard_normal((c_in, rank))
    if form == "4way":
        h, v = rng.standard_normal((kh, rank)), rng.standard_normal((kw, rank))
        w = np.einsum("or,cr,ir,jr->ocij", a, b, h, v)
    else:
        w = np.einsum("or,cr,rij->ocij", a, b, rng.standard_normal((rank, kh, kw)))
    return w / np.sqrt(rank * c_in)


def benchmark_layer(channels, seed):
    """The square 3x3 layer the layer benchmarks solve: (W, S, seconds it took to build them)."""
    start = time.perf_counter()
    w = decaying_conv_weight(channels, channels, 3, 3, seed + 1)
    s, _ = realistic_patch_covariance(channels, 3, 3, seed)
    return w, s, time.perf_counter() - start


def load_average():
    """The 1/5/15-minute load, rounded (benchmarks print it: the machine is shared)."""
    return tuple(round(x, 2) for x in os.getloadavg()) if hasattr(os, "getloadavg") else None


def finish_benchmark(numbers: dict, json_path: str | None) -> None:
    """The layer benchmarks' last lines: the load after the run, and the numbers as JSON when asked."""
    import json
    from pathlib import Path

    print(f"load avg after {load_average()}")
    if json_path:
        Path(json_path).write_text(json.dumps(numbers, indent=1, default=float))
