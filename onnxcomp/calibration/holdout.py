"""Validation samples kept out of the statistics, so that candidate models are judged on data the fit never saw.

``compress`` holds out every k-th calibration sample (10% of them, at least ``VALIDATION_MIN``,
at most ``VALIDATION_MAX``) while the statistics stream past: strided, so that data sorted by
class or source still gives a validation part like the rest. With fewer than twice
``VALIDATION_MIN`` samples nothing is held out: the samples judge in-sample, and say so.
``--validation-data`` gives a separate set instead (then every calibration sample goes into
the statistics).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..runtime import feed_size
from .digests import seen_among
from .readers import iter_feeds
from .rowmask import joined_feeds

VALIDATION_SHARE = 0.1
VALIDATION_MIN = 8
VALIDATION_MAX = 64  # the original's outputs on them are kept in memory (a detector's maps are large)
UNKNOWN_STRIDE = 10  # a reader that cannot tell its length: every 10th sample


@dataclass
class Validation:
    """The samples that judge candidate models, where they came from, and whether the fit saw them."""

    source: str
    held_out: bool | None  # None: nobody can tell (statistics that record no sample digests)
    parts: list[dict] = field(default_factory=list)  # filled while the calibration data streams past
    row_mask: str | None = None  # the input masking padded token rows: batches of other lengths are padded

    @property
    def feed(self) -> dict | None:
        if not self.parts:
            return None
        return joined_feeds(self.parts, self.row_mask)

    @property
    def samples(self) -> int:
        return sum(feed_size(part) for part in self.parts)


def split_validation(feeds: Iterator[dict], total: int | None) -> tuple[Validation, Iterator[dict]]:
    """The validation part of the calibration data, and the batches left for the statistics.

    The validation part fills while the returned iterator is consumed.
    """
    if total is not None and total < 2 * VALIDATION_MIN:
        validation = Validation(f"the {min(total, VALIDATION_MAX)} calibration sample(s) themselves: too few to hold "
                                f"any out (give {2 * VALIDATION_MIN} or more, or --validation-data)", held_out=False)
        return validation, _stream(feeds, validation, stride=1, limit=VALIDATION_MAX, remove=False)
    if total is None:
        stride, limit = UNKNOWN_STRIDE, VALIDATION_MAX
    else:
        limit = held_out_count(total)
        stride = max(1, total // limit)
    validation = Validation("", held_out=True)
    stream = _stream(feeds, validation, stride, limit, remove=True)

    def labelled():
        yield from stream
        validation.source = f"{validation.samples} calibration samples held out of the statistics"

    return validation, labelled()


def held_out_count(total: int) -> int:
    """How many of ``total`` calibration samples are held out (0: too few to hold any out)."""
    if total < 2 * VALIDATION_MIN:
        return 0
    return int(np.clip(round(VALIDATION_SHARE * total), VALIDATION_MIN, VALIDATION_MAX))


def held_out_mask(total: int) -> np.ndarray:
    """Which of ``total`` samples (a whole set, in order) ``compress`` holds out: benchmarks that
    collect statistics themselves use it to split the data the same way."""
    limit = held_out_count(total)
    if not limit:
        return np.zeros(total, dtype=bool)
    wanted = np.arange(total) % max(1, total // limit) == 0
    return wanted & (np.cumsum(wanted) <= limit)


def validation_besides_stats(feeds: Iterator[dict]) -> Validation:
    """With precomputed statistics: the first samples of the data given (the fit saw them only if
    the statistics were collected on them)."""
    validation = Validation("", held_out=True)
    for _ in _stream(feeds, validation, stride=1, limit=VALIDATION_MAX, remove=False):
        if validation.samples >= VALIDATION_MAX:
            break
    validation.source = f"{validation.samples} samples of the data given besides --stats"
    return validation


def validation_from(data, model, batch_size: int) -> Validation:
    """``--validation-data``: a separate set, read whole (checked like calibration data)."""
    validation = Validation("", held_out=True, parts=list(iter_feeds(data, model, batch_size, what="validation")))
    validation.source = f"{validation.samples} samples of --validation-data"
    return validation


def compare_with_statistics(validation: Validation, statistics) -> None:
    """Call the validation samples held out only if none of them is among the samples the
    statistics saw, by their digests (:mod:`.digests`): ``--validation-data`` may be the
    calibration file, ``--stats`` may come from the data given, the data may repeat samples.
    ``statistics`` None (a data-free fit): the samples judge a fit that saw no data."""
    if statistics is None or not validation.held_out:
        return
    if statistics.digests is None:
        validation.held_out = None
        validation.source += (" (the statistics record no sample digests, as files of older onnxcomp versions: "
                              "whether they saw these samples is unknown)")
        return
    seen = seen_among(validation.parts, statistics.digests)
    if seen:
        validation.held_out = False
        every = "every one" if seen == validation.samples else str(seen)
        validation.source += f" ({every} of them also among the samples the statistics saw)"


def _stream(feeds: Iterator[dict], validation: Validation, stride: int, limit: int, remove: bool):
    """Yield the batches (without the validation samples when ``remove``), collecting every
    ``stride``-th sample into ``validation`` until it holds ``limit``."""
    seen = 0
    for batch in feeds:
        count = feed_size(batch)
        wanted = np.arange(seen, seen + count) % stride == 0
        room = limit - validation.samples
        wanted &= np.cumsum(wanted) <= room
        seen += count
        if wanted.any():
            validation.parts.append({name: value[wanted] for name, value in batch.items()})
        if remove and wanted.any():
            batch = {name: value[~wanted] for name, value in batch.items()}
        if feed_size(batch):
            yield batch
