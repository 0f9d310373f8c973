"""End-to-end `onnxcomp compress` time on a ResNet-50- or ResNeXt-50-shaped model (random weights).

Runs the real command line in a child process with 64 calibration images and
prints the wall time, the split (calibration / solve / rewrite / check) from
the report, and the child's peak memory. ``--arch resnet50 resnext50`` runs both, one after the
other on the same images, and prints their times side by side with how many of ResNeXt's grouped
3x3 convs (groups = 32) were rewritten. Target (issue 14): < 60 s on 2 cores, and with
``--under-load`` (the same command twice: quiet, then while another process spins on one core)
at most 2x the quiet time.

    python benchmarks/compress_resnet50.py [--images 64] [--method svd] [--rule "--target-macs 0.5"]
        [--device cpu|cuda|auto] [--image-size 224] [--json result.json] [--save DIR] [--under-load]
        [--arch resnet50|resnext50 ...]

``--device`` is `compress --device` (where the solvers run; calibration runs on
onnxruntime's CPU provider either way). ``--image-size`` builds the model for
smaller inputs (a multiple of 16; quick dry runs). ``--save DIR`` keeps the
model, the compressed model, its report, the calibration images and 32 other
images (``held_out.npy``, for `onnxcomp bench`) in DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blas_env import competing_process  # noqa: E402
from resnet50 import build_resnet50  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"


def smooth_images(count: int, seed: int = 0, size: int = 224) -> np.ndarray:
    """Image-like inputs: low-frequency random fields, not white noise (spatially correlated like photos)."""
    if size % 16:
        raise ValueError(f"image size must be a multiple of 16, got {size}")
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((count, 3, size // 16, size // 16)).astype(np.float32)
    noise = 0.1 * rng.standard_normal((count, 3, size, size)).astype(np.float32)
    return np.repeat(np.repeat(coarse, 16, axis=2), 16, axis=3) + noise


ARCHS = {"resnet50": (1, 64), "resnext50": (32, 4)}  # (groups, width per group) of the bottlenecks' 3x3 convs


def model_path(image_size: int, arch: str = "resnet50") -> Path:
    """The cached model for this input size (built on first use)."""
    CACHE.mkdir(exist_ok=True)
    path = CACHE / (f"{arch}.onnx" if image_size == 224 else f"{arch}_{image_size}.onnx")
    if not path.exists():
        build_resnet50(path, image_size=image_size, groups=ARCHS[arch][0], width_per_group=ARCHS[arch][1])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--method", default="svd")
    parser.add_argument("--rule", default="--target-macs 0.5", help="the rank rule, as on the command line")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="compress --device: where the solvers run (default cpu)")
    parser.add_argument("--image-size", type=int, default=224, help="input height and width, a multiple of 16")
    parser.add_argument("--json", help="write the numbers printed as JSON here")
    parser.add_argument("--save", help="keep the models, report and images in this folder")
    parser.add_argument("--under-load", action="store_true",
                        help="run twice: quiet, then with a competing process on one core; print the ratio")
    parser.add_argument("--arch", nargs="+", default=["resnet50"], choices=sorted(ARCHS),
                        help="the model(s): resnet50 (default), resnext50 (32x4d, grouped 3x3 convs), or both")
    args = parser.parse_args()
    summaries = [run(args, arch) for arch in args.arch]
    if len(summaries) > 1:
        print("\nside by side (the same images, one after the other):")
        for line in summaries:
            print("  " + line)


def run(args, arch: str) -> str:
    """One model's compress run, printed; returns its one-line summary."""
    model = model_path(args.image_size, arch)
    with tempfile.TemporaryDirectory() as tmp:
        data, out, report = Path(tmp) / "calib.npy", Path(tmp) / "small.onnx", Path(tmp) / "report.json"
        np.save(data, smooth_images(args.images, size=args.image_size))
        command = [sys.executable, "-m", "onnxcomp.cli", "compress", str(model), str(out), "--data", str(data),
                   "--method", args.method, *shlex.split(args.rule), "--device", args.device,
                   "--report", str(report), "--quiet"]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        if args.under_load:
            quiet_split = json.loads(report.read_text())["seconds"]
            with competing_process(True):
                start = time.perf_counter()
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                loaded = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        result = json.loads(report.read_text())
        if args.save:
            keep = Path(args.save)
            keep.mkdir(parents=True, exist_ok=True)
            for path in (model, data, out, report):
                shutil.copy(path, keep / path.name)
            np.save(keep / "held_out.npy", smooth_images(32, seed=1, size=args.image_size))
    print(f"machine: {platform.platform()}, {os.cpu_count()} cpus; python {platform.python_version()}")
    print(f"command: onnxcomp compress {model.name} small.onnx --data <{args.images} images> "
          f"--method {args.method} {args.rule} --device {args.device}")
    print(f"wall time: {wall:.1f} s (target < 60 s on 2 cores); peak memory of the process: {peak_mb:.0f} MB")
    if args.under_load:
        print("split, quiet: " + ", ".join(f"{k} {v:.1f} s" for k, v in quiet_split.items()))
        print(f"with one competing process on one core: {loaded:.1f} s, {loaded / wall:.2f}x the quiet run "
              "(target at most 2x)")
        print("split, loaded: " + ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds"].items()))
    else:
        print("split: " + ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds"].items()))
    t = result["totals"]
    grouped = [row for row in result["layers"] if row["name"].endswith(".conv2")] if ARCHS[arch][0] > 1 else []
    rewritten = sum(row["status"] == "compressed" for row in grouped)
    print(f"MACs per sample: {t['macs_before'] / 1e9:.2f} G -> {t['macs_after'] / 1e9:.2f} G; "
          f"params {t['params_before'] / 1e6:.1f} M -> {t['params_after'] / 1e6:.1f} M; "
          f"layers compressed {t['layers_compressed']} of {t['layers_found']}"
          + (f"; grouped 3x3 convs rewritten {rewritten} of {len(grouped)}" if grouped else ""))
    if args.json:
        numbers = {
            "model": model.name, "arch": arch, "images": args.images, "image_size": args.image_size, "method": args.method,
            "rule": args.rule, "device": args.device, "report_device": result["settings"].get("device"),
            "wall_seconds": wall, "loaded_wall_seconds": loaded if args.under_load else None,
            "peak_mb": peak_mb, "seconds": result["seconds"], "totals": t,
            "fidelity_standardized": result.get("fidelity", {}).get("standardized"),
            "machine": platform.platform(), "cpus": os.cpu_count(),
        }
        json_path = Path(args.json) if len(args.arch) == 1 else Path(args.json).with_suffix(f".{arch}.json")
        json_path.write_text(json.dumps(numbers, indent=1, default=float))
    split = ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds"].items())
    return (f"{arch}: {wall:.1f} s ({split}); MACs {t['macs_after'] / t['macs_before']:.1%} kept, "
            f"{t['layers_compressed']} of {t['layers_found']} layers compressed"
            + (f", grouped {rewritten} of {len(grouped)}" if grouped else ""))


if __name__ == "__main__":
    main()
