"""Samples kept out of the statistics, so that candidate models are judged on data the fit never saw."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

# Samples the sensitivity probe takes from the first calibration batch, kept out of the statistics.
PROBE_SAMPLES = 8


@dataclass
class HeldOut:
    """The held-out feed, where it came from (for the report), and how many samples left the statistics."""

    feed: dict
    source: str
    samples: int


def hold_out(first_batch: dict, feeds: Iterator, precomputed: bool,
             count: int = PROBE_SAMPLES) -> tuple[HeldOut, Iterator]:
    """The first ``count`` samples of the first batch, and the batches left for the statistics.

    ``feeds`` still yields ``first_batch`` first; it is replaced by its remainder. With
    ``precomputed`` statistics every sample given is already outside them; a first batch too
    small to spare ``count`` samples (fewer than twice that) is used in-sample, and says so.
    """
    size = len(next(iter(first_batch.values())))
    feed = {k: v[:count] for k, v in first_batch.items()}
    if precomputed:
        return HeldOut(feed, "data given besides --stats", 0), feeds
    if size < 2 * count:
        return HeldOut(feed, "calibration samples (too few to hold out)", 0), feeds
    next(feeds)  # the first batch again: it is replaced by its remainder
    rest = {k: v[count:] for k, v in first_batch.items()}
    return HeldOut(feed, f"{count} samples held out of the statistics", count), itertools.chain([rest], feeds)
