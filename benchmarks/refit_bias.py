"""Bias re-estimation (`--refit-bias`) against the one-shot fit, on real models, held out.

For each model and MAC budget: `compress --target-macs F` with and without `--refit-bias`, the same
calibration data (the validation samples held out of it by compress itself), scored on held-out
inputs by the task's own metric and by the output's relative L2 error against the original. The
refit column shows what re-estimation gave before the judge's decision (`raw`) and what compress
returned (the judge keeps the one-shot model where its validation loss is lower).

    python benchmarks/refit_bias.py [--models digits cls rec det] [--budgets 0.75 0.5 0.3]

Models: the embedded digits CNN (its 500 held-out images, accuracy), and RapidOCR's PP-OCR models
with the rendered lines / pages of ``benchmarks/ppocr.py`` (needs Pillow).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

import onnxcomp
import onnxcomp.pipeline as pipeline
from onnxcomp.runtime import make_session

HERE = Path(__file__).resolve().parent
DIGITS = HERE.parent / "examples" / "digits"


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def digits_task():
    held = np.load(DIGITS / "heldout.npz")
    return ("digits", onnx.load(DIGITS / "digits_cnn.onnx"), np.load(DIGITS / "calib.npz")["input"], held["input"],
            lambda out: f"acc {(out.argmax(1) == held['labels']).mean():.3f}", "input", 32)


def ppocr_tasks(names):
    sys.path.insert(0, str(HERE))
    import ppocr  # the rendered data and the task metrics of the PP-OCR benchmark

    models = ppocr.fetch_models()
    for task in ppocr.make_tasks(models, names, 64, 100, 16, 24, seed=0):
        model = onnx.load(str(task.path))
        if ppocr.count_macs(model, {"x": task.shape}) is None:
            model, _ = ppocr.fold_dynamic_reshapes(model, task.shape)

        def score(out, task=task):
            return ppocr.fmt_metric(task, task.score(out))

        yield task.name, model, task.calib, task.held, score, "x", task.calib_batch


class _RawRefit:
    """Records the re-estimated model before the judge's decision (what refit_biases built)."""

    def __init__(self):
        self.raw = None
        self.original = pipeline.refit_biases

    def __call__(self, *args, **kwargs):
        refit = self.original(*args, **kwargs)
        self.raw = refit
        return refit


def run(model, data, batch):
    session = make_session(model)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: data[i:i + batch]})[0] for i in range(0, len(data), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits", "cls", "rec"], choices=["digits", "cls", "rec", "det"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.5, 0.3])
    args = parser.parse_args()
    started = time.perf_counter()
    tasks = [digits_task()] if "digits" in args.models else []
    others = [m for m in args.models if m != "digits"]
    if others:
        tasks += list(ppocr_tasks(others))
    rows = []
    for name, model, calib, held, score, input_name, batch in tasks:
        reference = run(model, held, 8)
        print(f"{name}: original {score(reference)}", flush=True)
        for budget in args.budgets:
            results = {}
            for refit in (False, True):
                recorder = _RawRefit()
                pipeline.refit_biases = recorder
                t0 = time.perf_counter()
                try:
                    compressed, report = onnxcomp.compress(model, {input_name: calib}, target_macs=budget,
                                                           refit_bias=refit, batch_size=batch, progress=False,
                                                           check_latency=False)
                finally:
                    pipeline.refit_biases = recorder.original
                out = run(compressed, held, 8)
                results[refit] = (score(out), relative_l2(out, reference), time.perf_counter() - t0)
                if refit and recorder.raw is not None:
                    raw = run(recorder.raw.model if recorder.raw.kept else recorder.raw.rejected, held, 8)
                    results["raw"] = (score(raw), relative_l2(raw, reference))
                    results["note"] = recorder.raw.note().split(": ", 1)[1]
            one, ref = results[False], results[True]
            raw = results.get("raw", ("-", float("nan")))
            rows.append((name, f"{budget:.2f}", f"{one[0]}, rel L2 {one[1]:.4f}", f"{raw[0]}, rel L2 {raw[1]:.4f}",
                         f"{ref[0]}, rel L2 {ref[1]:.4f}", results.get("note", "-"), f"{one[2]:.0f} / {ref[2]:.0f}"))
            print("  " + " | ".join(rows[-1]), flush=True)
    print("\n| model | MACs kept | one-shot (held out) | refit, raw | refit, as returned | judge (validation) | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\ntotal time: {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
