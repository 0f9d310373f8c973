"""Calibration data in, validated feed dicts out.

Users hand us calibration data in many shapes (an onnxruntime
``CalibrationDataReader``, an iterable of feed dicts or of arrays, one array or
a dict of arrays holding the whole set, a ``.npy`` / ``.npz`` file); every
batch leaves :func:`iter_feeds` as a dict ``input name -> np.ndarray`` checked
against the model's inputs, so that a mistake in the data is told in one line
instead of surfacing as an onnxruntime error or, worse, as silently wrong
statistics. Nothing is cast: a float64 array for a float32 input is an error.

Whole sets (arrays, dicts of arrays, files) are read one batch at a time: a
``.npy`` file is memory-mapped and a ``.npz`` member is streamed, so memory
stays bounded by one batch however large the file.

This is also the one reader of ``.npy`` / ``.npz`` files for the rest of onnxcomp
(:func:`open_arrays`, :func:`read_arrays`): it never unpickles (a pickle can run
code) and says in one line which file it could not read.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import OnnxcompError, first_line
from ..io import check_readable
from ..model import as_model
from ..model.sample_axes import SampleAxes

Feed = dict[str, np.ndarray]


@dataclass
class ModelInput:
    """One input the model needs fed."""

    name: str
    dtype: np.dtype | None  # None when the model does not say
    dims: list[int | None] | None  # None: unknown rank; None entries: dynamic dims

    def describe(self) -> str:
        dims = "?" if self.dims is None else "[" + ",".join("?" if d is None else str(d) for d in self.dims) + "]"
        return f"{self.name} {self.dtype or '?'} {dims}"


def model_inputs(model) -> list[ModelInput]:
    """The inputs to feed: graph inputs that are not initializers (those have defaults)."""
    graph = as_model(model).graph
    initializers = {t.name for t in graph.initializer}
    return [_model_input(info) for info in graph.input if info.name not in initializers]


def _model_input(info: onnx.ValueInfoProto) -> ModelInput:
    tensor = info.type.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type) if tensor.elem_type else None
    except KeyError:
        raise OnnxcompError(f"model input {info.name!r} has element type {tensor.elem_type}, which ONNX does not "
                            "define (a damaged model?)") from None
    dims = None
    if tensor.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim]
    return ModelInput(info.name, None if dtype is None else np.dtype(dtype), dims)


def iter_feeds(data, model, batch_size: int = 32, *, laid_out: bool = False,
               what: str = "calibration") -> Iterator[Feed]:
    """Validated feed dicts, one per batch, from any supported calibration data.

    Whole sets are split into batches of ``batch_size`` along the sample axis (or of the
    model's fixed batch size when all its inputs fix their first dimension);
    readers and iterables are taken batch by batch as given. Every batch comes with its
    samples on axis 0, as a working model takes them (:mod:`onnxcomp.model.sample_axes`);
    ``laid_out``: the data is batches this function gave before (already laid out so); ``what``: the
    data's role in messages ("calibration", "validation"), which also name its file.
    """
    if batch_size < 1:
        raise OnnxcompError(f"batch size must be at least 1, got {batch_size}")
    inputs = model_inputs(model)
    batches = 0
    axes = SampleAxes() if laid_out else SampleAxes.of_model(as_model(model))
    role = "" if what == "calibration" else f"{what} "
    source = f" of {data}" if isinstance(data, (str, os.PathLike)) and what != "calibration" else ""
    for index, feed in enumerate(_raw_batches(data, inputs, batch_size, axes, what)):
        yield _validated(feed, inputs, f"{role}batch {index}{source}", what)
        batches += 1
    if batches == 0:
        raise OnnxcompError(f"{what} data is empty: it gave no batch")


def count_samples(data, model) -> int | None:
    """How many samples ``data`` holds (for a progress bar), or None when it cannot tell without consuming it."""
    inputs = model_inputs(model)
    if not inputs:
        return None
    axes = SampleAxes.of_model(as_model(model))
    if isinstance(data, (str, os.PathLike)):
        with _opened_file(Path(data), inputs) as streams:
            return whole_set_length(_samples_first(streams, axes, inputs)[0])
    if isinstance(data, np.ndarray):
        return len(data) if data.ndim else None
    if isinstance(data, Mapping):
        return axes.samples_of({name: value for name, value in data.items() if isinstance(value, np.ndarray)})
    if isinstance(data, Sequence):
        return _sequence_length(data, inputs[0].name, axes)
    return None


def feed_samples(feed: Feed, model_input_names: Sequence[str]) -> int:
    """Samples in one batch: the leading dimension of the first model input."""
    first = feed[model_input_names[0]]
    return int(first.shape[0]) if first.ndim else 1


def _sequence_length(items: Sequence, first_input: str, axes: SampleAxes) -> int | None:
    total = 0
    for item in items:
        count = axes.samples_of(item if isinstance(item, Mapping) else {first_input: item})
        if count is None:
            return None
        total += count
    return total


# ---------------------------------------------------------------- sources


def _raw_batches(data, inputs: list[ModelInput], batch_size: int, axes: SampleAxes,
                 what: str = "calibration") -> Iterator:
    """Unvalidated batches with every input's samples on axis 0, whatever kind of data this is."""
    if isinstance(data, (str, os.PathLike)):
        return _file_batches(Path(data), inputs, batch_size, axes, what)
    if isinstance(data, np.ndarray):
        return _split(_ArrayStream.of_mapping({_single_input(inputs, "an array"): data}), inputs, batch_size, axes)
    if isinstance(data, Mapping):
        _check_names(data, inputs, f"{what} data")
        return _split(_ArrayStream.of_mapping(data), inputs, batch_size, axes, what)
    if callable(getattr(data, "get_next", None)):
        return _batches_first(iter(data.get_next, None), axes, inputs)
    if isinstance(data, Iterable):
        return _batches_first(_items_as_feeds(data, inputs), axes, inputs)
    raise OnnxcompError(
        f"unsupported {what} data of type {type(data).__name__}: expected a CalibrationDataReader, "
        "an iterable of dicts or arrays, an array, a dict of arrays, or a .npy/.npz path"
    )


def _items_as_feeds(items: Iterable, inputs: list[ModelInput]) -> Iterator:
    for index, item in enumerate(items):
        if isinstance(item, Mapping):
            yield item
        elif isinstance(item, np.ndarray) or hasattr(item, "__array__"):
            yield {_single_input(inputs, "an iterable of arrays"): item}
        else:
            raise OnnxcompError(
                f"calibration batch {index} is a {type(item).__name__}: expected a dict name -> array or an array"
            )


def _single_input(inputs: list[ModelInput], what: str) -> str:
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise OnnxcompError(
            f"{what} can only feed a single-input model, but this model has {len(inputs)} inputs {names}: "
            "pass dicts name -> array or an .npz file"
        )
    return inputs[0].name


def fixed_batch(inputs: list[ModelInput]) -> int | None:
    """The batch size the model fixes when every input fixes its first dimension to one value, else None.
    Such a model gets batches of exactly that size."""
    firsts = {i.dims[0] if i.dims else None for i in inputs}
    return firsts.pop() if len(firsts) == 1 and None not in firsts else None


def whole_set_length(arrays: Mapping, what: str = "calibration") -> int:
    """The samples of a whole set (arrays or streams by name): their common length along axis 0."""
    lengths = {name: a.shape[0] if a.shape else None for name, a in arrays.items()}
    if None in lengths.values():
        scalar = [n for n, length in lengths.items() if length is None][0]
        raise OnnxcompError(f"{what} input {scalar!r} is a scalar: a whole set needs a sample axis 0")
    if len(set(lengths.values())) > 1:
        raise OnnxcompError(f"{what} inputs hold different numbers of samples along axis 0: {lengths}")
    return next(iter(lengths.values()), 0)


def _split(streams: Mapping, inputs: list[ModelInput], batch_size: int, axes: SampleAxes,
           what: str = "calibration") -> Iterator[Feed]:
    streams, held = _samples_first(streams, axes, inputs)
    total = whole_set_length(streams, what)
    batch = fixed_batch(inputs) or batch_size
    for start in range(0, total, batch):
        count = min(batch, total - start)
        feed = {name: stream.read(count) for name, stream in streams.items()}
        yield {**feed, **{name: axes.canonical_array(name, value, count) for name, value in held.items()}}


def _samples_first(streams: Mapping, axes: SampleAxes, inputs: list[ModelInput]) -> tuple[dict, dict]:
    """(the streams of the inputs with a sample axis, read along it; the one value of each input
    without one) for a whole set in the original model's layout."""
    batched, held = {}, {}
    dims = {i.name: i.dims for i in inputs}
    for name, stream in streams.items():
        axis = axes.inputs.get(name, 0)
        if axis is None:
            held[name] = _held_value(name, stream.whole(), dims.get(name))
        elif axis:
            whole = stream.array if isinstance(stream, _ArrayStream) else stream.whole()
            batched[name] = _ArrayStream(axes.canonical_array(name, whole, None))  # a view: read a batch at a time
        else:
            batched[name] = stream
    return batched, held


def _held_value(name: str, value: np.ndarray, dims: list | None) -> np.ndarray:
    """An input without a sample axis: the data must give its one value (the working model's input
    has a sample axis in front of the original's dims)."""
    if dims is not None and value.ndim != len(dims) - 1:
        raise OnnxcompError(
            f"input {name!r} has no sample axis (the model takes one value of rank {len(dims) - 1} for every "
            f"sample), but the data gives shape {value.shape}: give its one value, or --batch-axis {name}:AXIS "
            "if the data holds one per sample")
    return value


def _batches_first(feeds: Iterator, axes: SampleAxes, inputs: list[ModelInput]) -> Iterator:
    """A reader's or an iterable's batches in the working model's layout. An input without a sample
    axis must keep one value: the working model takes sample 0's for a whole batch."""
    if not axes.inputs:
        yield from feeds
        return
    dims = {i.name: i.dims for i in inputs}
    first: dict = {}
    for index, feed in enumerate(feeds):
        if not isinstance(feed, Mapping):
            yield feed  # the validation names what it is
            continue
        for name, axis in axes.inputs.items():
            if axis is None and name in feed:
                value = _held_value(name, np.asarray(feed[name]), dims.get(name))
                if not np.array_equal(first.setdefault(name, value), value):
                    raise OnnxcompError(
                        f"input {name!r} has no sample axis, but calibration batch {index} gives it another value "
                        "than batch 0: every batch must give it the same value (or give it a sample axis "
                        f"with --batch-axis {name}:AXIS)")
        yield axes.canonical_feed(dict(feed))


class _ArrayStream:
    """An in-memory (or memory-mapped) array read forward in batches."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = array.shape
        self.position = 0

    @classmethod
    def of_mapping(cls, arrays: Mapping) -> dict[str, "_ArrayStream"]:
        return {name: cls(np.asarray(value)) for name, value in arrays.items()}

    def read(self, count: int) -> np.ndarray:
        # ascontiguousarray pulls a memory-mapped slice into memory: one batch at a time.
        batch = np.ascontiguousarray(self.array[self.position : self.position + count])
        self.position += count
        return batch

    def whole(self) -> np.ndarray:
        """The whole array in memory (a copy of a memory-mapped one)."""
        return np.array(self.array)


# ---------------------------------------------------------------- files


def read_arrays(path: str | os.PathLike, what: str = "calibration", *, archive: bool = False):
    """A .npy file's array, or a .npz file's arrays by name, read whole into memory (see :func:`open_arrays`)."""
    with open_arrays(path, what, archive=archive) as opened:
        if isinstance(opened, Mapping):
            return {name: stream.whole() for name, stream in opened.items()}
        return opened.whole()


@contextmanager
def open_arrays(path: str | os.PathLike, what: str = "calibration", *, archive: bool = False):
    """The arrays of a NumPy file as streams read forward in batches: one stream for a .npy file,
    name -> stream for a .npz archive (``archive``: an .npz archive whatever the file is called).

    Never unpickles. A missing, misnamed or unreadable file is a one-line error that names
    it as the ``what`` file ("calibration", "data", "labels", "statistics").
    """
    path = check_readable(path, what)
    if archive or path.suffix == ".npz":
        with _open_zip(path, what) as zipped:
            members = [name for name in zipped.namelist() if name.endswith(".npy")]
            yield {name[: -len(".npy")]: _NpyStream(zipped, name, path, what) for name in members}
    elif path.suffix == ".npy":
        yield _ArrayStream(_load_npy(path, what))
    else:
        raise OnnxcompError(f"{what} file {path}: expected a .npy or .npz file")


def _file_batches(path: Path, inputs: list[ModelInput], batch_size: int, axes: SampleAxes,
                  what: str = "calibration") -> Iterator[Feed]:
    with _opened_file(path, inputs, what) as streams:
        yield from _split(streams, inputs, batch_size, axes, what)


@contextmanager
def _opened_file(path: Path, inputs: list[ModelInput], what: str = "calibration"):
    """The arrays of a calibration (``what``) file as streams by model input name."""
    with open_arrays(path, what) as opened:
        if isinstance(opened, Mapping):
            _check_names(opened, inputs, f"{what} file {path}")
            yield opened
        else:
            yield {_single_input(inputs, f"the .npy file {path}"): opened}


def _load_npy(path: Path, what: str) -> np.ndarray:
    try:
        with open(path, "rb") as file:
            # np.load takes anything without the magic for a pickle and says so: misleading here.
            if file.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
                raise ValueError("not a NumPy .npy file")
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # truncated, not an .npy, object arrays, a folder, ...
        raise OnnxcompError(f"cannot read {what} file {path}: {first_line(exc)}") from None


def _open_zip(path: Path, what: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except Exception as exc:  # not a zip, truncated, a folder, ...
        raise OnnxcompError(f"cannot read {what} file {path}: {first_line(exc)}") from None


class _NpyStream:
    """One array of an .npz archive read forward in batches without loading it whole.

    Works for stored and compressed archives alike (zipfile decompresses as it
    reads); a Fortran-ordered array cannot be cut by rows and is loaded whole.
    """

    def __init__(self, archive: zipfile.ZipFile, member: str, path: Path, what: str):
        self.path, self.what = path, what
        try:
            self.file = archive.open(member)
            version = np.lib.format.read_magic(self.file)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            self.shape, fortran_order, self.dtype = header(self.file)
            if self.dtype.hasobject:
                raise ValueError("object arrays are not supported")
            self.loaded = np.lib.format.read_array(archive.open(member), allow_pickle=False) if fortran_order else None
        except Exception as exc:
            raise OnnxcompError(f"cannot read {member} in {what} file {path}: {first_line(exc)}") from None
        self.position = 0

    def read(self, count: int) -> np.ndarray:
        if self.loaded is not None:
            batch = np.ascontiguousarray(self.loaded[self.position : self.position + count])
            self.position += count
            return batch
        return self._read((count, *self.shape[1:]))

    def whole(self) -> np.ndarray:
        """The whole array (of a stream not read from yet)."""
        return self.loaded if self.loaded is not None else self._read(self.shape)

    def _read(self, shape: tuple) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
        try:
            raw = self.file.read(nbytes)
        except Exception as exc:  # CRC errors, broken deflate streams
            raise OnnxcompError(f"cannot read {self.what} file {self.path}: {first_line(exc)}") from None
        if len(raw) != nbytes:
            raise OnnxcompError(f"cannot read {self.what} file {self.path}: data ends early (truncated file?)")
        return np.frombuffer(raw, dtype=self.dtype).reshape(shape).copy()


# ---------------------------------------------------------------- validation


def _check_names(names: Iterable[str], inputs: list[ModelInput], where: str) -> None:
    names = set(names)
    required = [i.name for i in inputs]
    missing = [n for n in required if n not in names]
    unknown = sorted(n for n in names if n not in required)
    if missing or unknown:
        problems = []
        if missing:
            problems.append(f"missing input(s) {missing}")
        if unknown:
            problems.append(f"unknown input(s) {unknown}")
        raise OnnxcompError(f"{where}: {' and '.join(problems)}; the model's inputs are {required}")


def _validated(feed, inputs: list[ModelInput], where: str, what: str = "calibration") -> Feed:
    label = where if where.startswith(what) else f"{what} {where}"
    if not isinstance(feed, Mapping):
        raise OnnxcompError(f"{label} is a {type(feed).__name__}: expected a dict name -> array")
    _check_names(feed, inputs, label)
    return {i.name: _validated_array(feed[i.name], i, where) for i in inputs}


def _validated_array(value, model_input: ModelInput, where: str) -> np.ndarray:
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    name, expected = model_input.name, model_input.dtype
    if expected is not None and array.dtype != expected:
        raise OnnxcompError(
            f"input {name!r} ({where}): expected {expected} data, got {array.dtype} "
            f"(convert it, e.g. x.astype(np.{expected}); onnxcomp does not cast silently)"
        )
    _check_shape(array, model_input, where)
    if array.size == 0:
        raise OnnxcompError(f"input {name!r} ({where}) is empty: shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            raise OnnxcompError(f"input {name!r} ({where}) holds {bad} NaN or Inf value(s)")
    return np.ascontiguousarray(array)


def _check_shape(array: np.ndarray, model_input: ModelInput, where: str) -> None:
    dims = model_input.dims
    if dims is None:
        return
    if array.ndim != len(dims):
        raise OnnxcompError(
            f"input {model_input.name!r} ({where}): expected rank {len(dims)} like {model_input.describe()}, "
            f"got rank {array.ndim} with shape {array.shape}"
        )
    for axis, (want, got) in enumerate(zip(dims, array.shape)):
        # A batch smaller than a fixed batch size is fine: whoever runs it tops it up (the last
        # batch of a set, a batch from which validation samples were taken).
        if want is not None and want != got and not (axis == 0 and 0 < got < want):
            raise OnnxcompError(
                f"input {model_input.name!r} ({where}): dimension {axis} is {got}, but the model fixes it "
                f"to {want} ({model_input.describe()}; data shape {array.shape})"
            )
