"""End-to-end `--method auto --target-macs F` on the YOLOv8n-shaped detector, and SVD alone, one run.

    python benchmarks/yolo_budget.py [--images 128] [--image-size 320] [--fraction 0.75] [--threads 1]
        [--methods auto svd] [--json F]

For each method, ``onnxcomp.compress(model, images, method=M, target_macs=F, batch_size=32)`` in this
process, as the command line runs it (every 10th image held out to judge, the latency check after
writing), on ``--images`` smooth random images (benchmarks/yolo_shaped.py; 63 convs, 39 of them
3x3). Prints the wall time, the report's split (calibration / solve / rewrite / check / latency) and
the solve's own split: candidate curves (with the refinements where the spare cost reaches), the
sensitivity probe, the final solves of each allocation, judging candidate models, and the rest.
``--threads N`` sets the BLAS threads before NumPy loads and onnxruntime's (``threads=N``).
Target (issue 14): auto at 0.75 with 128 images in under 5 minutes.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

from blas_env import preset_threads  # noqa: E402  (before NumPy: see blas_env.py)

preset_threads(sys.argv[1:])

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from yolo_shaped import build_yolo_shaped, smooth_images  # noqa: E402

import onnxcomp  # noqa: E402
from onnxcomp.budget import plan  # noqa: E402

from realistic_stats import finish_benchmark, load_average  # noqa: E402


class SolveSplit:
    """Wall time inside the budget's solve, by part (wrappers on the planner's functions)."""

    PARTS = {"curves": ("Curves", "__init__"), "refinements": ("Curves", "_refine"),
             "sensitivity probe": (None, "layer_sensitivities"), "final solves": (None, "solve_layers"),
             "judging": (None, "_loss")}

    def __init__(self):
        self.seconds = defaultdict(float)
        self._saved = []

    def __enter__(self):
        for part, (owner, name) in self.PARTS.items():
            target = getattr(plan, owner) if owner else plan
            original = getattr(target, name)
            self._saved.append((target, name, original))
            setattr(target, name, self._timed(part, original))
        return self

    def __exit__(self, *exc):
        for target, name, original in self._saved:
            setattr(target, name, original)

    def _timed(self, part, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start
        return wrapper


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=320)
    ap.add_argument("--fraction", type=float, default=0.75)
    ap.add_argument("--methods", nargs="+", default=["auto", "svd"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    model = build_yolo_shaped(args.image_size)
    images = smooth_images(args.images, args.image_size, seed=1)
    print(f"machine: {platform.platform()}, {os.cpu_count()} cpus; BLAS threads "
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'default')}; load {load_average()}")
    numbers = {"images": args.images, "image_size": args.image_size, "fraction": args.fraction,
               "threads": args.threads, "runs": {}}
    for method in args.methods:
        with SolveSplit() as split:
            start = time.perf_counter()
            _, report = onnxcomp.compress(model, images, method=method, target_macs=args.fraction, batch_size=32,
                                          threads=args.threads, progress=False)
            wall = time.perf_counter() - start
        solve = report.seconds.get("solve", 0.0)
        inner = dict(split.seconds)
        inner["rest"] = solve - sum(inner.values())
        methods = defaultdict(int)
        for row in report.layers:
            methods[row.method or "dense"] += 1
        target = report.settings["target"]
        print(f"\n--method {method} --target-macs {args.fraction}, {args.images} images of {args.image_size}x"
              f"{args.image_size}, batch 32: {wall:.1f} s end to end")
        print("  split: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items()))
        print("  solve: " + ", ".join(f"{k} {v:.1f} s" for k, v in inner.items()))
        print(f"  MACs kept {target['achieved']:.4f}; layers {dict(methods)}; standardised error "
              f"{report.fidelity.standardized:.4f} ({report.fidelity.source})")
        numbers["runs"][method] = {"wall": wall, "seconds": report.seconds, "solve_split": inner,
                                   "achieved": target["achieved"], "methods": dict(methods),
                                   "standardized": report.fidelity.standardized}
    finish_benchmark(numbers, args.json)


if __name__ == "__main__":
    main()
