"""Rank multiples on a small model: the digits CNN at --target-macs 0.5 and 0.25, three rank rules.

- all multiples: every layer's candidate ranks are multiples of 8 (where at least one fits);
- default: multiples of 8, except layers with fewer than ``MIN_MULTIPLES`` of them (every rank);
- any rank: ``rank_multiple=1``.
Held-out numbers (the 500 images of examples/digits/heldout.npz, never used for calibration):
standardised output error and accuracy; latency: compressed / original at batch 1, one thread,
interleaved pairs (``onnxcomp.bench``). The machine is shared: latency ratios move by ~0.03.

    python benchmarks/digits_multiples.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import onnxcomp
from onnxcomp.bench import bench
from onnxcomp.budget import candidates
from onnxcomp.model import load_model
from onnxcomp.runtime import make_session

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits"
RULES = {"all multiples": (None, 1), "default": (None, candidates.MIN_MULTIPLES), "any rank": (1, None)}


def main() -> None:
    model = load_model(EXAMPLE / "digits_cnn.onnx")
    calib = np.load(EXAMPLE / "calib.npz")["input"]
    held = np.load(EXAMPLE / "heldout.npz")
    images, labels = held["input"], held["labels"]
    print("| rule | target | MACs kept | std. error | accuracy | latency | ranks |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for rule, (multiple, min_multiples) in RULES.items():
        if min_multiples is not None:
            candidates.MIN_MULTIPLES = min_multiples  # the rule under test, for this run only
        for fraction in (0.5, 0.25):
            small, report = onnxcomp.compress(model, calib, target_macs=fraction, rank_multiple=multiple,
                                              progress=False, threads=1)
            scores = make_session(small, threads=1).run(None, {"input": images})[0]
            result = bench(model, small, {"input": images}, batch_sizes=(1,), threads=1, repeats=200, warmup=20,
                           floor=False)
            error = next(iter(result.outputs.values()))["standardized"]
            kept = report.totals["macs_after"] / report.totals["macs_before"]
            ranks = ", ".join("x".join(map(str, row.rank)) if row.rank else "-" for row in report.layers)
            print(f"| {rule} | {fraction} | {kept:.1%} | {error:.4f} | {np.mean(scores.argmax(1) == labels):.3f} "
                  f"| {result.latency[0].ratio:.3f} | {ranks} |", flush=True)


if __name__ == "__main__":
    main()
