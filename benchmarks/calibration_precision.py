"""Float32 against float64 calibration products: the statistics, and what the solver makes of them.

Collects each model's layer-input statistics twice, with ``precision="float32"``
(each block's products in float32, summed in float64) and ``"float64"``, and
compares, layer by layer:

- the statistics: ``||S32 - S64||_F / ||S64||_F`` for the covariance S, and the
  largest difference of an entry relative to its row and column scale,
  ``|dS_ij| / sqrt(S_ii S_jj)``;
- the data-aware SVD (``decompose/svd.py``) at ranks of 1/8 to 15/16 of the
  full rank: the discarded eigenvalue sum (the error curve; its difference
  also relative to the layer's whole output variance) and the retained sum of
  ``W S W^T``, float32 against float64; and the error of the float32 solution
  *measured under the float64 statistics* against the float64 optimum: what
  the factors lose (>= 0 up to rounding, since the float64 factors are optimal
  there);
- for scale, the same discarded sums from the two halves of the data (float64):
  how much the curve moves with the calibration samples themselves.

Models: the digits example (its calibration file) and the YOLOv8n-shaped model
of ``yolo_shaped.py`` on smooth random images.

    python benchmarks/calibration_precision.py [--yolo-images 64] [--image-size 320] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from yolo_shaped import build_yolo_shaped, smooth_images  # noqa: E402

from onnxcomp.calibration.collect import collect_statistics  # noqa: E402
from onnxcomp.calibration.readers import read_arrays  # noqa: E402
from onnxcomp.decompose.svd import output_spectrum  # noqa: E402
from onnxcomp.model import find_layers, load_model  # noqa: E402

FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 3 / 4, 15 / 16)


def blas_threads(threads: int | None):
    """threadpoolctl's limit on BLAS threads (a no-op context without threadpoolctl or a count)."""
    from contextlib import nullcontext

    if threads is None:
        return nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the environment variables were set before NumPy loaded (main)
        return nullcontext()
    return threadpool_limits(threads)


def _half(data, which: int):
    """The first or second half of the samples (an array, or a dict of arrays)."""
    if isinstance(data, dict):
        return {name: _half(value, which) for name, value in data.items()}
    middle = len(data) // 2
    return data[:middle] if which == 0 else data[middle:]


def compare(model, data, batch_size: int) -> list[dict]:
    layers, _ = find_layers(model)
    stats = {}
    for precision in ("float32", "float64"):
        start = time.perf_counter()
        stats[precision] = collect_statistics(model, layers, data, batch_size=batch_size, progress=False,
                                              precision=precision)
        print(f"  {precision}: {time.perf_counter() - start:.1f} s")
    halves = [collect_statistics(model, layers, _half(data, which), batch_size=batch_size, progress=False,
                                 precision="float64") for which in (0, 1)]
    rows = []
    for layer in layers:
        single, double = stats["float32"][layer.stats_key], stats["float64"][layer.stats_key]
        s32, s64 = single.covariance(), double.covariance()
        scale = np.sqrt(np.maximum(np.outer(np.diag(s64), np.diag(s64)), 1e-300))
        w = layer.weight.astype(np.float64).reshape(layer.weight.shape[0], -1)
        full = min(w.shape)
        spec32, spec64 = output_spectrum(w, s32), output_spectrum(w, s64)
        first, second = (output_spectrum(w, half[layer.stats_key].covariance()) for half in halves)
        total = float(spec64.values.sum())
        curve = []
        for fraction in FRACTIONS:
            rank = max(1, min(full - 1, round(fraction * full)))
            kept32, kept64 = spec32.values[:rank].sum(), spec64.values[:rank].sum()
            lost32, lost64 = spec32.error(rank), spec64.error(rank)
            basis = spec32.basis[:, :rank]
            delta = w - basis @ (basis.T @ w)  # what the float32 factors leave out
            true32 = float(np.einsum("ij,ij->", delta @ s64, delta))  # ... measured under float64 statistics
            curve.append({
                "rank": rank,
                "discarded": abs(lost32 - lost64) / max(lost64, 1e-300),
                "discarded_of_total": abs(lost32 - lost64) / max(total, 1e-300),
                "sampling": abs(first.error(rank) - second.error(rank)) / max(lost64, 1e-300),
                "retained": abs(kept32 - kept64) / max(kept64, 1e-300),
                "excess": (true32 - lost64) / max(lost64, 1e-300),
                "discarded_share": lost64 / total,
            })
        rows.append({
            "layer": layer.name, "dim": s64.shape[0], "rows": double.rows,
            "stats": np.linalg.norm(s32 - s64) / np.linalg.norm(s64),
            "entry": float(np.max(np.abs(s32 - s64) / scale)),
            "mean": float(np.linalg.norm(single.mean() - double.mean()) / max(np.linalg.norm(double.mean()), 1e-300)),
            "curve": curve,
        })
    return rows


def summarise(name: str, rows: list[dict]) -> None:
    print(f"{name}: {len(rows)} layers")
    print(f"  statistics   ||dS||/||S||: median {np.median([r['stats'] for r in rows]):.1e}, max "
          f"{max(r['stats'] for r in rows):.1e}; largest |dS_ij|/sqrt(S_ii S_jj) {max(r['entry'] for r in rows):.1e}; "
          f"mean {max(r['mean'] for r in rows):.1e}")
    print("  relative differences float32 - float64 (median / max over layers), and between the float64")
    print("  curves of the two halves of the data (the sampling noise of the curve, for scale)")
    print(f"  {'rank/full':>9} {'discarded':>9} {'discarded sum':>19} {'its diff / total':>19} {'retained sum':>19} "
          f"{'f32 factors excess':>19} {'halves: discarded':>19}")
    print(f"  {'':>9} {'share':>9}" + f" {'median':>9} {'max':>9}" * 5)
    keys = ("discarded", "discarded_of_total", "retained", "excess", "sampling", "discarded_share")
    for i, fraction in enumerate(FRACTIONS):
        column = {key: [r["curve"][i][key] for r in rows] for key in keys}
        print(f"  {fraction:9.3f} {np.median(column['discarded_share']):9.1e}"
              + "".join(f" {np.median(column[key]):9.1e} {max(column[key]):9.1e}" for key in keys[:5]))
    worst = max(rows, key=lambda r: max(c["discarded"] for c in r["curve"]))
    print(f"  largest discarded-sum difference: {worst['layer']} (d={worst['dim']}, {worst['rows']} rows)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--yolo-images", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    args = parser.parse_args()
    with blas_threads(args.threads):
        digits = load_model(ROOT / "examples" / "digits" / "digits_cnn.onnx")
        calib = read_arrays(ROOT / "examples" / "digits" / "calib.npz", "calibration data", archive=True)
        print("digits example (examples/digits/calib.npz)")
        summarise("digits", compare(digits, dict(calib), args.batch_size))
        images = smooth_images(args.yolo_images, args.image_size, seed=100)
        print(f"YOLOv8n-shaped model, {args.yolo_images} smooth random images at {args.image_size}")
        summarise("yolo", compare(build_yolo_shaped(args.image_size), images, args.batch_size))


if __name__ == "__main__":
    main()
