"""--max-drop on the embedded digits CNN: the search's answer against a sweep of MAC budgets.

    python benchmarks/max_drop.py [--drops 0.01 0.02 0.05] [--metric fidelity|top1] [--step 0.02]

The calibration images are split once as `compress` splits them by default (every 9th of the
256, the first 26: the validation samples that judge), the statistics are collected on the rest,
and every run below gets exactly those statistics and those validation samples, so the search
and the sweep see the same losses. For each drop D the script prints the fraction `--max-drop D`
found, the smallest fraction of the sweep (step `--step`) whose validation loss is within D,
and the held-out accuracy of both models on the 500 images that neither calibration nor
validation saw. The search is right when its fraction is within one step of the sweep's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnxcomp  # noqa: E402
from onnxcomp.calibration.holdout import held_out_mask  # noqa: E402
from onnxcomp.runtime import make_session  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drops", type=float, nargs="+", default=[0.01, 0.02, 0.05])
    parser.add_argument("--metric", default="fidelity", choices=["fidelity", "top1"])
    parser.add_argument("--step", type=float, default=0.02, help="the sweep's fraction step")
    args = parser.parse_args()

    model = onnxcomp.load_model(EXAMPLE / "digits_cnn.onnx")
    calibration = np.load(EXAMPLE / "calib.npz")["input"]
    held_out = np.load(EXAMPLE / "heldout.npz")
    validation = held_out_mask(len(calibration))
    stats = onnxcomp.calibrate(model, calibration[~validation], progress=False)
    common = dict(stats=stats, validation_data=calibration[validation], metric=args.metric, progress=False)

    def accuracy(compressed) -> float:
        logits = make_session(compressed).run(None, {"input": held_out["input"]})[0]
        return float(np.mean(logits.argmax(1) == held_out["labels"]))

    print(f"digits CNN, metric {args.metric}; statistics of {int((~validation).sum())} calibration images, "
          f"judged on {int(validation.sum())} held out of them; accuracy on the 500 held-out test images "
          f"(original {accuracy(model):.3f})")
    start = time.perf_counter()
    sweep = []
    for fraction in np.arange(args.step, 1.0 + 1e-9, args.step):
        compressed, report = onnxcomp.compress(model, target_macs=round(float(fraction), 4), **common)
        sweep.append((float(fraction), _loss(report), report))
    print(f"sweep of {len(sweep)} budgets: {time.perf_counter() - start:.1f} s")
    print()
    print("| drop D | --max-drop: MACs kept | loss | test accuracy | sweep: smallest within D | loss | "
          "test accuracy | within one step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for drop in args.drops:
        started = time.perf_counter()
        compressed, report = onnxcomp.compress(model, max_drop=drop, **common)
        seconds = time.perf_counter() - started
        found = report.settings["target"]["search"]["fraction"]
        within = [(f, loss, r) for f, loss, r in sweep if loss <= drop]
        best_fraction, best_loss, best_report = within[0] if within else (1.0, 0.0, None)
        best_model, _ = onnxcomp.compress(model, target_macs=best_fraction, **common)
        print(f"| {drop:g} | {_kept(report):.1%} (fraction {found:.3f}, {seconds:.1f} s) | {_loss(report):.4f} | "
              f"{accuracy(compressed):.3f} | {_kept(best_report) if best_report else 1:.1%} (fraction "
              f"{best_fraction:.2f}) | {best_loss:.4f} | {accuracy(best_model):.3f} | "
              f"{'yes' if found <= best_fraction + args.step + 1e-9 else 'NO'} |")


def _loss(report) -> float:
    scores = report.settings.get("scores")
    if scores:
        return scores["original"] - scores["compressed"]
    return report.fidelity.standardized


def _kept(report) -> float:
    return report.totals["macs_after"] / report.totals["macs_before"]


if __name__ == "__main__":
    main()
