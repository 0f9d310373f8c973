"""What latency a MAC budget reaches, against its Amdahl floor (issue 17).

For each model: statistics once, then ``onnxcomp.compress(..., target_macs=F)`` with each rank
multiple asked for (``--multiples 1 8``: ranks free, or rounded to multiples of 8), the task metric
on held-out data, and ``onnxcomp.bench`` at batch 1 (one thread by default) against the original:
the measured latency ratio next to the Amdahl floor (the original's time outside the compressible
layers + each layer's time x the MACs its chain keeps, see ``onnxcomp/reach.py``), as the report
computes it after writing and as ``bench`` computes it on its own.

Models and data (calibration and held-out sets are disjoint; the first 8 calibration samples
judge candidates, the rest make the statistics):

- ``rec``, ``det``: RapidOCR 1.4.4's PP-OCRv4 models and rendered inputs of ``benchmarks/ppocr.py``
  (64 + 100 text lines; 16 + 24 pages), task metric as there (needs Pillow).
- ``digits``: the embedded digits CNN, ``calib.npz`` (256) and ``heldout.npz`` (500, accuracy).
- ``resnet``: the ResNet-50-shaped model of ``benchmarks/resnet50.py`` (random weights), 40 smooth
  random images + 16 held out; no task: the "metric" is top-1 agreement with the original.

    PYTHONPATH=. python benchmarks/reachable.py [--models rec det digits resnet] [--multiples 1 8]
        [--fraction 0.5] [--threads 1] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxcomp
from onnxcomp.bench import bench
from onnxcomp.model import count_macs, count_subnormals
from onnxcomp.runtime import make_session

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
JUDGE = 8  # calibration samples that judge candidates (held out of the statistics)


@dataclass
class Case:
    name: str
    model: onnx.ModelProto
    calib: np.ndarray
    held: np.ndarray
    shape: list  # per-sample input shape, batch 1
    batch: int  # calibration batch
    score: object  # outputs of the held-out data -> dict with "value" and "text"
    metric: str


def ppocr_case(name: str, threads: int) -> Case:
    import ppocr

    models = ppocr.fetch_models()
    (task,) = ppocr.make_tasks(models, [name], 64, 100, 16, 24, seed=0)
    model = onnx.load(str(task.path))
    if count_macs(model, {"x": task.shape}) is None:  # run-time Reshape targets (see ppocr.py's workaround)
        model, _ = ppocr.fold_dynamic_reshapes(model, task.shape)

    def score(outputs):
        result = task.score(outputs)
        return {"value": result["value"], "text": ppocr.fmt_metric(task, result)}

    return Case(name, model, task.calib, task.held, task.shape, task.calib_batch, score, task.metric_name)


def digits_case(threads: int) -> Case:
    example = HERE.parent / "examples" / "digits"
    held = np.load(example / "heldout.npz")
    labels = held["labels"]

    def score(outputs):
        value = float((outputs.argmax(1) == labels).mean())
        return {"value": value, "text": f"{value:.3f}"}

    return Case("digits", onnxcomp.load_model(example / "digits_cnn.onnx"), np.load(example / "calib.npz")["input"],
                held["input"], [1, 1, 32, 32], 32, score, "held-out accuracy")


def resnet_case(threads: int) -> Case:
    from compress_resnet50 import smooth_images
    from resnet50 import build_resnet50

    path = HERE / ".cache" / "resnet50.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_resnet50(path)
    model = onnxcomp.load_model(path)
    images = smooth_images(56, seed=0)
    calib, held = images[:40], images[40:]
    reference = run(model, held, threads).argmax(1)

    def score(outputs):
        value = float((outputs.argmax(1) == reference).mean())
        return {"value": value, "text": f"{value:.3f} agreement"}

    return Case("resnet", model, calib, held, [1, 3, 224, 224], 8, score, "top-1 agreement with the original")


def run(model, data: np.ndarray, threads: int, batch: int = 8) -> np.ndarray:
    session = make_session(model, threads=threads)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: data[i:i + batch]})[0] for i in range(0, len(data), batch)])


def make_case(name: str, threads: int) -> Case:
    if name in ("rec", "det"):
        return ppocr_case(name, threads)
    return digits_case(threads) if name == "digits" else resnet_case(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["rec", "det", "digits", "resnet"],
                        choices=["rec", "det", "digits", "resnet"])
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 8], help="rank multiples to compare")
    parser.add_argument("--fraction", type=float, default=0.5, help="--target-macs F")
    parser.add_argument("--method", default="svd")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, help="bench's timed pairs (default: as many as fit in ~3 s)")
    parser.add_argument("--reports", help="write each compress report and bench result (JSON) into this folder")
    args = parser.parse_args()
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; "
          f"onnxcomp {onnxcomp.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}, "
          f"numpy {np.__version__}; load average {os.getloadavg()[0]:.1f}")
    print(f"command: PYTHONPATH=. python benchmarks/reachable.py {' '.join(sys.argv[1:])}".rstrip(), flush=True)
    rows, notes = [], []
    for name in args.models:
        started = time.perf_counter()
        case = make_case(name, args.threads)
        feed = {case.model.graph.input[0].name: case.calib}
        input_name = case.model.graph.input[0].name
        base = case.score(run(case.model, case.held, args.threads))
        found = count_subnormals(case.model)
        stats = onnxcomp.calibrate(case.model, {input_name: case.calib[JUDGE:]}, batch_size=case.batch,
                                   progress=False)
        print(f"{name}: {case.metric} {base['text']}; {found.values} subnormal weights in {found.tensors} tensors; "
              f"statistics {time.perf_counter() - started:.0f}s", flush=True)
        for multiple in args.multiples:
            t0 = time.perf_counter()
            compressed, report = onnxcomp.compress(
                case.model, {input_name: feed[input_name][:JUDGE]}, stats=stats, input_shapes={input_name: case.shape},
                method=args.method, target_macs=args.fraction, rank_multiple=multiple, threads=args.threads,
                batch_size=case.batch, progress=False)
            t1 = time.perf_counter()
            score = case.score(run(compressed, case.held, args.threads))
            result = bench(case.model, compressed, {input_name: case.held}, batch_sizes=(1,), threads=args.threads,
                           repeats=args.repeats, eval_batch_size=8)
            if args.reports:
                Path(args.reports).mkdir(parents=True, exist_ok=True)
                report.save(Path(args.reports) / f"{name}_m{multiple}_report.json")
                result.save(Path(args.reports) / f"{name}_m{multiple}_bench.json")
            latency, check = result.latency[0], report.latency
            kept = report.totals["macs_after"] / report.totals["macs_before"]
            report_floor = check.shares[0].floor(check.kept)
            flagged = ", ".join(c.name for c in check.flagged) or "none"
            rows.append((name, str(multiple), f"{kept:.1%}", f"{base['text']} -> {score['text']}",
                         f"{check.shares[0].share:.1%}", f"{report_floor:.3f}", f"{check.ratio:.3f}",
                         f"{latency.floor:.3f}", f"{latency.ratio:.3f} [{latency.pair_ratio_p10:.2f}, "
                         f"{latency.pair_ratio_p90:.2f}]", f"{latency.ratio / latency.floor:.3f}", flagged))
            subnormals = result.subnormals["original"]
            if subnormals["flushed_ratio"] is not None and multiple == args.multiples[0]:
                notes.append(f"{name}: the original's {subnormals['values']} subnormal weights set to 0: "
                             f"{subnormals['flushed_ratio']:.3f}x its time at batch 1 (bench, interleaved)")
            print("  " + " | ".join(rows[-1][1:]) + f"  (compress {t1 - t0:.0f}s, bench "
                  f"{time.perf_counter() - t1:.0f}s; load {os.getloadavg()[0]:.1f})", flush=True)
    print()
    print("| model | rank multiple | MACs kept | task metric (original -> compressed) | rewritable share (b1) | "
          "floor (report) | ratio (report, whole runs) | floor (bench) | `bench` ratio [p10, p90] | ratio / floor "
          "| flagged chains |")
    print("| --- " * 11 + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
