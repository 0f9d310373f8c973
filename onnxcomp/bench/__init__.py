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

The data flows: models (:mod:`.models`) and held-out data (:mod:`.data`) -> output error
and agreement over all of it (:mod:`.fidelity`) -> latency (:mod:`.timing`) -> a
:class:`BenchResult` (:mod:`.result`). The data is read whole into memory (held-out sets
are small).
"""

from __future__ import annotations

import onnxruntime as ort

from ..calibration.readers import fixed_batch, model_inputs
from ..calibration.rowmask import resolve_row_mask
from ..config import is_integer
from ..errors import OnnxcompError
from ..runtime import Timer, execution_providers
from .data import checked_labels, read_held_out
from .fidelity import compare_on_data
from .models import ModelPair
from .reach import floors, subnormal_gains
from .result import BenchResult, Latency, ModelInfo, Timing
from .timing import time_pair

__all__ = ["BenchResult", "Latency", "ModelInfo", "Timing", "bench", "time_pair"]


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
    floor: bool = True,
    row_mask: str | None = "auto",
    batch_axes=None,
) -> BenchResult:
    """Compare ``compressed`` with ``original`` on held-out ``data``.

    ``original``, ``compressed``: .onnx paths or ``onnx.ModelProto``.
    ``data``: a .npz path (input name -> array; a ``labels`` array that is not a
    model input is taken as the labels), a .npy path (single-input models), a
    dict of arrays, one array, or an iterable / ``CalibrationDataReader`` of feed
    dicts (concatenated), with each input's samples on its sample axis (read from the model).
    ``labels``: class indices, an array or a .npy path (or a .npz holding ``labels``).
    ``provider``: "cpu" or "cuda". ``threads``: intra-op threads (default: onnxruntime's).
    ``batch_sizes``: the batch sizes timed. ``repeats``: timed A/B pairs per batch
    size (default: as many as fit in ~3 s, 15..2000). ``warmup``: warm-up pairs
    (default: ~0.3 s, at least 3). ``eval_batch_size``: batch for the error pass
    (default: the largest of ``batch_sizes``). ``floor``: also profile the models for the Amdahl
    floor of each timed batch size, the chains slower than their dense layer, and what setting
    subnormal weights to 0 buys (:mod:`onnxcomp.bench.reach`). ``row_mask``: as ``compress``'s
    (default: ``attention_mask``/``input_mask`` if the model has one): the padding positions of
    [N, seq, F] outputs are left out of the comparison. ``batch_axes``: as ``compress``'s (input or
    output name -> its sample axis, None for none, where the graph cannot tell).
    """
    batch_sizes = _positive_ints(batch_sizes, "batch sizes")
    _check_counts(repeats, warmup, threads)
    eval_batch = eval_batch_size if eval_batch_size is not None else max(batch_sizes)
    _positive_ints([eval_batch], "evaluation batch size")
    providers = execution_providers(provider)

    pair = ModelPair.open(original, compressed, providers, threads, batch_axes)
    inputs = model_inputs(pair.reference)
    held_out = read_held_out(data, labels, pair.reference, inputs)
    fixed = fixed_batch(inputs)
    notes = [] if pair.pairing is not None else ["the output names differ: outputs compared by position"]
    mask = resolve_row_mask(pair.reference, row_mask)
    if mask is not None:
        notes.append(f"row mask {mask.describe()}: the padding positions of [N, seq, F] outputs are left out")

    eval_size = fixed or eval_batch
    outputs, top1 = compare_on_data(pair, held_out, eval_size, fixed, mask.input if mask else None)
    accuracy = _accuracy(top1, held_out, pair.output_names[0])
    notes += _nonfinite_notes(outputs)

    if fixed:
        if any(b != fixed for b in batch_sizes):
            notes.append(f"the model has a fixed batch size of {fixed}: latency measured at batch {fixed} only")
        batch_sizes = [fixed]
    feeds = {i.name: held_out.feeds[i.name] for i in inputs}  # checked by the pass above
    latency = [time_pair(pair.sessions, feeds, held_out.samples, b, repeats, warmup) for b in batch_sizes]
    reach = subnormals = None
    if floor:
        reach = floors(pair.models, feeds, held_out.samples, latency, Timer(provider, threads))
        subnormals = subnormal_gains(pair.models, feeds, held_out.samples, batch_sizes[0], providers, threads,
                                     repeats, warmup)

    settings = {
        "provider": provider,
        "providers_used": pair.sessions[1].get_providers(),
        "threads": threads,
        "eval_batch_size": eval_size,
        "repeats": repeats,
        "warmup": warmup,
        "onnxruntime": ort.__version__,
        "allow_spinning": False,
    }
    info = pair.info(feeds)
    return BenchResult(
        original=info[0],
        compressed=info[1],
        samples=held_out.samples,
        inputs={name: [held_out.samples, *value.shape[1:]] for name, value in feeds.items()},
        outputs=outputs,
        top1_output=pair.output_names[0] if top1.applies else None,
        top1_agreement=top1.agreement(),
        accuracy=accuracy,
        latency=latency,
        settings=settings,
        notes=notes,
        reach=reach,
        subnormals=subnormals,
    )


def _nonfinite_notes(outputs: dict) -> list[str]:
    """NaN or Inf in the compressed model's outputs: said in words beside the infinite errors."""
    broken = {name: e["nonfinite"] for name, e in outputs.items() if e.get("nonfinite")}
    if not broken:
        return []
    counts = ", ".join(f"{name!r} {count}" for name, count in broken.items())
    return [f"the compressed model's outputs hold NaN or Inf values where the original's hold finite "
            f"ones ({counts}): an infinite error, and those samples never agree on top-1"]


def _accuracy(top1, held_out, first_output: str) -> dict | None:
    """Both models' accuracy against the labels (None: no labels)."""
    if held_out.labels is None:
        return None
    if not top1.applies:
        raise OnnxcompError(
            f"labels were given, but the first output {first_output!r} is not [batch, classes] scores, "
            "so there is nothing to score them against"
        )
    labels = checked_labels(held_out.labels, held_out.samples, top1.classes, held_out.label_source)
    original, compressed = top1.accuracy(labels)
    return {"original": original, "compressed": compressed, "labels": held_out.label_source}


def _check_counts(repeats, warmup, threads) -> None:
    if repeats is not None and (not isinstance(repeats, int) or repeats < 1):
        raise OnnxcompError(f"repeats must be a positive integer, got {repeats!r}")
    if warmup is not None and (not isinstance(warmup, int) or warmup < 0):
        raise OnnxcompError(f"warmup must be a non-negative integer, got {warmup!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise OnnxcompError(f"threads must be a positive integer, got {threads!r}")


def _positive_ints(values, what: str) -> list[int]:
    try:
        values = list(values)
    except TypeError:
        raise OnnxcompError(f"{what} must be positive integers, got {values!r}") from None
    if not values or any(not is_integer(v) or v < 1 for v in values):  # 2.5, True, inf: not a batch size
        raise OnnxcompError(f"{what} must be positive integers, got {values!r}")
    return sorted({int(v) for v in values})
