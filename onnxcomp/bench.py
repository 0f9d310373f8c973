"""``onnxcomp bench``: check a compressed model against its original before shipping it.

One call measures, on held-out data:

- size: parameters, multiply-adds per sample, file bytes (external data included);
- function: output error over *all* the data (relative L2, cosine, max abs, per
  output), top-1 agreement with the original, accuracy of both when labels are given;
- speed: latency of both models measured in one process the honest way (DESIGN.md §5):
  both sessions created once with ``allow_spinning=0``, warm-up first, then runs
  interleaved A B B A A B ... per batch size; medians, p10/p90 and IQR, and the
  compressed/original ratio (median and p10/p90 of the per-pair ratios).

Python::

    from onnxcomp.bench import bench
    result = bench("model.onnx", "model.small.onnx", "held_out.npz")
    print(result.table())
    result.save("bench.json")        # or result.to_dict()

The data is read whole into memory (held-out sets are small); the outputs are
not kept, only running sums, so their size does not matter.
"""

from __future__ import annotations

import gc
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .calibration.readers import iter_feeds, model_inputs
from .errors import OnnxcompError, first_line
from .model import count_macs, count_params, load_model
from .runtime import PROVIDERS, execution_providers, make_session

LABELS_KEY = "labels"

# Automatic repetition: per batch size, warm up for about WARMUP_SECONDS (at least
# MIN_WARMUP pairs), then time as many A/B pairs as fit in MEASURE_SECONDS, between
# MIN_PAIRS and MAX_PAIRS. Two batch sizes of a small model take about 7 s.
WARMUP_SECONDS, MIN_WARMUP, MAX_WARMUP = 0.3, 3, 500
MEASURE_SECONDS, MIN_PAIRS, MAX_PAIRS = 3.0, 15, 2000


# ---------------------------------------------------------------- result


@dataclass
class ModelInfo:
    """Static size of one model."""

    source: str  # the file path, or "<ModelProto>"
    params: int
    macs_per_sample: int | None  # None when shape inference cannot tell
    file_bytes: int  # the .onnx file plus its external data files (serialized size for a ModelProto)


@dataclass
class Timing:
    """One model's run times at one batch size, in milliseconds."""

    median_ms: float
    p10_ms: float
    p25_ms: float
    p75_ms: float
    p90_ms: float
    min_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> "Timing":
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p10, p25, p50, p75, p90 = np.percentile(ms, [10, 25, 50, 75, 90])
        return cls(float(p50), float(p10), float(p25), float(p75), float(p90), float(ms.min()))


@dataclass
class Latency:
    """Both models at one batch size: timed in interleaved pairs after a warm-up."""

    batch_size: int
    pairs: int  # timed runs of each model
    warmup: int  # warm-up runs of each model
    original: Timing
    compressed: Timing
    ratio: float  # median over the pairs of compressed / original (< 1: compressed is faster)
    pair_ratio_p10: float  # spread of that per-pair ratio
    pair_ratio_p90: float
    ratio_of_medians: float  # compressed median / original median
    note: str | None = None


@dataclass
class BenchResult:
    original: ModelInfo
    compressed: ModelInfo
    samples: int
    inputs: dict  # name -> shape of the whole data array
    outputs: dict  # output name -> {relative_l2, cosine, max_abs, nonfinite}
    top1_output: str | None  # the output used for agreement/accuracy (None: none looks like scores)
    top1_agreement: float | None  # fraction of samples whose argmax matches the original's
    accuracy: dict | None  # {"original": a, "compressed": b, "labels": source} when labels are given
    latency: list[Latency]
    settings: dict
    notes: list[str] = field(default_factory=list)

    @property
    def ratios(self) -> dict:
        """compressed / original for params, MACs and file size."""
        return {
            "params": _ratio(self.compressed.params, self.original.params),
            "macs_per_sample": _ratio(self.compressed.macs_per_sample, self.original.macs_per_sample),
            "file_bytes": _ratio(self.compressed.file_bytes, self.original.file_bytes),
        }

    def to_dict(self) -> dict:
        """Plain JSON-ready data; NaN/Inf (e.g. from NaN outputs) become null."""
        return _json_safe({
            "original": vars(self.original),
            "compressed": vars(self.compressed),
            "ratios": self.ratios,
            "data": {"samples": self.samples, "inputs": self.inputs},
            "outputs": self.outputs,
            "top1_output": self.top1_output,
            "top1_agreement": self.top1_agreement,
            "accuracy": self.accuracy,
            "latency": [
                {**{k: v for k, v in vars(l).items() if k not in ("original", "compressed")},
                 "original": vars(l.original), "compressed": vars(l.compressed)}
                for l in self.latency
            ],
            "settings": self.settings,
            "notes": self.notes,
        })

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as JSON (atomically: no half-written file)."""
        path = Path(path)
        directory = path.parent if str(path.parent) else Path(".")
        if not directory.is_dir():
            raise OnnxcompError(f"output folder does not exist: {directory}")
        handle, staged = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
        try:
            with os.fdopen(handle, "w") as f:
                json.dump(self.to_dict(), f, indent=2, allow_nan=False)
                f.write("\n")
            os.replace(staged, path)
        except BaseException:
            Path(staged).unlink(missing_ok=True)
            raise

    def table(self) -> str:
        lines = [f"original:   {self.original.source}", f"compressed: {self.compressed.source}"]
        shapes = ", ".join(f"{name} {list(shape)}" for name, shape in self.inputs.items())
        provider = self.settings["provider"]
        threads = self.settings["threads"] or "default"
        lines.append(f"data: {self.samples} samples ({shapes}); {provider}, intra-op threads {threads}")
        lines.append("")

        rows = [("", "original", "compressed", "ratio")]
        for label, key in (("params", "params"), ("MACs/sample", "macs_per_sample"), ("file bytes", "file_bytes")):
            a, b = getattr(self.original, key), getattr(self.compressed, key)
            rows.append((label, _int(a), _int(b), _fmt_ratio(self.ratios[key])))
        if self.accuracy is not None:
            a, b = self.accuracy["original"], self.accuracy["compressed"]
            rows.append(("accuracy", f"{a:.2%}", f"{b:.2%}", f"{(b - a) * 100:+.2f} pts"))
        lines += _columns(rows, right=(1, 2, 3))
        lines.append("")

        lines.append(f"output error, compressed vs original, over all {self.samples} samples:")
        rows = [("output", "rel. L2", "cosine", "max abs")]
        for name, e in self.outputs.items():
            extra = f"  ({e['nonfinite']} non-finite values)" if e.get("nonfinite") else ""
            rows.append((name, _g(e["relative_l2"]), _cos(e["cosine"]), _g(e["max_abs"]) + extra))
        lines += _columns(rows, right=(1, 2))
        if self.top1_agreement is not None:
            agree = round(self.top1_agreement * self.samples)
            lines.append(f"top-1 agreement ({self.top1_output}): {self.top1_agreement:.2%} ({agree}/{self.samples})")
        else:
            lines.append("top-1 agreement: n/a (the first output is not [batch, classes] scores)")
        lines.append("")

        if self.latency:
            lines.append("latency in ms: median [p10, p90], both models in one process, runs interleaved after warm-up")
            rows = [("batch", "pairs", "original", "compressed", "ratio [p10, p90]")]
            for l in self.latency:
                rows.append((
                    str(l.batch_size), str(l.pairs), _timing(l.original), _timing(l.compressed),
                    f"{l.ratio:.3f} [{l.pair_ratio_p10:.2f}, {l.pair_ratio_p90:.2f}]",
                ))
            lines += _columns(rows, right=(0, 1))
            lines.append("ratio = compressed / original within each pair of runs, median (< 1: the compressed model is faster)")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines).rstrip()


# ---------------------------------------------------------------- the API


def bench(
    original,
    compressed,
    data,
    *,
    labels=None,
    provider: str = "cpu",
    threads: int | None = None,
    batch_sizes=(1, 32),
    repeats: int | None = None,
    warmup: int | None = None,
    eval_batch_size: int | None = None,
) -> BenchResult:
    """Compare ``compressed`` with ``original`` on held-out ``data``.

    ``original``, ``compressed``: .onnx paths or ``onnx.ModelProto``.
    ``data``: a .npz path (input name -> array; a ``labels`` array that is not a
    model input is taken as the labels), a .npy path (single-input models), a
    dict of arrays, one array, or an iterable / ``CalibrationDataReader`` of feed
    dicts (concatenated). The first axis is the sample axis.
    ``labels``: class indices, an array or a .npy path (or a .npz holding ``labels``).
    ``provider``: "cpu" or "cuda". ``threads``: intra-op threads (default: onnxruntime's).
    ``batch_sizes``: the batch sizes timed. ``repeats``: timed A/B pairs per batch
    size (default: as many as fit in ~3 s, 15..2000). ``warmup``: warm-up pairs
    (default: ~0.3 s, at least 3). ``eval_batch_size``: batch for the error pass
    (default: the largest of ``batch_sizes``).
    """
    batch_sizes = _positive_ints(batch_sizes, "batch sizes")
    if repeats is not None and (not isinstance(repeats, int) or repeats < 1):
        raise OnnxcompError(f"repeats must be a positive integer, got {repeats!r}")
    if warmup is not None and (not isinstance(warmup, int) or warmup < 0):
        raise OnnxcompError(f"warmup must be a non-negative integer, got {warmup!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise OnnxcompError(f"threads must be a positive integer, got {threads!r}")
    eval_batch = eval_batch_size if eval_batch_size is not None else max(batch_sizes)
    _positive_ints([eval_batch], "evaluation batch size")
    providers = execution_providers(provider)

    models = [_load(original, "original"), _load(compressed, "compressed")]
    sessions = [_session(model, source, providers, threads, which)
                for (model, source), which in zip(models, ("original", "compressed"))]
    _same_inputs(sessions[0], sessions[1])
    reference = models[0][0]
    inputs = model_inputs(reference)
    feeds, label_array, label_source = _read_data(data, labels, reference, inputs)
    samples = _sample_count(feeds, inputs)
    if label_array is not None and samples is not None and (label_array.ndim == 0 or label_array.shape[0] != samples):
        raise OnnxcompError(f"{label_array.size} labels ({label_source}) for {samples} data samples")
    fixed = _fixed_batch(inputs)
    notes = []

    # ---- output error, agreement and accuracy over all the data
    names = [o.name for o in sessions[0].get_outputs()]
    pairing = _pair_outputs(sessions[0], sessions[1])
    if pairing is None:
        notes.append("the output names differ: outputs compared by position")
    eval_size = fixed or eval_batch
    outputs, scores = _error_pass(sessions, reference, feeds, samples, eval_size, fixed, names, pairing)
    top1_name = names[0] if scores is not None else None

    agreement = accuracy = None
    if scores is not None:
        pred_a, pred_b, classes = scores
        agreement = float(np.mean(pred_a == pred_b))
    if label_array is not None:
        if scores is None:
            raise OnnxcompError(
                f"labels were given, but the first output {names[0]!r} is not [batch, classes] scores, "
                "so there is nothing to score them against"
            )
        label_array = _check_labels(label_array, samples, classes, label_source)
        accuracy = {
            "original": float(np.mean(pred_a == label_array)),
            "compressed": float(np.mean(pred_b == label_array)),
            "labels": label_source,
        }

    # ---- latency
    if fixed:
        if any(b != fixed for b in batch_sizes):
            notes.append(f"the model has a fixed batch size of {fixed}: latency measured at batch {fixed} only")
        batch_sizes = [fixed]
    feeds = {name: feeds[name] for name in (i.name for i in inputs)}  # checked by the pass above
    latency = [time_pair(sessions, feeds, samples, b, repeats, warmup) for b in batch_sizes]

    import onnxruntime as ort

    settings = {
        "provider": provider,
        "providers_used": sessions[1].get_providers(),
        "threads": threads,
        "eval_batch_size": eval_size,
        "repeats": repeats,
        "warmup": warmup,
        "onnxruntime": ort.__version__,
        "allow_spinning": False,
    }
    return BenchResult(
        original=_model_info(*models[0], feeds, sessions[0]),
        compressed=_model_info(*models[1], feeds, sessions[1]),
        samples=samples,
        inputs={name: [samples, *value.shape[1:]] for name, value in feeds.items()},
        outputs=outputs,
        top1_output=top1_name,
        top1_agreement=agreement,
        accuracy=accuracy,
        latency=latency,
        settings=settings,
        notes=notes,
    )


# ---------------------------------------------------------------- CLI


def register_command(commands) -> None:
    parser = commands.add_parser(
        "bench",
        help="compare a compressed model with its original: size, output error, accuracy, latency",
        description="Validate a compressed model against the original on held-out data: params, MACs, "
                    "file size, output error, top-1 agreement, accuracy (with labels) and latency "
                    "(both models in one process, interleaved runs).",
    )
    parser.add_argument("original", help="the original model (.onnx)")
    parser.add_argument("compressed", help="the compressed model (.onnx)")
    parser.add_argument("--data", required=True,
                        help="held-out data: .npz (input name -> array, optionally 'labels') or .npy (single-input model)")
    parser.add_argument("--labels", help="class labels (.npy); default: the 'labels' array of the .npz, if any")
    parser.add_argument("--provider", default="cpu", choices=sorted(PROVIDERS), help="execution provider (default cpu)")
    parser.add_argument("--threads", type=int, help="intra-op threads per session (default: onnxruntime's choice)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], metavar="N",
                        help="batch sizes to time (default: 1 32)")
    parser.add_argument("--repeats", type=int,
                        help="timed runs of each model per batch size (default: as many as fit in ~3 s)")
    parser.add_argument("--warmup", type=int, help="warm-up runs of each model per batch size (default: ~0.3 s)")
    parser.add_argument("--eval-batch-size", type=int, help="batch size of the error pass (default: the largest --batch-sizes)")
    parser.add_argument("--json", help="also write the results as JSON here")
    parser.set_defaults(run=_run)


def _run(args) -> int:
    result = bench(
        args.original, args.compressed, args.data, labels=args.labels, provider=args.provider,
        threads=args.threads, batch_sizes=args.batch_sizes, repeats=args.repeats, warmup=args.warmup,
        eval_batch_size=args.eval_batch_size,
    )
    print(result.table())
    if args.json:
        result.save(args.json)
        print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------- models and sessions


def _load(model, which: str) -> tuple[onnx.ModelProto, str | None]:
    """The model, and its file path when it came from one (sessions then load the file)."""
    if isinstance(model, onnx.ModelProto):
        return model, None
    if not isinstance(model, (str, os.PathLike)):
        raise OnnxcompError(f"the {which} model must be an .onnx path or an onnx.ModelProto, got {type(model).__name__}")
    return load_model(model), str(model)


def _session(model: onnx.ModelProto, path: str | None, providers, threads, which: str):
    try:
        session = make_session(path if path is not None else model, providers, threads)
    except Exception as exc:
        raise OnnxcompError(f"onnxruntime cannot load the {which} model: {first_line(exc)}") from None
    if providers[0] != "CPUExecutionProvider" and providers[0] not in session.get_providers():
        raise OnnxcompError(
            f"onnxruntime fell back to {session.get_providers()} for the {which} model: "
            f"{providers[0]} failed to start (check the CUDA/cuDNN libraries)"
        )
    return session


def _same_inputs(original, compressed) -> None:
    a = {i.name: i.type for i in original.get_inputs()}
    b = {i.name: i.type for i in compressed.get_inputs()}
    if a != b:
        raise OnnxcompError(f"the models' inputs differ: original {_describe(a)}, compressed {_describe(b)}")


def _pair_outputs(original, compressed) -> list[int] | None:
    """Index of each original output among the compressed outputs (None: matched by position)."""
    a = [o.name for o in original.get_outputs()]
    b = [o.name for o in compressed.get_outputs()]
    if sorted(a) == sorted(b):
        return [b.index(name) for name in a]
    if len(a) != len(b):
        raise OnnxcompError(f"the original has outputs {a} but the compressed model has {b}")
    return None


def _model_info(model: onnx.ModelProto, path: str | None, feeds: dict, session) -> ModelInfo:
    shapes = {}
    static = {i.name: i.shape for i in session.get_inputs()}
    for name, value in feeds.items():
        dims = static.get(name) or []
        per_sample = [1, *value.shape[1:]]
        if len(dims) == len(per_sample) and isinstance(dims[0], int) and dims[0] > 0:
            per_sample[0] = dims[0]  # a fixed batch stays fixed, or shape inference may break
        shapes[name] = per_sample
    try:
        macs = count_macs(model, shapes)
    except Exception:  # shape inference trouble: MACs are a help here, not a requirement
        macs = None
    return ModelInfo(path or "<ModelProto>", count_params(model), macs, _file_bytes(model, path))


def _file_bytes(model: onnx.ModelProto, path: str | None) -> int:
    if path is None:
        try:
            return model.ByteSize()
        except Exception:  # protobuf refuses to size messages over 2 GB
            return sum(len(t.raw_data) for t in model.graph.initializer)
    path = Path(path)
    total = path.stat().st_size
    locations = set()
    for tensor in _all_tensors(onnx.load(str(path), load_external_data=False)):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entry = {e.key: e.value for e in tensor.external_data}
            if "location" in entry:
                locations.add(entry["location"])
    for location in sorted(locations):
        data_file = path.parent / location
        if data_file.is_file():
            total += data_file.stat().st_size
    return total


def _all_tensors(model: onnx.ModelProto):
    """Every TensorProto of the model: initializers and tensor attributes, subgraphs included."""
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


# ---------------------------------------------------------------- data


def _read_data(data, labels, model, inputs) -> tuple[dict, np.ndarray | None, str | None]:
    """(the whole data set as input name -> array, labels or None, where the labels came from).

    A ``labels`` array beside the inputs (in a .npz or a dict) is the labels, and is
    not fed, unless the model has an input of that name; ``labels`` wins over it.
    Readers and iterables are read through (each batch checked) and stacked.
    """
    names = [i.name for i in inputs]
    label_source = None
    if isinstance(data, (str, os.PathLike, dict)):
        feeds = _read_file(data, "data") if not isinstance(data, dict) else {k: np.asarray(v) for k, v in data.items()}
        if isinstance(feeds, dict) and LABELS_KEY in feeds and LABELS_KEY not in names:
            found = feeds.pop(LABELS_KEY)
            if labels is None:
                where = "data" if isinstance(data, dict) else Path(data).name
                labels, label_source = np.asarray(found), f"{where}:{LABELS_KEY}"
    elif isinstance(data, np.ndarray):
        feeds = data
    elif callable(getattr(data, "get_next", None)) or hasattr(data, "__iter__"):
        batches = list(iter_feeds(data, model))
        try:
            feeds = {name: np.concatenate([b[name] for b in batches], axis=0) for name in names}
        except ValueError as exc:
            raise OnnxcompError(f"the data's batches do not stack along axis 0: {first_line(exc)}") from None
    else:
        raise OnnxcompError(f"cannot read data of type {type(data).__name__}: give a .npz/.npy path, arrays or feed dicts")
    if not isinstance(feeds, dict):  # one array
        if len(names) != 1:
            raise OnnxcompError(
                f"the data is one array, but the model has {len(names)} inputs {names}: "
                "give a .npz / dict with one array per input name"
            )
        feeds = {names[0]: feeds}

    if labels is not None and label_source is None:
        if isinstance(labels, (str, os.PathLike)):
            label_source = str(labels)
            labels = _read_file(labels, "labels")
            if isinstance(labels, dict):
                if LABELS_KEY in labels:
                    labels = labels[LABELS_KEY]
                elif len(labels) == 1:
                    labels = next(iter(labels.values()))
                else:
                    raise OnnxcompError(f"the labels file {label_source} holds several arrays and none is named 'labels'")
        else:
            label_source = "array"
        labels = np.asarray(labels)
    return feeds, labels, label_source


def _read_file(path, what: str):
    path = Path(path)
    if not path.is_file():
        raise OnnxcompError(f"{what} file not found: {path}")
    if path.suffix not in (".npz", ".npy"):
        raise OnnxcompError(f"{what} file {path} is not .npz or .npy")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)  # never unpickle: a pickle can run code
        with np.load(path, allow_pickle=False) as loaded:
            return {name: loaded[name] for name in loaded.files}
    except Exception as exc:
        raise OnnxcompError(f"cannot read {what} file {path}: {first_line(exc)}") from None


def _sample_count(feeds: dict, inputs) -> int | None:
    """Length of axis 0 of the model's input arrays (None: the reader will say what is wrong)."""
    lengths = {i.name: np.shape(feeds[i.name])[0] for i in inputs if i.name in feeds and np.ndim(feeds[i.name])}
    if len(set(lengths.values())) > 1:
        raise OnnxcompError(f"the data's inputs hold different numbers of samples along axis 0: {lengths}")
    if len(lengths) != len(inputs):
        return None
    count = next(iter(lengths.values()), None)
    if count == 0:
        raise OnnxcompError("the data is empty: 0 samples")
    return count


def _fixed_batch(inputs) -> int | None:
    """The batch size when every input fixes its first dimension (as the reader splits), else None."""
    firsts = {i.dims[0] if i.dims else None for i in inputs}
    return firsts.pop() if len(firsts) == 1 and None not in firsts else None


def _slice(feeds: dict, start: int, size: int, samples: int, pad_to: int | None = None):
    """Samples [start, start + size); with ``pad_to`` padded to that many by wrapping around."""
    stop = min(start + size, samples)
    real = stop - start
    count = pad_to or real
    if start == 0 and count <= samples:
        return {k: np.ascontiguousarray(v[:count]) for k, v in feeds.items()}, real
    index = np.arange(start, start + count) % samples
    return {k: np.ascontiguousarray(np.asarray(v)[index]) for k, v in feeds.items()}, real


def _check_labels(labels: np.ndarray, samples: int, classes: int, source: str) -> np.ndarray:
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


def _class_scores(output: np.ndarray) -> np.ndarray | None:
    """The output as [batch, classes] float scores, or None when it does not look like that."""
    if output.dtype.kind != "f" or output.ndim < 2:
        return None
    if output.ndim > 2 and all(d == 1 for d in output.shape[2:]):  # e.g. [N, 1000, 1, 1]
        output = output.reshape(output.shape[:2])
    if output.ndim != 2 or output.shape[1] < 2:
        return None
    return output


# ---------------------------------------------------------------- error pass


def _error_pass(sessions, reference, feeds, samples, eval_size, fixed, names, pairing):
    """Run both models over all the data; returns (per-output errors, (argmax A, argmax B, classes) or None)."""
    errors = {name: _ErrorSums() for name in names}
    top_a, top_b, classes, is_scores = [], [], None, True
    source = feeds
    if fixed and samples and samples % fixed:
        # A fixed batch: the last one is topped up with the first samples, their outputs dropped.
        padded = -(-samples // fixed) * fixed
        source, _ = _slice(feeds, 0, padded, samples, pad_to=padded)
    # The shared reader checks every batch: names, dtypes (no silent casts), shapes, NaN/Inf.
    for index, batch in enumerate(iter_feeds(source, reference, batch_size=eval_size)):
        real = min(eval_size, samples - index * eval_size)
        ref = sessions[0].run(None, batch)
        new = sessions[1].run(None, batch)
        if pairing is not None:
            new = [new[i] for i in pairing]
        if fixed and real < fixed:
            ref = [r[:real] if r.ndim and r.shape[0] == fixed else r for r in ref]
            new = [n[:real] if n.ndim and n.shape[0] == fixed else n for n in new]
        for name, r, n in zip(names, ref, new):
            if r.shape != n.shape:
                raise OnnxcompError(
                    f"output {name!r} has shape {list(r.shape)} in the original but {list(n.shape)} in the compressed model"
                )
            errors[name].add(r, n)
        if is_scores:  # the first output, when it is one row of class scores per sample
            scores_a, scores_b = _class_scores(ref[0]), _class_scores(new[0])
            is_scores = scores_a is not None and scores_a.shape[0] == real
            if is_scores:
                classes = scores_a.shape[1]
                top_a.append(scores_a.argmax(axis=1))
                top_b.append(scores_b.argmax(axis=1))
    outputs = {name: sums.result() for name, sums in errors.items()}
    if not is_scores:
        return outputs, None
    return outputs, (np.concatenate(top_a), np.concatenate(top_b), classes)


# ---------------------------------------------------------------- error sums


class _ErrorSums:
    """Running sums for relative L2, cosine and max abs over batches, in float64."""

    def __init__(self):
        self.diff2 = self.ref2 = self.new2 = self.dot = self.max_abs = 0.0
        self.nonfinite = 0

    def add(self, ref: np.ndarray, new: np.ndarray) -> None:
        ref = np.asarray(ref, dtype=np.float64).ravel()
        new = np.asarray(new, dtype=np.float64).ravel()
        diff = new - ref
        self.diff2 += float(diff @ diff)
        self.ref2 += float(ref @ ref)
        self.new2 += float(new @ new)
        self.dot += float(ref @ new)
        self.nonfinite += int(new.size - np.count_nonzero(np.isfinite(new)))
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))

    def result(self) -> dict:
        ref_norm, new_norm = math.sqrt(self.ref2), math.sqrt(self.new2)
        if ref_norm > 0:
            relative = math.sqrt(self.diff2) / ref_norm
        else:  # an all-zero reference: 0 when both are zero, else no finite relative error
            relative = 0.0 if self.diff2 == 0 else math.inf
        if ref_norm > 0 and new_norm > 0:
            cosine = min(1.0, max(-1.0, self.dot / (ref_norm * new_norm)))  # rounding can pass 1
        else:
            cosine = 1.0 if ref_norm == new_norm else 0.0  # both zero: identical; one zero: orthogonal
        return {"relative_l2": relative, "cosine": cosine, "max_abs": self.max_abs, "nonfinite": self.nonfinite}


# ---------------------------------------------------------------- latency


def time_pair(sessions, feeds: dict, samples: int, batch: int, repeats: int | None = None,
              warmup: int | None = None) -> Latency:
    """Both sessions timed in interleaved pairs at one batch size."""
    feed, _ = _slice(feeds, 0, batch, samples, pad_to=batch)
    note = f"batch built by repeating the {samples} samples" if batch > samples else None
    a, b = sessions

    def once(session) -> float:
        begin = time.perf_counter()
        session.run(None, feed)
        return time.perf_counter() - begin

    # Warm-up: the first runs at a new shape allocate and plan; frequency scaling settles.
    warm_a, warm_b = [], []
    begin = time.perf_counter()
    while True:
        warm_a.append(once(a))
        warm_b.append(once(b))
        done = len(warm_a)
        if warmup is not None:
            if done >= warmup:
                break
        elif done >= MAX_WARMUP or (done >= MIN_WARMUP and time.perf_counter() - begin >= WARMUP_SECONDS):
            break
    if repeats is None:
        recent = np.median(warm_a[-MIN_WARMUP:]) + np.median(warm_b[-MIN_WARMUP:])
        repeats = int(np.clip(MEASURE_SECONDS / max(recent, 1e-9), MIN_PAIRS, MAX_PAIRS))

    # Interleaved pairs, alternating which model goes first (A B, B A, A B, ...) so that
    # neither always runs in the other's wake. No garbage collection while timing.
    times_a, times_b = [], []
    collecting = gc.isenabled()
    gc.disable()
    try:
        for i in range(repeats):
            if i % 2 == 0:
                times_a.append(once(a))
                times_b.append(once(b))
            else:
                times_b.append(once(b))
                times_a.append(once(a))
    finally:
        if collecting:
            gc.enable()
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


# ---------------------------------------------------------------- small helpers


def _positive_ints(values, what: str) -> list[int]:
    try:
        values = [int(v) for v in values]
    except (TypeError, ValueError):
        raise OnnxcompError(f"{what} must be positive integers, got {values!r}") from None
    if not values or any(v < 1 for v in values):
        raise OnnxcompError(f"{what} must be positive integers, got {values}")
    return sorted(set(values))


def _ratio(new, old) -> float | None:
    if new is None or old is None or old == 0:
        return None
    return new / old


def _json_safe(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def _describe(inputs: dict) -> str:
    return "[" + ", ".join(f"{name}: {kind}" for name, kind in inputs.items()) + "]"



def _int(value) -> str:
    return "?" if value is None else f"{value:,}"


def _fmt_ratio(value) -> str:
    return "?" if value is None else f"{value:.3f}"


def _g(value: float) -> str:
    if value is None or not math.isfinite(value):
        return str(value)
    return "0" if value == 0 else f"{value:.3g}"


def _cos(value: float) -> str:
    return f"{value:.6f}" if math.isfinite(value) else str(value)


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _timing(t: Timing) -> str:
    return f"{_ms(t.median_ms)} [{_ms(t.p10_ms)}, {_ms(t.p90_ms)}]"


def _columns(rows, right=()) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [str(v).rjust(w) if i in right else str(v).ljust(w) for i, (v, w) in enumerate(zip(row, widths))]
        out.append("  ".join(cells).rstrip())
    return out
