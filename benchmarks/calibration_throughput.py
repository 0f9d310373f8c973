"""Calibration throughput on a ResNet-50-shaped model, against the Gram floor of DESIGN.md §3.

Prints samples/s of plain onnxruntime inference, of statistics collection
(``collect_statistics``: layer inputs as extra outputs, float64 dsyrk in NumPy),
and of the floor: the float64 symmetric Gram products alone (dsyrk on random
matrices with each statistic's (rows, d) shape per batch), timed on this
machine in the same run, right before the collection.
Every batch is timed on its own; the best batch tells what the code does on a
quiet machine, the median what it did in this run (the development machine is
shared, and other work steals cores in bursts). Each measurement runs in its
own child process so that its peak memory (ru_maxrss; tracemalloc for the
Python-side arrays) is its own.

    python benchmarks/calibration_throughput.py [--batches 3] [--batch-size 32]
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
from pathlib import Path

import numpy as np
from scipy.linalg import blas

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from resnet50 import build_resnet50  # noqa: E402

from onnxcomp.calibration.collect import collect_statistics  # noqa: E402
from onnxcomp.model import find_layers, load_model  # noqa: E402
from onnxcomp.runtime import make_session  # noqa: E402

MODEL = HERE / ".cache" / "resnet50.onnx"


def calibration_data(batches: int, batch_size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((batch_size, 3, 224, 224), dtype=np.float32) for _ in range(batches)]


def timed(batches: list[np.ndarray], stamps: list[float]):
    """Yield the batches, noting when each is asked for: the gaps are the per-batch times."""
    for batch in batches:
        stamps.append(time.perf_counter())
        yield batch
    stamps.append(time.perf_counter())


# ---------------------------------------------------------------- child measurements


def measure_inference(batches: int, batch_size: int) -> dict:
    session = make_session(MODEL)
    data = calibration_data(batches, batch_size)
    session.run(None, {"input": data[0]})  # warm-up: first-run allocations and kernel choices
    seconds = []
    for batch in data:
        start = time.perf_counter()
        session.run(None, {"input": batch})
        seconds.append(time.perf_counter() - start)
    return {"batch_seconds": seconds, "seconds": sum(seconds)}


def measure_statistics(batches: int, batch_size: int) -> dict:
    model = load_model(MODEL)
    layers, _ = find_layers(model)
    data = calibration_data(batches, batch_size)
    stamps: list[float] = []
    tracemalloc.start()
    start = time.perf_counter()
    collect_statistics(model, layers, timed(data, stamps), batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - start  # with session creation and the final symmetrisation
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"batch_seconds": list(np.diff(stamps)), "seconds": seconds, "tracemalloc_peak_mb": traced_peak / 2**20}


def run_child(args: list[str]) -> dict:
    """Run one measurement in a fresh interpreter; its JSON result plus its peak RSS."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def child_main(argv: list[str]) -> None:
    what, batches, batch_size = argv
    measure = {"inference": measure_inference, "statistics": measure_statistics}[what]
    result = measure(int(batches), int(batch_size))
    result["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps(result))


# ---------------------------------------------------------------- the floor


def statistic_shapes(batch_size: int) -> dict[str, tuple[int, int]]:
    """(rows per batch, d) of every statistic key of the model."""
    model = load_model(MODEL)
    layers, _ = find_layers(model, {"input": [batch_size, 3, 224, 224]})
    shapes = {}
    for layer in layers:
        positions = layer.positions if layer.conv is not None else 1
        shapes[layer.stats_key] = (batch_size * positions, layer.in_features)
    return shapes


def gram_floor_seconds(shapes: dict[str, tuple[int, int]], batches: int) -> list[float]:
    """Seconds of the float64 symmetric Gram products, per batch."""
    rng = np.random.default_rng(1)
    seconds = [0.0] * batches
    for rows, dim in shapes.values():
        x = rng.standard_normal((rows, dim))
        blas.dsyrk(1.0, x[: min(rows, 256)].T)  # warm-up: BLAS threads, code pages
        for batch in range(batches):
            start = time.perf_counter()
            blas.dsyrk(1.0, x.T)  # x.T is (d, rows) Fortran-ordered: no copy, X^T X upper triangle
            seconds[batch] += time.perf_counter() - start
    return seconds


# ---------------------------------------------------------------- report


def rates(batch_size: int, seconds: list[float]) -> tuple[float, float]:
    """(best, median) samples/s over the batches."""
    return batch_size / min(seconds), batch_size / float(np.median(seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if not MODEL.exists():
        MODEL.parent.mkdir(parents=True, exist_ok=True)
        build_resnet50(MODEL)
    batch = args.batch_size
    sizes = [str(args.batches), str(batch)]
    print(f"ResNet-50-shaped model, {args.batches} batches of {batch}, {os.cpu_count()} CPUs, "
          f"load average at start {os.getloadavg()[0]:.2f}; samples/s as best batch / median batch")

    inference = run_child(["inference", *sizes])
    best, median = rates(batch, inference["batch_seconds"])
    print(f"plain onnxruntime inference: {best:7.2f} / {median:7.2f} samples/s "
          f"(peak RSS {inference['maxrss_mb']:.0f} MB)")

    shapes = statistic_shapes(batch)
    macs = sum(rows * dim * dim / 2 for rows, dim in shapes.values()) / batch
    print(f"Gram floor: {len(shapes)} statistics, {macs / 1e9:.2f} G multiply-adds per sample (dsyrk, half of X^T X)")
    floor_best, floor_median = rates(batch, gram_floor_seconds(shapes, args.batches))
    result = run_child(["statistics", *sizes])
    best, median = rates(batch, result["batch_seconds"])
    print(f"  floor     : {floor_best:7.2f} / {floor_median:7.2f} samples/s "
          f"({macs * floor_best / 1e9:.1f} GMAC/s at best)")
    print(f"  statistics: {best:7.2f} / {median:7.2f} samples/s = {best / floor_best:5.1%} / "
          f"{median / floor_median:5.1%} of the floor; whole call {args.batches * batch / result['seconds']:.2f} "
          f"samples/s; peak RSS {result['maxrss_mb']:.0f} MB, tracemalloc peak "
          f"{result['tracemalloc_peak_mb']:.0f} MB; load average {os.getloadavg()[0]:.2f}")
    print(f"load average at end {os.getloadavg()[0]:.2f} (other work on the machine skews every number)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        main()
