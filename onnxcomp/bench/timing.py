"""Latency of two models the honest way (DESIGN.md §5): one process, warm-up, interleaved pairs.

Both sessions are created once without spinning (:func:`onnxcomp.runtime.make_session`);
per batch size both models are warmed up, then run in pairs that alternate which goes
first (A B, B A, ...) with the garbage collector paused. The ratio is taken within each
pair, whose two runs see the same machine load, then summarised by its median and p10/p90.
"""

from __future__ import annotations

import gc
import math
import time

import numpy as np

from .data import first_samples
from .result import Latency, Timing

# Automatic repetition: per batch size, warm up for about WARMUP_SECONDS (at least
# MIN_WARMUP pairs), then time as many A/B pairs as fit in MEASURE_SECONDS, between
# MIN_PAIRS and MAX_PAIRS. Two batch sizes of a small model take about 7 s.
WARMUP_SECONDS, MIN_WARMUP, MAX_WARMUP = 0.3, 3, 500
MEASURE_SECONDS, MIN_PAIRS, MAX_PAIRS = 3.0, 15, 2000


def time_pair(sessions, feeds: dict, samples: int, batch: int, repeats: int | None = None,
              warmup: int | None = None) -> Latency:
    """Both sessions (original, compressed) timed in interleaved pairs at one batch size.

    ``feeds``: input name -> the data's ``samples`` samples; the batch is their first
    ``batch`` samples (repeated when there are fewer). ``repeats``: timed pairs (default:
    as many as fit in ~3 s); ``warmup``: warm-up pairs (default: ~0.3 s).
    """
    feed = first_samples(feeds, batch, samples)
    note = f"batch built by repeating the {samples} samples" if batch > samples else None
    runs = [_timed_run(session, feed) for session in sessions]
    warm_a, warm_b = _warm_up(*runs, warmup)
    if repeats is None:
        recent = np.median(warm_a[-MIN_WARMUP:]) + np.median(warm_b[-MIN_WARMUP:])
        repeats = int(np.clip(MEASURE_SECONDS / max(recent, 1e-9), MIN_PAIRS, MAX_PAIRS))
    times_a, times_b = _interleaved(*runs, repeats)
    timing_a, timing_b = Timing.of(times_a), Timing.of(times_b)
    # The ratio within each pair, whose two runs see the same machine load, then the median:
    # steadier than the ratio of the two medians when the load drifts (a shared machine).
    pair = np.asarray(times_b) / np.maximum(np.asarray(times_a), 1e-12)
    p10, p50, p90 = np.percentile(pair, [10, 50, 90])
    return Latency(
        batch_size=batch, pairs=repeats, warmup=len(warm_a), original=timing_a, compressed=timing_b,
        ratio=float(p50), pair_ratio_p10=float(p10), pair_ratio_p90=float(p90),
        ratio_of_medians=timing_b.median_ms / timing_a.median_ms if timing_a.median_ms > 0 else math.inf,
        note=note,
    )


def _timed_run(session, feed: dict):
    """A function that runs ``session`` on ``feed`` once and returns the seconds it took."""

    def once() -> float:
        begin = time.perf_counter()
        session.run(None, feed)
        return time.perf_counter() - begin

    return once


def _warm_up(run_a, run_b, warmup: int | None) -> tuple[list[float], list[float]]:
    """Warm-up pairs: ``warmup`` of them, or by default about WARMUP_SECONDS' worth.
    The first runs at a new shape allocate and plan; frequency scaling settles."""
    warm_a, warm_b = [], []
    begin = time.perf_counter()
    while True:
        warm_a.append(run_a())
        warm_b.append(run_b())
        done = len(warm_a)
        if warmup is not None:
            if done >= warmup:
                break
        elif done >= MAX_WARMUP or (done >= MIN_WARMUP and time.perf_counter() - begin >= WARMUP_SECONDS):
            break
    return warm_a, warm_b


def _interleaved(run_a, run_b, repeats: int) -> tuple[list[float], list[float]]:
    """``repeats`` timed pairs, alternating which model goes first (A B, B A, A B, ...) so that
    neither always runs in the other's wake. No garbage collection while timing."""
    times_a, times_b = [], []
    collecting = gc.isenabled()
    gc.disable()
    try:
        for i in range(repeats):
            if i % 2 == 0:
                times_a.append(run_a())
                times_b.append(run_b())
            else:
                times_b.append(run_b())
                times_a.append(run_a())
    finally:
        if collecting:
            gc.enable()
    return times_a, times_b
