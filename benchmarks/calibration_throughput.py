"""Calibration throughput against the Gram floor of DESIGN.md §3, on a ResNet-50- or a YOLOv8n-shaped model.

Prints samples/s of plain onnxruntime inference, of statistics collection
(``collect_statistics``: layer inputs as extra outputs, reduced in NumPy) with
float32 and with float64 products, and of the floors: the symmetric Gram
products alone (ssyrk / dsyrk on random matrices with each statistic's
(rows, d) shape per batch, as if every layer input were reduced by one syrk of
its patches; stride-1 convs are reduced by shifted products that do less work,
so the collection can beat the floor). Each collection runs in its own child
process, which times its floor batch by batch right before the collection and
again right after it (the better of the two per batch counts: the machine is
shared, and other work steals cores in bursts), so that a ratio compares
numbers from one process and one stretch of time. Every batch is timed on its
own; the best batch tells what the code does on a quiet machine, the median
what it did in this run. Peak memory is the child's (ru_maxrss; with
``--trace-memory`` also tracemalloc's peak of the Python-side arrays, which
slows the collection down by up to a second per batch). BLAS threads are set with threadpoolctl (``--threads``,
default 1: OpenBLAS's threads spin, and slow down 3-5x when another process
holds a core); onnxruntime keeps its default intra-op threads.

    python benchmarks/calibration_throughput.py [--model resnet50|yolo] [--batches 3] [--batch-size 32] [--threads 1]
        [--precisions float32 float64] [--trace-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.linalg import blas

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from resnet50 import build_resnet50  # noqa: E402
from yolo_shaped import build_yolo_shaped, smooth_images  # noqa: E402

from onnxcomp.calibration.collect import collect_statistics  # noqa: E402
from onnxcomp.model import find_layers, load_model  # noqa: E402
from onnxcomp.runtime import make_session  # noqa: E402

CACHE = HERE / ".cache"


@dataclass(frozen=True)
class Subject:
    """A benchmark model: where it is cached, how to build it, its input and its data."""

    name: str
    path: Path
    input: str
    image_size: int
    build: Callable[[Path], None]
    images: Callable[[int, int, int], np.ndarray]  # (count, size, seed) -> NCHW float32


def _random_images(count: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, size, size), dtype=np.float32)


def _save_yolo(path: Path) -> None:
    import onnx

    onnx.save(build_yolo_shaped(320), str(path))


SUBJECTS = {
    "resnet50": Subject("ResNet-50-shaped model", CACHE / "resnet50.onnx", "input", 224,
                        lambda path: build_resnet50(path), _random_images),
    "yolo": Subject("YOLOv8n-shaped model (320x320, smooth random images)", CACHE / "yolo_shaped.onnx", "images",
                    320, _save_yolo, smooth_images),
}


def calibration_data(subject: Subject, batches: int, batch_size: int) -> list[np.ndarray]:
    return [subject.images(batch_size, subject.image_size, seed) for seed in range(batches)]


def timed(batches: list[np.ndarray], stamps: list[float]):
    """Yield the batches, noting when each is asked for: the gaps are the per-batch times."""
    for batch in batches:
        stamps.append(time.perf_counter())
        yield batch
    stamps.append(time.perf_counter())


def blas_threads(threads: int):
    from threadpoolctl import threadpool_limits

    return threadpool_limits(threads)


# ---------------------------------------------------------------- child measurements


def measure_inference(subject: Subject, batches: int, batch_size: int, precision: str, trace: bool = False) -> dict:
    session = make_session(subject.path)
    data = calibration_data(subject, batches, batch_size)
    session.run(None, {subject.input: data[0]})  # warm-up: first-run allocations and kernel choices
    seconds = []
    for batch in data:
        start = time.perf_counter()
        session.run(None, {subject.input: batch})
        seconds.append(time.perf_counter() - start)
    return {"batch_seconds": seconds, "seconds": sum(seconds)}


def measure_statistics(subject: Subject, batches: int, batch_size: int, precision: str, trace: bool = False) -> dict:
    """The floor in ``precision``, the collection, the floor again: all per batch, in this process."""
    model = load_model(subject.path)
    layers, _ = find_layers(model)
    data = calibration_data(subject, batches, batch_size)
    shapes = statistic_shapes(subject, batch_size)
    dtype = np.float32 if precision == "float32" else np.float64
    floor_before = gram_floor_seconds(shapes, batches, dtype)
    stamps: list[float] = []
    if trace:
        tracemalloc.start()
    start = time.perf_counter()
    collect_statistics(model, layers, timed(data, stamps), batch_size=batch_size, progress=False,
                       precision=precision)
    seconds = time.perf_counter() - start  # with session creation and the final symmetrisation
    traced_peak = tracemalloc.get_traced_memory()[1] if trace else float("nan")
    tracemalloc.stop()
    floor_after = gram_floor_seconds(shapes, batches, dtype)
    floor = [min(a, b) for a, b in zip(floor_before, floor_after)]
    return {"batch_seconds": list(np.diff(stamps)), "seconds": seconds, "tracemalloc_peak_mb": traced_peak / 2**20,
            "floor_seconds": floor}


def run_child(args: list[str]) -> dict:
    """Run one measurement in a fresh interpreter; its JSON result plus its peak RSS."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def child_main(argv: list[str]) -> None:
    what, model, batches, batch_size, threads, precision, trace = argv
    measure = {"inference": measure_inference, "statistics": measure_statistics}[what]
    with blas_threads(int(threads)):
        result = measure(SUBJECTS[model], int(batches), int(batch_size), precision, trace == "trace")
    result["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps(result))


# ---------------------------------------------------------------- the floor


def statistic_shapes(subject: Subject, batch_size: int) -> dict[str, tuple[int, int]]:
    """(rows per batch, d) of every statistic key of the model."""
    model = load_model(subject.path)
    layers, _ = find_layers(model, {subject.input: [batch_size, 3, subject.image_size, subject.image_size]})
    shapes = {}
    for layer in layers:
        positions = layer.positions if layer.conv is not None else 1
        shapes[layer.stats_key] = (batch_size * positions, layer.in_features)
    return shapes


def gram_floor_seconds(shapes: dict[str, tuple[int, int]], batches: int, dtype=np.float64) -> list[float]:
    """Seconds of the symmetric Gram products in ``dtype`` (ssyrk or dsyrk), per batch."""
    rng = np.random.default_rng(1)
    syrk = blas.ssyrk if dtype == np.float32 else blas.dsyrk
    seconds = [0.0] * batches
    for rows, dim in shapes.values():
        x = rng.standard_normal((rows, dim), dtype=np.float32).astype(dtype, copy=False)
        syrk(1.0, x[: min(rows, 256)].T)  # warm-up: BLAS threads, code pages
        for batch in range(batches):
            start = time.perf_counter()
            syrk(1.0, x.T)  # x.T is (d, rows) Fortran-ordered: no copy, X^T X upper triangle
            seconds[batch] += time.perf_counter() - start
    return seconds


# ---------------------------------------------------------------- report


def rates(batch_size: int, seconds: list[float]) -> tuple[float, float]:
    """(best, median) samples/s over the batches."""
    return batch_size / min(seconds), batch_size / float(np.median(seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SUBJECTS), default="resnet50")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (threadpoolctl; default 1)")
    parser.add_argument("--precisions", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--trace-memory", action="store_true",
                        help="also report tracemalloc's peak (slows the collection down)")
    args = parser.parse_args()
    subject = SUBJECTS[args.model]
    if not subject.path.exists():
        subject.path.parent.mkdir(parents=True, exist_ok=True)
        subject.build(subject.path)
    batch = args.batch_size
    sizes = [args.model, str(args.batches), str(batch), str(args.threads)]
    print(f"{subject.name}, {args.batches} batches of {batch}, {os.cpu_count()} CPUs, BLAS threads {args.threads}, "
          f"load average at start {os.getloadavg()[0]:.2f}; samples/s as best batch / median batch")

    trace = "trace" if args.trace_memory else "-"
    inference = run_child(["inference", *sizes, "float32", trace])
    best, median = rates(batch, inference["batch_seconds"])
    print(f"plain onnxruntime inference: {best:7.2f} / {median:7.2f} samples/s "
          f"(peak RSS {inference['maxrss_mb']:.0f} MB)")

    shapes = statistic_shapes(subject, batch)
    macs = sum(rows * dim * dim / 2 for rows, dim in shapes.values()) / batch
    print(f"Gram floor: {len(shapes)} statistics, {macs / 1e9:.2f} G multiply-adds per sample (syrk, half of X^T X)")
    for precision in args.precisions:
        result = run_child(["statistics", *sizes, precision, trace])
        floor_best, floor_median = rates(batch, result["floor_seconds"])
        best, median = rates(batch, result["batch_seconds"])
        print(f"  {precision} floor     : {floor_best:7.2f} / {floor_median:7.2f} samples/s "
              f"({macs * floor_best / 1e9:.1f} GMAC/s at best)")
        print(f"  {precision} statistics: {best:7.2f} / {median:7.2f} samples/s = {best / floor_best:5.1%} / "
              f"{median / floor_median:5.1%} of the {precision} floor; whole call "
              f"{args.batches * batch / result['seconds']:.2f} samples/s; peak RSS {result['maxrss_mb']:.0f} MB"
              + (f", tracemalloc peak {result['tracemalloc_peak_mb']:.0f} MB" if args.trace_memory else "")
              + f"; load average {os.getloadavg()[0]:.2f}")
    print(f"load average at end {os.getloadavg()[0]:.2f} (other work on the machine skews every number)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        main()
