"""Calibration with its Gram products on 1 worker and on N (``--threads``), against the plain forward pass.

The YOLOv8n-shaped model (random weights, ``yolo_shaped.py``) at 320x320, ``--images`` smooth
images: ``onnxcomp.calibrate(..., threads=T)`` for T = 1 and ``--threads``, timed in alternation
(``--rounds`` each, best and median), and onnxruntime's plain forward pass over the same images with
the same intra-op threads, the part of calibration no worker count changes. The sums of both runs
are checked equal to the bit. Ratios are of numbers measured in this one run.

    python benchmarks/calibrate_workers.py [--images 128] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnxcomp  # noqa: E402
from onnxcomp.runtime import make_session  # noqa: E402
from yolo_shaped import build_yolo_shaped, smooth_images  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    model = build_yolo_shaped(320)
    images = smooth_images(args.images, 320, seed=1)
    times: dict[int, list[float]] = {1: [], args.threads: []}
    sums = {}
    forward = []
    session = make_session(model, threads=args.threads)
    name = session.get_inputs()[0].name
    for _ in range(args.rounds):
        for threads in times:
            t0 = time.perf_counter()
            sums[threads] = onnxcomp.calibrate(model, images, batch_size=args.batch_size, threads=threads,
                                               progress=False)
            times[threads].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for start in range(0, len(images), args.batch_size):
            session.run(None, {name: images[start:start + args.batch_size]})
        forward.append(time.perf_counter() - t0)
    same = all(np.array_equal(sums[1][k].gram, sums[args.threads][k].gram) for k in sums[1])
    print(f"YOLOv8n-shaped 320x320, {args.images} images, batch {args.batch_size}, {args.rounds} rounds")
    for threads, values in times.items():
        print(f"  calibrate, {threads} worker(s): best {min(values):.2f} s, median {statistics.median(values):.2f} s")
    print(f"  plain forward pass ({args.threads} intra-op threads): best {min(forward):.2f} s")
    print(f"  speed-up of {args.threads} workers (best / best): {min(times[1]) / min(times[args.threads]):.2f}x; "
          f"sums equal to the bit: {same}")


if __name__ == "__main__":
    main()
