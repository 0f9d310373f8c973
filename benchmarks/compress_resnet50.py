"""End-to-end `onnxcomp compress` time on a ResNet-50-shaped model (random weights).

Runs the real command line in a child process with 64 calibration images and
prints the wall time, the split (calibration / solve / rewrite / check) from
the report, and the child's peak memory. Target: < 2 minutes on 2 cores.

    python benchmarks/compress_resnet50.py [--images 64] [--method svd] [--rule "--target-macs 0.5"]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resnet50 import build_resnet50  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"


def smooth_images(count: int, seed: int = 0) -> np.ndarray:
    """Image-like inputs: low-frequency random fields, not white noise (spatially correlated like photos)."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((count, 3, 14, 14)).astype(np.float32)
    noise = 0.1 * rng.standard_normal((count, 3, 224, 224)).astype(np.float32)
    return np.repeat(np.repeat(coarse, 16, axis=2), 16, axis=3) + noise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--method", default="svd")
    parser.add_argument("--rule", default="--target-macs 0.5", help="the rank rule, as on the command line")
    args = parser.parse_args()

    CACHE.mkdir(exist_ok=True)
    model = CACHE / "resnet50.onnx"
    if not model.exists():
        build_resnet50(model)
    with tempfile.TemporaryDirectory() as tmp:
        data, out, report = Path(tmp) / "calib.npy", Path(tmp) / "small.onnx", Path(tmp) / "report.json"
        np.save(data, smooth_images(args.images))
        command = [sys.executable, "-m", "onnxcomp.cli", "compress", str(model), str(out), "--data", str(data),
                   "--method", args.method, *shlex.split(args.rule), "--report", str(report), "--quiet"]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        result = json.loads(report.read_text())
    print(f"machine: {platform.platform()}, {os.cpu_count()} cpus; python {platform.python_version()}")
    print(f"command: onnxcomp compress resnet50.onnx small.onnx --data <{args.images} images> "
          f"--method {args.method} {args.rule}")
    print(f"wall time: {wall:.1f} s (target < 120 s on 2 cores); peak memory of the process: {peak_mb:.0f} MB")
    print("split: " + ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds"].items()))
    t = result["totals"]
    print(f"MACs per sample: {t['macs_before'] / 1e9:.2f} G -> {t['macs_after'] / 1e9:.2f} G; "
          f"params {t['params_before'] / 1e6:.1f} M -> {t['params_after'] / 1e6:.1f} M; "
          f"layers compressed {t['layers_compressed']} of {t['layers_found']}")


if __name__ == "__main__":
    main()
