"""Solve time on a quiet machine and with one competing CPU-bound process, two thread settings.

Issue 14: with OpenBLAS's default threads (one per core, spinning while they wait for each
other), one other busy process made LAPACK-heavy solves 50-90x slower on the 2-core machine.
onnxcomp now solves the layers on ``--threads`` workers with one BLAS thread each. This script
times the same solve (statistics collected once, ResNet-50-shaped model) in four runs:

    before: layers one after another, BLAS at its default threads
    now:    layers on 2 workers, one BLAS thread each (what ``compress`` does by default)

each on a quiet machine and while a child process spins on one core, and prints the times and
the loaded / quiet ratio of each setting (target: at most 2x). Every run is checked to give the
same errors (to rounding). The machine is shared, so read the ratios of one run, not the seconds.

    python benchmarks/threads_under_load.py [--method svd] [--image-size 112] [--images 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blas_env import competing_process  # noqa: E402
from compress_resnet50 import model_path, smooth_images  # noqa: E402
from threadpoolctl import threadpool_info  # noqa: E402

from onnxcomp.calibration.collect import collect_statistics  # noqa: E402
from onnxcomp.config import Method, RankChoice, SolveConfig  # noqa: E402
from onnxcomp.decompose.solve import layer_problem, solve_layers  # noqa: E402
from onnxcomp.model import find_layers, load_model  # noqa: E402
from onnxcomp.threads import blas_threads  # noqa: E402


def timed_solve(layers, stats, plan, workers: int, default_blas: bool) -> tuple[float, dict]:
    # Fresh problems every run: a problem caches its eigendecomposition.
    problems = {layer.name: layer_problem(layer, stats[layer.stats_key]) for layer in layers}
    limit = nullcontext() if default_blas else blas_threads(1)
    start = time.perf_counter()
    with limit:
        solved = solve_layers(problems, plan, workers=workers)
    return time.perf_counter() - start, {n: getattr(d, "error", d) for n, d in solved.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="svd", choices=["svd", "tucker2"])
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--layers", type=int, default=0, help="solve only the first N layers (0: all)")
    args = parser.parse_args()

    model = load_model(model_path(args.image_size))
    layers, _ = find_layers(model)
    layers = layers[: args.layers or None]
    images = {"input": smooth_images(args.images, size=args.image_size)}
    stats = collect_statistics(model, layers, images, progress=False)
    plan = {layer.name: (SolveConfig(Method(args.method), ranks=RankChoice(keep=0.5)), None) for layer in layers}
    blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    print(f"{len(layers)} layers of the ResNet-50-shaped model at {args.image_size}px, {args.method} --keep 0.5; "
          f"{os.cpu_count()} cpus, BLAS default threads {blas}, load before {os.getloadavg()[0]:.1f}")
    settings = {"before (sequential, BLAS default threads)": (1, True),
                "now (2 workers, 1 BLAS thread each)": (2, False)}
    times, reference, differences = {}, None, []
    for loaded in (False, True):
        for label, (workers, default_blas) in settings.items():
            with competing_process(loaded):
                seconds, errors = timed_solve(layers, stats, plan, workers, default_blas)
            reference = reference or errors
            # Multithreaded BLAS sums in another order: equal to rounding, not bit for bit.
            worst = max(reference, key=lambda n: abs(errors[n] - reference[n]) / max(abs(reference[n]), 1e-12))
            differences.append((abs(errors[worst] - reference[worst]) / max(abs(reference[worst]), 1e-12), worst,
                                reference[worst], errors[worst]))
            times[label, loaded] = seconds
    print("| setting | quiet s | one core busy s | busy / quiet |")
    print("| --- | --- | --- | --- |")
    for label in settings:
        quiet, busy = times[label, False], times[label, True]
        print(f"| {label} | {quiet:.1f} | {busy:.1f} | {busy / quiet:.2f} |")
    difference, name, first, other = max(differences)
    print(f"largest relative difference of a layer's error between settings: {difference:.1e} ({name}: "
          f"{first:.6g} vs {other:.6g})")


if __name__ == "__main__":
    main()
