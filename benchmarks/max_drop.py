"""--max-drop against a sweep of MAC budgets: the digits CNN and PP-OCRv4 rec.

    python benchmarks/max_drop.py [--model digits|rec] [--drops 0.01 0.02 0.05]
        [--metric fidelity|top1|char] [--step 0.02]

The calibration data are split once as `compress` splits them by default (every 10th sample,
8 to 64 of them: the validation samples that judge), the statistics are collected on the rest,
and every run below gets exactly those statistics and that judge, so the search and the sweep see
the same losses. For each drop D the script prints the fraction `--max-drop D` found, the smallest
fraction of the sweep (step `--step`) whose validation loss is within D, and the task metric of
both models on test data that neither calibration nor validation saw. The search is right when
its fraction is within one step of the sweep's.

- digits: the embedded example; 256 calibration images, test accuracy on its 500 held-out images.
  Metrics: ``fidelity`` (loss = standardised error on the validation images), ``top1``.
- rec: PP-OCRv4 rec from the rapidocr-onnxruntime 1.4.4 wheel (needs Pillow; see
  benchmarks/ppocr.py); 64 rendered calibration lines, test on 100 other rendered lines
  (character / exact-line accuracy). Metrics: ``fidelity``; ``top1``: the share of the 8 validation
  lines' 80 time steps whose top character agrees with the original's; or ``char``: a task metric passed as
  ``compress(metric=fn)``, the character accuracy on 48 more rendered lines with known text
  (loss = the drop in character accuracy), as a user with labelled data would judge.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnxcomp  # noqa: E402
from onnxcomp.calibration.holdout import held_out_mask  # noqa: E402
from onnxcomp.runtime import make_session  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits"


@dataclass
class Case:
    """One model with its statistics, its judge and its test data."""

    description: str
    model: object  # onnx.ModelProto
    common: dict  # compress() keywords every run shares: stats, validation_data, metric, ...
    test: Callable  # compressed model -> (headline number, shown text)
    default_step: float


def digits_case(metric: str) -> Case:
    model = onnxcomp.load_model(EXAMPLE / "digits_cnn.onnx")
    calibration = np.load(EXAMPLE / "calib.npz")["input"]
    held_out = np.load(EXAMPLE / "heldout.npz")
    if metric not in ("fidelity", "top1"):
        sys.exit(f"--model digits takes --metric fidelity or top1, not {metric}")
    validation = held_out_mask(len(calibration))
    stats = onnxcomp.calibrate(model, calibration[~validation], progress=False)

    def test(compressed):
        logits = make_session(compressed).run(None, {"input": held_out["input"]})[0]
        accuracy = float(np.mean(logits.argmax(1) == held_out["labels"]))
        return accuracy, f"{accuracy:.3f}"

    description = (f"digits CNN, metric {metric}; statistics of {int((~validation).sum())} calibration images, "
                   f"judged on {int(validation.sum())} held out of them; test accuracy on the 500 held-out images")
    return Case(description, model, dict(stats=stats, validation_data=calibration[validation], metric=metric),
                test, default_step=0.02)


def rec_case(metric: str) -> Case:
    import onnx
    import ppocr  # benchmarks/ppocr.py: the models, the rendered lines and the task metric

    if metric not in ("fidelity", "top1", "char"):
        sys.exit(f"--model rec takes --metric fidelity, top1 or char, not {metric}")
    models = ppocr.fetch_models()
    task = ppocr.make_tasks(models, ["rec"], 64, 100, 0, 0, seed=0)[0]
    model = onnx.load(str(task.path))
    model, _ = ppocr.fold_dynamic_reshapes(model, task.shape)  # as ppocr.py: MACs countable, outputs equal
    validation = held_out_mask(len(task.calib))
    stats = onnxcomp.calibrate(model, {"x": task.calib[~validation]}, batch_size=task.calib_batch, progress=False)

    def test(compressed):
        score = task.score(ppocr.run(compressed, task.held, threads=1))
        return score["value"], ppocr.fmt_metric(task, score)

    common = dict(stats=stats, validation_data={"x": task.calib[validation]}, input_shapes={"x": task.shape},
                  check_latency=False, metric=metric)
    judged_by = {"fidelity": "standardised error", "top1": "per time step top-1 agreement"}.get(metric, "")
    judged_by += f" on the {int(validation.sum())} lines held out of them"
    if metric == "char":
        renderer = ppocr.Renderer(seed=7000, fonts=ppocr.find_fonts(), characters=set(models.characters))
        pairs = [renderer.line(ppocr.REC_W / ppocr.REC_H) for _ in range(48)]
        lines = np.stack([ppocr.resize_pad(image, ppocr.REC_H, ppocr.REC_W) for image, _ in pairs])
        truth = {"texts": [text for _, text in pairs], "characters": task.truth["characters"]}

        def char_accuracy(session) -> float:  # the user's metric: higher is better
            probs = np.concatenate([session.run(None, {"x": lines[i:i + 16]})[0] for i in range(0, len(lines), 16)])
            return ppocr.score_rec(probs, truth)["value"]

        common["metric"] = char_accuracy
        judged_by = (f"character accuracy on 48 more rendered lines (compress(metric=fn); original "
                     f"{char_accuracy(make_session(model)):.3f})")
    description = (f"PP-OCRv4 rec, metric {metric}; statistics of {int((~validation).sum())} rendered lines, judged "
                   f"by {judged_by}; test character / exact-line accuracy on 100 other rendered lines")
    return Case(description, model, common, test, default_step=0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits", choices=["digits", "rec"])
    parser.add_argument("--drops", type=float, nargs="+", default=[0.01, 0.02, 0.05])
    parser.add_argument("--metric", default="fidelity", choices=["fidelity", "top1", "char"],
                        help="digits: fidelity, top1; rec: fidelity, top1, char")
    parser.add_argument("--step", type=float, help="the sweep's fraction step (default 0.02 digits, 0.05 rec)")
    args = parser.parse_args()
    case = (digits_case if args.model == "digits" else rec_case)(args.metric)
    step = args.step or case.default_step
    common = dict(case.common, progress=False)
    print(f"{case.description} (original {case.test(case.model)[1]})", flush=True)

    start = time.perf_counter()
    sweep = []
    for fraction in np.arange(step, 1.0 + 1e-9, step):
        compressed, report = onnxcomp.compress(case.model, target_macs=round(float(fraction), 4), **common)
        sweep.append((round(float(fraction), 4), _loss(report), report))
        print(f"  sweep {fraction:.2f}: loss {sweep[-1][1]:.4f}", flush=True)
    print(f"sweep of {len(sweep)} budgets: {time.perf_counter() - start:.1f} s")
    print()
    print("| drop D | --max-drop: MACs kept | loss | test | sweep: smallest within D | loss | test | within one step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for drop in args.drops:
        started = time.perf_counter()
        compressed, report = onnxcomp.compress(case.model, max_drop=drop, **common)
        seconds = time.perf_counter() - started
        search = report.settings["target"]["search"]
        found = search["fraction"]
        within = [(f, loss, r) for f, loss, r in sweep if loss <= drop]
        best_fraction, best_loss, best_report = within[0] if within else (1.0, 0.0, None)
        best_model, _ = onnxcomp.compress(case.model, target_macs=best_fraction, **common)
        print(f"| {drop:g} | {_kept(report):.1%} (fraction {found:.3f}; {len(search['trials'])} decisions, "
              f"{seconds:.0f} s) | {_loss(report):.4f} | {case.test(compressed)[1]} | "
              f"{_kept(best_report) if best_report else 1:.1%} (fraction {best_fraction:.2f}) | {best_loss:.4f} | "
              f"{case.test(best_model)[1]} | {'yes' if found <= best_fraction + step + 1e-9 else 'NO'} |", flush=True)


def _loss(report) -> float:
    scores = report.settings.get("scores")
    if scores:
        return scores["original"] - scores["compressed"]
    return report.fidelity.standardized


def _kept(report) -> float:
    return report.totals["macs_after"] / report.totals["macs_before"]


if __name__ == "__main__":
    main()
