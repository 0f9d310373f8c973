"""Held-out accuracy of the embedded digits CNN compressed at several MAC budgets.

Prints a markdown table: method / norm / MACs kept / accuracy / output error
against the original, all measured with onnxruntime on the 500 held-out
images (never used for calibration).

Each budget is run two ways: the same fraction for every layer (``--keep F``)
and a whole-model budget allocated across layers (``--target-macs F``).
``--latency`` adds the solve time and the latency ratio (compressed / original,
``onnxcomp.bench`` at batch 1, one intra-op thread, median of interleaved pairs).

    python benchmarks/digits_accuracy.py [--keep 0.75 0.5 0.35] [--methods svd tucker2 cp]
        [--norms data] [--allocations uniform allocated] [--latency]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import onnxcomp
from onnxcomp.bench import bench
from onnxcomp.metrics import output_errors
from onnxcomp.model import count_macs, load_model
from onnxcomp.runtime import make_session

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits"


def accuracy_and_logits(model, images, labels):
    logits = make_session(model).run(None, {"input": images})[0]
    return float((logits.argmax(1) == labels).mean()), logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5, 0.35, 0.25])
    parser.add_argument("--methods", nargs="+", default=["svd"], choices=["svd", "tucker2", "cp", "auto"])
    parser.add_argument("--norms", nargs="+", default=["data", "frobenius"], choices=["data", "frobenius"])
    parser.add_argument("--allocations", nargs="+", default=["uniform", "allocated"], choices=["uniform", "allocated"])
    parser.add_argument("--latency", action="store_true",
                        help="also the solve seconds and the latency ratio at batch 1, one thread")
    args = parser.parse_args()

    original = load_model(EXAMPLE / "digits_cnn.onnx")
    held_out = np.load(EXAMPLE / "heldout.npz")
    images, labels = held_out["input"], held_out["labels"]
    base_accuracy, base_logits = accuracy_and_logits(original, images, labels)
    base_macs = count_macs(original, {"input": [1, 1, 32, 32]})
    print(f"original: accuracy {base_accuracy:.3f}, {base_macs / 1e6:.2f}M MACs/sample\n")
    stats = onnxcomp.calibrate(original, EXAMPLE / "calib.npz", progress=False)
    columns = ["method", "norm", "ranks", "budget", "model MACs kept", "held-out accuracy", "output rel. L2 error"]
    columns += ["solve s", "latency ratio"] if args.latency else []
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for method in args.methods:
        for keep in args.keep:
            for allocation in args.allocations:
                for norm in args.norms:
                    rule = {"keep": keep} if allocation == "uniform" else {"target_macs": keep}
                    model, report = onnxcomp.compress(
                        original, stats=stats if norm == "data" else None, method=method, norm=norm,
                        progress=False, **rule,
                    )
                    accuracy, logits = accuracy_and_logits(model, images, labels)
                    error = output_errors([base_logits], [logits], ["logits"])["logits"]["relative_l2"]
                    macs = report.totals["macs_after"] / base_macs
                    cells = [method, norm, allocation, f"{keep:.2f}", f"{macs:.1%}", f"{accuracy:.3f}", f"{error:.4f}"]
                    if args.latency:
                        cells += [f"{report.seconds['solve']:.1f}", f"{latency_ratio(original, model, images):.2f}"]
                    print("| " + " | ".join(cells) + " |", flush=True)


def latency_ratio(original, compressed, images) -> float:
    """Compressed / original time per run at batch 1, one thread (median of interleaved pairs)."""
    result = bench(original, compressed, {"input": images[:64]}, batch_sizes=(1,), threads=1)
    return result.latency[0].ratio


if __name__ == "__main__":
    main()
