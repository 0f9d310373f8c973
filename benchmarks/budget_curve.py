"""Held-out error and accuracy versus budget on the digits CNN: uniform per-layer rates vs allocated.

    python benchmarks/budget_curve.py [--fractions 0.2 0.3 ... 0.9] [--method svd] [--plot curve.png]

For every MAC fraction F: `--keep F` (each layer keeps F of its MACs) and `--target-macs F`
(the whole model keeps F, ranks allocated across layers with the sensitivity probe),
both with the data norm, evaluated with onnxruntime on the 500 held-out images (never
used for calibration): output relative L2 error against the original and accuracy.
Prints a markdown table; `--plot` draws both curves (needs the optional extra:
`pip install ".[plot]"`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import onnxcomp
from onnxcomp.metrics import output_errors
from onnxcomp.model import load_model
from onnxcomp.runtime import make_session

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits"
PROBE_SAMPLES = 8  # calibration samples that judge candidates (the sensitivity probe), kept out of the statistics


def evaluate(model, images, labels, reference) -> tuple[float, float]:
    logits = make_session(model).run(None, {"input": images})[0]
    error = output_errors([reference], [logits], ["logits"])["logits"]["relative_l2"]
    return error, float((logits.argmax(1) == labels).mean())


def sweep(fractions, method):
    original = load_model(EXAMPLE / "digits_cnn.onnx")
    held_out = np.load(EXAMPLE / "heldout.npz")
    images, labels = held_out["input"], held_out["labels"]
    reference = make_session(original).run(None, {"input": images})[0]
    calibration = np.load(EXAMPLE / "calib.npz")["input"]
    # The sensitivity probe takes the first PROBE_SAMPLES calibration samples: keep them out of the
    # statistics (what `compress` does itself when it collects them).
    stats = onnxcomp.calibrate(original, calibration[PROBE_SAMPLES:], progress=False)
    rows = []
    for fraction in fractions:
        for allocation, rule in (("uniform", {"keep": fraction}), ("allocated", {"target_macs": fraction})):
            model, report = onnxcomp.compress(original, calibration[:PROBE_SAMPLES], stats=stats, method=method,
                                              progress=False, **rule)
            kept = report.totals["macs_after"] / report.totals["macs_before"]
            error, accuracy = evaluate(model, images, labels, reference)
            rows.append({"fraction": fraction, "allocation": allocation, "macs_kept": kept, "error": error,
                         "accuracy": accuracy})
    return rows, float((reference.argmax(1) == labels).mean())


def plot(rows, base_accuracy, path, method) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install \".[plot]\"") from None
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for allocation, style in (("uniform", "o--"), ("allocated", "s-")):
        mine = [r for r in rows if r["allocation"] == allocation]
        x = [r["macs_kept"] for r in mine]
        left.semilogy(x, [r["error"] for r in mine], style, label=allocation)
        right.plot(x, [r["accuracy"] for r in mine], style, label=allocation)
    right.axhline(base_accuracy, color="gray", linewidth=0.8, label="original")
    left.set(xlabel="model MACs kept", ylabel="held-out output rel. L2 error", title=f"digits CNN, {method}, data norm")
    right.set(xlabel="model MACs kept", ylabel="held-out accuracy", title="500 held-out images")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9])
    parser.add_argument("--method", default="svd", choices=["svd", "tucker2", "cp", "auto"])
    parser.add_argument("--plot", help="write the two curves to this image file (matplotlib)")
    args = parser.parse_args()
    rows, base_accuracy = sweep(args.fractions, args.method)
    print(f"original held-out accuracy {base_accuracy:.3f}; method {args.method}, data norm\n")
    print("| budget F | uniform: MACs kept | error | accuracy | allocated: MACs kept | error | accuracy |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for fraction in args.fractions:
        u, a = [next(r for r in rows if r["fraction"] == fraction and r["allocation"] == k)
                for k in ("uniform", "allocated")]
        print(f"| {fraction:.2f} | {u['macs_kept']:.3f} | {u['error']:.4f} | {u['accuracy']:.3f} "
              f"| {a['macs_kept']:.3f} | {a['error']:.4f} | {a['accuracy']:.3f} |")
    if args.plot:
        plot(rows, base_accuracy, args.plot, args.method)


if __name__ == "__main__":
    main()
