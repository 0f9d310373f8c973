"""The held-out data of ``onnxcomp bench``: the whole set in memory, and its labels.

Files are read by the shared NumPy-file reader (:func:`onnxcomp.calibration.readers.read_arrays`);
every batch is checked later by the shared feed reader, like calibration data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..calibration.readers import iter_feeds, read_arrays, whole_set_length
from ..errors import OnnxcompError, first_line
from ..model.sample_axes import SampleAxes
from ..runtime import repeated

LABELS_KEY = "labels"


@dataclass
class HeldOutData:
    """The whole held-out set: input name -> array of all samples, and the labels if any."""

    feeds: dict
    samples: int | None  # None: an input is missing, the feed reader will say which
    labels: np.ndarray | None
    label_source: str | None  # where the labels came from, for the report


def read_held_out(data, labels, model, inputs) -> HeldOutData:
    """``data`` and ``labels`` as :func:`onnxcomp.bench.bench` takes them, read whole.

    A ``labels`` array beside the inputs (in a .npz or a dict) is the labels, and is
    not fed, unless the model has an input of that name; ``labels`` wins over it.
    Readers and iterables are read through (each batch checked) and stacked.
    """
    names = [i.name for i in inputs]
    feeds, found, where = _read_feeds(data, model, names)
    if labels is not None:
        labels, source = _read_labels(labels)
    elif found is not None:
        labels, source = np.asarray(found), f"{where}:{LABELS_KEY}"
    else:
        source = None
    samples = _sample_count(feeds, names)
    if labels is not None and samples is not None and (labels.ndim == 0 or labels.shape[0] != samples):
        raise OnnxcompError(f"{labels.size} labels ({source}) for {samples} data samples")
    return HeldOutData(feeds, samples, labels, source)


def first_samples(feeds: dict, count: int, samples: int) -> dict:
    """The first ``count`` of the ``samples`` samples of every array, contiguous; when there are
    fewer, the data is repeated from its start (a batch larger than the data, a padded last batch)."""
    return repeated({name: np.asarray(value)[:samples] for name, value in feeds.items()}, count)


def checked_labels(labels: np.ndarray, samples: int, classes: int, source: str) -> np.ndarray:
    """The labels as integer class indices of shape [samples] (one-hot and [N, 1] accepted)."""
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    elif labels.ndim == 2 and labels.shape[1] == classes:
        labels = labels.argmax(axis=1)  # one-hot
    if labels.ndim != 1:
        raise OnnxcompError(f"labels ({source}) must be class indices of shape [{samples}], got {list(labels.shape)}")
    if labels.shape[0] != samples:
        raise OnnxcompError(f"{labels.shape[0]} labels ({source}) for {samples} data samples")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise OnnxcompError(f"labels ({source}) must be integer class indices")
        labels = labels.astype(np.int64)
    elif labels.dtype.kind not in "iu":
        raise OnnxcompError(f"labels ({source}) must be integer class indices, got {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise OnnxcompError(
            f"labels ({source}) range over [{labels.min()}, {labels.max()}] but the model scores {classes} classes"
        )
    return labels


def _read_feeds(data, model, names: list[str]) -> tuple[dict, np.ndarray | None, str | None]:
    """(input name -> array, a ``labels`` array found beside the inputs or None, where it was)."""
    found = where = None
    if isinstance(data, (str, os.PathLike)):
        feeds, where = read_arrays(data, "data"), Path(data).name
    elif isinstance(data, dict):
        feeds, where = {name: np.asarray(value) for name, value in data.items()}, "data"
    elif isinstance(data, np.ndarray):
        feeds = data
    elif callable(getattr(data, "get_next", None)) or hasattr(data, "__iter__"):
        feeds = _stacked(iter_feeds(data, model), names)
    else:
        raise OnnxcompError(
            f"cannot read data of type {type(data).__name__}: give a .npz/.npy path, arrays or feed dicts")
    if isinstance(feeds, dict) and LABELS_KEY in feeds and LABELS_KEY not in names:
        found = feeds.pop(LABELS_KEY)
    if isinstance(feeds, dict) and where is not None:  # a whole set as given: samples on axis 0 for the model
        feeds = SampleAxes.of_model(model).canonical_feed(feeds)
    if not isinstance(feeds, dict):  # one array
        if len(names) != 1:
            raise OnnxcompError(
                f"the data is one array, but the model has {len(names)} inputs {names}: "
                "give a .npz / dict with one array per input name"
            )
        feeds = {names[0]: feeds}
    return feeds, found, where


def _stacked(batches, names: list[str]) -> dict:
    """Checked batches (a reader's, an iterable's) stacked into one array per input."""
    batches = list(batches)
    try:
        return {name: np.concatenate([b[name] for b in batches], axis=0) for name in names}
    except ValueError as exc:
        raise OnnxcompError(f"the data's batches do not stack along axis 0: {first_line(exc)}") from None


def _read_labels(labels) -> tuple[np.ndarray, str]:
    """(the labels as an array, where they came from): an array, a .npy, or a .npz holding ``labels``."""
    if not isinstance(labels, (str, os.PathLike)):
        return np.asarray(labels), "array"
    source = str(labels)
    arrays = read_arrays(labels, "labels")
    if isinstance(arrays, dict):
        if LABELS_KEY in arrays:
            arrays = arrays[LABELS_KEY]
        elif len(arrays) == 1:
            arrays = next(iter(arrays.values()))
        else:
            raise OnnxcompError(f"the labels file {source} holds several arrays and none is named 'labels'")
    return np.asarray(arrays), source


def _sample_count(feeds: dict, names: list[str]) -> int | None:
    """The samples along axis 0 of the model's inputs (None: one is missing, the feed reader names it)."""
    if any(name not in feeds for name in names):
        return None
    count = whole_set_length({name: np.asarray(feeds[name]) for name in names}, "data")
    if count == 0:
        raise OnnxcompError("the data is empty: 0 samples")
    return count
