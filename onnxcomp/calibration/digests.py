"""Which samples statistics were collected on: a short digest of each sample.

Statistics are sums: they cannot say which samples went into them. Their digests can, so that
a set that judges a compressed model is called held out only when none of its samples is among
the statistics' (``--validation-data`` that is the calibration file, ``--stats`` collected on
the very data given with ``--data``, a calibration set with repeated samples), and so that a set
of copies of one sample (constant or all-zero data) is seen for what it is.

A digest is 8 bytes of BLAKE2b over every input's values of one sample (name, dtype, shape and
bytes, -0.0 read as 0.0), as the batches are laid out for the model (samples on axis 0). Two samples with
the same values have the same digest; the chance that two different ones share one is about 2^-64 per pair.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import numpy as np

from ..runtime import feed_size


def sample_digests(feed: dict) -> np.ndarray:
    """One uint64 digest per sample of a batch (inputs without a sample axis count whole)."""
    count = feed_size(feed)
    values = {name: np.asarray(value) for name, value in sorted(feed.items())}
    digests = np.empty(count, dtype=np.uint64)
    for index in range(count):
        digest = hashlib.blake2b(digest_size=8)
        for name, value in values.items():
            part = value[index] if value.ndim and value.shape[0] == count else value
            if part.dtype.kind in "fc":
                part = part + part.dtype.type(0)  # -0.0 + 0.0 = 0.0: equal values, equal bytes
            digest.update(repr((name, part.dtype.str, part.shape)).encode())
            digest.update(np.ascontiguousarray(part).tobytes())
        digests[index] = int.from_bytes(digest.digest(), "little")
    return digests


class DigestRecorder:
    """The digests of every sample of the batches that pass through :meth:`passing`."""

    def __init__(self):
        self._parts: list[np.ndarray] = []

    def passing(self, feeds: Iterable[dict]) -> Iterator[dict]:
        for feed in feeds:
            self._parts.append(sample_digests(feed))
            yield feed

    @property
    def digests(self) -> np.ndarray:
        """Every sample's digest, in the order seen (repeats kept: they are what tells copies apart)."""
        return np.concatenate(self._parts) if self._parts else np.zeros(0, dtype=np.uint64)


def seen_among(parts: list[dict], digests: np.ndarray) -> int:
    """How many samples of the batches ``parts`` have a digest among ``digests``."""
    if not parts:
        return 0
    ours = np.concatenate([sample_digests(part) for part in parts])
    return int(np.count_nonzero(np.isin(ours, digests)))


def distinct_count(digests: np.ndarray) -> int:
    return int(np.unique(digests).size)
