"""Helpers of benchmarks/gpu_check.sh: environment report, GEMM rates, CUDA-EP calibration, the JSON summary.

    python benchmarks/gpu_check.py env --json F
    python benchmarks/gpu_check.py gemm --device cuda cpu --n 8192 2048 --json F
    python benchmarks/gpu_check.py calib --images 64 --image-size 224 --json F [--cpu-only]
    python benchmarks/gpu_check.py has-cuda-ep          # exit 0 if onnxruntime has the CUDA EP, else 77
    python benchmarks/gpu_check.py record --dir D --name N --status S --seconds T --rc RC [--reason R]
                                          [--result F] --summary OUT.json

Exit code 77 means "skipped" (the step's reason is its last output line); gpu_check.sh records it so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = 77

# What the issue accepts on the H200 (seconds), checked in the summary.
ACCEPTANCE = {
    "resnet_cuda_64": ("ResNet-50 compress, 64 images, --target-macs 0.5, --device cuda: end to end", 15.0),
    "tucker2_cuda": ("Tucker-2 512x512x3x3 at (256, 256), --device cuda: converged in", 2.0),
    "cp_cuda": ("CP 256x256x3x3 at R = 256, --device cuda: converged in", 10.0),
}


def _dump(path, data) -> None:
    text = json.dumps(data, indent=1, default=float)
    if path:
        Path(path).write_text(text)
    print(text)


# ---------------------------------------------------------------- env


def _version(module: str):
    try:
        mod = __import__(module)
    except Exception as exc:  # noqa: BLE001 - report whatever stops the import
        return f"missing ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return getattr(mod, "__version__", "present")


def env(args) -> None:
    info = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
            "cpus": os.cpu_count(), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    for module in ("numpy", "scipy", "onnx", "onnxruntime", "onnx_graphsurgeon", "tqdm", "pytest", "cupy"):
        info[module] = _version(module)
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
        info["onnxruntime_device"] = ort.get_device()
    except Exception as exc:  # noqa: BLE001
        info["onnxruntime_providers"] = f"unavailable: {exc}"
    from onnxcomp.decompose.backend import cupy_or_none

    cupy = cupy_or_none()
    info["cupy_device"] = None
    if cupy is not None:
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        info["cupy_device"] = {
            "name": name.decode() if isinstance(name, bytes) else name,
            "compute_capability": f"{props['major']}.{props['minor']}",
            "memory_gib": props["totalGlobalMem"] / 2**30,
            "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
            "CUPY_TF32": os.environ.get("CUPY_TF32", "unset (off)"),
        }
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvidia_smi"] = f"unavailable: {exc}"
    _dump(args.json, info)


# ---------------------------------------------------------------- GEMM rates


def gemm_rates(device: str, n: int, repeats: int) -> dict:
    """Achieved float64 and float32 GEMM rates (n x n times n x n) on one device, median after warm-up."""
    import numpy as np

    from onnxcomp.decompose.backend import get_backend

    xp = get_backend(device)

    def sync():
        if xp is not np:
            xp.cuda.Device().synchronize()

    result = {"n": n, "repeats": repeats,
              "note": "CuPy; float32 without TF32 unless CUPY_TF32=1" if xp is not np else "NumPy/BLAS"}
    rng = np.random.default_rng(0)
    for dtype in ("float64", "float32"):
        a = xp.asarray(rng.standard_normal((n, n)).astype(dtype))
        b = xp.asarray(rng.standard_normal((n, n)).astype(dtype))
        for _ in range(2):
            a @ b
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            sync()
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        result[dtype] = {"seconds": seconds, "gflops": 2.0 * n**3 / seconds / 1e9}
        print(f"{device} {dtype} GEMM {n}^3: median {seconds * 1e3:.2f} ms -> {result[dtype]['gflops']:.0f} GFLOP/s",
              flush=True)
        del a, b
    return result


def gemm(args) -> None:
    """gemm_rates() on each device of --device (sizes from --n in the same order), one JSON keyed by device."""
    sizes = args.n + [args.n[-1]] * (len(args.device) - len(args.n))
    _dump(args.json, {device: gemm_rates(device, n, args.repeats) for device, n in zip(args.device, sizes)})


# ---------------------------------------------------------------- calibration on the CUDA EP


def _has_cuda_ep() -> tuple[bool, str]:
    import onnxruntime as ort

    providers = ort.get_available_providers()
    ok = "CUDAExecutionProvider" in providers
    return ok, f"onnxruntime {ort.__version__} ({ort.__file__}) providers {providers}"


def has_cuda_ep(args) -> None:
    ok, what = _has_cuda_ep()
    print(("CUDA execution provider present: " if ok else "skipped: no CUDA execution provider in this onnxruntime: ")
          + what)
    sys.exit(0 if ok else SKIPPED)


def calib(args) -> None:
    """Layer-input statistics of the ResNet-50-shaped model on CPU and CUDA EPs: time each, compare the sums.

    The reduction (float64 Gram sums) runs on the host either way: onnxcomp has no on-device reduction."""
    ok, what = _has_cuda_ep()
    if not ok and not args.cpu_only:
        print(f"skipped: no CUDA execution provider in this onnxruntime: {what}")
        sys.exit(SKIPPED)
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import onnx
    from compress_resnet50 import model_path, smooth_images

    from onnxcomp.calibration.collect import collect_statistics
    from onnxcomp.model.layers import find_layers

    path = model_path(args.image_size)
    model = onnx.load(path)
    images = smooth_images(args.images, size=args.image_size)
    layers, _ = find_layers(model, {"input": [1, 3, args.image_size, args.image_size]})
    result = {"model": path.name, "images": args.images, "layers": len(layers), "providers": what}
    runs = {"cpu": ["CPUExecutionProvider"]}
    if ok and not args.cpu_only:
        runs["cuda"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    stats = {}
    for label, providers in runs.items():
        t0 = time.perf_counter()
        stats[label] = collect_statistics(model, layers, images, providers=providers, progress=False)
        result[f"{label}_seconds"] = time.perf_counter() - t0
        print(f"calibration on {providers[0]}: {result[f'{label}_seconds']:.1f} s", flush=True)
    if "cuda" in stats:
        worst = 0.0
        for key, cpu in stats["cpu"].items():
            gpu = stats["cuda"][key]
            worst = max(worst, float(np.abs(gpu.gram - cpu.gram).max() / max(np.abs(cpu.gram).max(), 1e-300)))
        result["gram_max_relative_difference"] = worst
        print(f"largest Gram-sum difference CUDA EP vs CPU EP, relative to the largest entry: {worst:.2e}")
    _dump(args.json, result)


# ---------------------------------------------------------------- the summary


def record(args) -> None:
    """Write one step's record into --dir and rebuild the summary JSON from every record there."""
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    entry = {"status": args.status, "seconds": round(args.seconds, 2), "rc": args.rc}
    if args.reason:
        entry["reason"] = args.reason
    if args.command:
        entry["command"] = args.command
    if args.result and Path(args.result).is_file():
        try:
            entry["result"] = json.loads(Path(args.result).read_text())
        except ValueError as exc:
            entry["result"] = f"unreadable: {exc}"
    if args.name == "gpu_tests" and args.junit and Path(args.junit).is_file():
        entry["result"] = _junit_counts(args.junit)
    order = len(list(folder.glob("*.json")))
    existing = next(folder.glob(f"*_{args.name}.json"), None)
    path = existing or folder / f"{order:02d}_{args.name}.json"
    path.write_text(json.dumps(entry, indent=1, default=float))
    steps = {p.stem.split("_", 1)[1]: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    summary = {"written": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": args.mode, "steps": steps,
               "derived": _derived(steps)}
    Path(args.summary).write_text(json.dumps(summary, indent=1, default=float))


def _junit_counts(path) -> dict:
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["cases"] = {}
    for case in suite.iter("testcase"):
        state = "passed"
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                message = (child.get("message") or "").strip()
                state = f"{tag}: {message.splitlines()[0][:200] if message else ''}"
        counts["cases"][f"{case.get('classname')}::{case.get('name')}"] = state
    return counts


def _result(steps, name):
    step = steps.get(name, {})
    return step.get("result") if step.get("status") == "ok" and isinstance(step.get("result"), dict) else None


def _derived(steps) -> dict:
    """Acceptance checks and the fractions of the measured GEMM rates."""
    out = {"acceptance": {}}
    for name, (what, limit) in ACCEPTANCE.items():
        res = _result(steps, name)
        if res is None:
            out["acceptance"][name] = {"what": what, "limit_s": limit, "pass": None,
                                       "why": steps.get(name, {}).get("reason") or steps.get(name, {}).get("status")
                                       or "not run"}
            continue
        if name.startswith("resnet"):
            seconds, converged = res["wall_seconds"], True
        elif name.startswith("tucker2"):
            seconds, converged = res["seconds"], res["converged"]
        else:
            seconds, converged = res["Anderson"]["seconds"], res["Anderson"]["converged"]
        out["acceptance"][name] = {"what": what, "limit_s": limit, "seconds": seconds, "converged": converged,
                                   "pass": bool(converged and seconds < limit)}
    gemm = _result(steps, "gemm") or {}
    for label, device in (("tucker2_cuda", "cuda"), ("tucker2_cpu", "cpu")):
        res, peak = _result(steps, label), gemm.get(device, {}).get("float64", {}).get("gflops")
        if res and peak:
            out[f"{label}_operator_fraction_of_float64_gemm_peak"] = res["operator_gflops"] / peak
    for a, b in (("tucker2_cpu", "tucker2_cuda"), ("cp_cpu", "cp_cuda")):
        ra, rb = _result(steps, a), _result(steps, b)
        if ra and rb:
            key = "sweep_seconds_mean" if a.startswith("tucker2") else None
            sa = ra[key] if key else ra["Anderson"]["sweep_seconds"]
            sb = rb[key] if key else rb["Anderson"]["sweep_seconds"]
            out[f"{b}_speedup_per_sweep_over_cpu"] = sa / sb if sb else None
    ra, rb = _result(steps, "resnet_cpu_64"), _result(steps, "resnet_cuda_64")
    if ra and rb:
        out["resnet_64_solve_speedup_cuda_over_cpu"] = ra["seconds"].get("solve", 0) / max(
            rb["seconds"].get("solve", 0), 1e-9)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("env")
    p.add_argument("--json")
    p.set_defaults(run=env)
    p = sub.add_parser("gemm")
    p.add_argument("--device", choices=["cpu", "cuda"], nargs="+", default=["cuda"])
    p.add_argument("--n", type=int, nargs="+", default=[8192], help="size per device, in --device's order")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json")
    p.set_defaults(run=gemm)
    p = sub.add_parser("has-cuda-ep")
    p.set_defaults(run=has_cuda_ep)
    p = sub.add_parser("calib")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--cpu-only", action="store_true", help="without the CUDA EP, time the CPU EP alone (dry run)")
    p.add_argument("--json")
    p.set_defaults(run=calib)
    p = sub.add_parser("record")
    for name in ("--dir", "--name", "--status", "--summary"):
        p.add_argument(name, required=True)
    p.add_argument("--seconds", type=float, default=0.0)
    p.add_argument("--rc", type=int, default=0)
    p.add_argument("--reason")
    p.add_argument("--command")
    p.add_argument("--result")
    p.add_argument("--junit")
    p.add_argument("--mode", default="")
    p.set_defaults(run=record)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
