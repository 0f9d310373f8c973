"""Data-aware CP on one 256 -> 256 3x3 conv layer at R = 256: time to converge.

    python benchmarks/cp_layer.py [--device cpu|cuda] [--channels 256] [--rank 256] [--form 4way|3way]
                                  [--baseline-sweeps 300] [--no-frobenius] [--json F]

Prints (this is not a timed test): for the default solver (Anderson-accelerated ALS)
the time to converge (relative improvement of the data error per sweep < --tol), the
number of sweeps, the time per sweep and where it goes (channel step = CG on the
(C_in R)^2 system, spatial steps, A step, acceleration, init), the relative data error.
In the same run, on the same machine and load, plain ALS (no acceleration, 4 CG
products per channel step, same init) for at most --baseline-sweeps sweeps; then the
error-vs-time trace of both and the time each needs to come within 1% and 0.1% of the
lower final error, so that a speed-up cannot come from a looser stopping rule. Last,
the Frobenius CP-ALS baseline at the same rank. Run it with OPENBLAS_NUM_THREADS=1 on
a shared machine; the load average is printed before and after each solve.

W is random with power-law decaying spectra in both channel modes; S is the covariance
of im2col patches of correlated, ReLU'd, image-like activations (tests/realistic_stats.py),
d = C_in*9 = 2304 for 256 channels.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from onnxcomp.decompose.backend import get_backend  # noqa: E402
from onnxcomp.decompose.cp import cp_cost, cp_decompose  # noqa: E402

from realistic_stats import benchmark_layer, finish_benchmark, load_average  # noqa: E402


def trace(res):
    """(seconds since the call began, sweeps, relative error), the initialisation first."""
    points = [(res.initial_seconds, 0, res.initial_error / res.reference)]
    points += [(t, i + 1, e / res.reference) for i, (t, e) in enumerate(zip(res.error_seconds, res.errors))]
    return points


def first_within(points, target):
    """(seconds, sweeps) of the first point at or below target, or None."""
    return next(((t, n) for t, n, e in points if e <= target), None)


def describe(label, res, tol):
    init_s = res.initial_seconds
    sweep_s = (res.seconds - init_s) / max(res.iterations, 1)
    print(f"{label}: {res.seconds:.2f} s total, converged={res.converged} after {res.iterations} sweeps "
          f"(tol {tol:g}), {sweep_s:.3f} s per sweep, setup+init {init_s:.2f} s (init '{res.init}')")
    print("  phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(res.timings.items(), key=lambda kv: -kv[1])))
    cg = res.cg_iterations
    print(f"  CG products per sweep (channel step): {cg[:5]}{' ...' if len(cg) > 5 else ''}, reverted steps "
          f"{res.reverted}, Anderson candidates kept/tried {res.accelerated[0]}/{res.accelerated[1]}")
    print(f"  relative data error: initial {res.initial_error / res.reference:.6f} -> final {res.relative_error:.6f}")
    if len(res.errors) >= 2:
        print(f"  the last sweep gained {(res.errors[-2] - res.errors[-1]) / res.errors[-2]:.2e} (relative)")


def summary(res):
    """The numbers of one run, for --json."""
    return {"seconds": res.seconds, "converged": bool(res.converged), "sweeps": res.iterations,
            "sweep_seconds": (res.seconds - res.initial_seconds) / max(res.iterations, 1),
            "setup_init_seconds": res.initial_seconds, "timings": dict(res.timings),
            "relative_error": res.relative_error, "initial_relative_error": res.initial_error / res.reference}


def compare(runs):
    """Error-vs-time trace and time to reach the lower final error (within 1% / 0.1%)."""
    traces = {label: trace(res) for label, res in runs.items()}
    best = min(res.relative_error for res in runs.values())
    print(f"time to reach the lower final relative error {best:.6f} (seconds since the call began, sweeps):")
    for label, points in traces.items():
        cells = []
        for slack in (0.01, 0.001):
            hit = first_within(points, best * (1 + slack))
            cells.append(f"within {slack:.1%}: " + (f"{hit[0]:.1f} s ({hit[1]} sweeps)" if hit else "not reached"))
        print(f"  {label:>10}: " + ", ".join(cells))
    if len(runs) == 2:
        (fast_label, fast), (slow_label, slow) = runs.items()
        hit = first_within(traces[fast_label], slow.relative_error)
        if hit:
            print(f"  {fast_label} reaches {slow_label}'s final error {slow.relative_error:.6f} after {hit[0]:.1f} s "
                  f"({hit[1]} sweeps); {slow_label} took {slow.seconds:.1f} s ({slow.iterations} sweeps): "
                  f"{slow.seconds / hit[0]:.1f}x")
    print("error-vs-time trace (sweeps: seconds, relative error):")
    marks = sorted({0, 5, 10, 20, 40, 60, 80, 100, 150, 200, 300, 400} | {len(p) - 1 for p in traces.values()})
    for label, points in traces.items():
        cells = [f"{n}: {t:.0f}s {e:.6f}" for t, n, e in points if n in marks]
        print(f"  {label:>10}: " + " | ".join(cells))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--channels", type=int, default=256, help="C_out = C_in")
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--form", choices=["4way", "3way"], default="4way")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max-iter", type=int, default=300)
    ap.add_argument("--baseline-sweeps", type=int, default=300,
                    help="most sweeps of plain ALS (no acceleration, 4 CG products) to compare with; 0 skips it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-frobenius", action="store_true", help="skip the Frobenius baseline")
    ap.add_argument("--json", help="write the numbers printed as JSON here")
    args = ap.parse_args(argv)
    xp = get_backend(args.device)
    c, r = args.channels, args.rank
    d = c * 9
    cost = cp_cost(c, c, 3, 3, r, args.form)
    print(f"layer {c} -> {c} 3x3, d = {d}, CP {args.form} rank {r} ({cost.params / (c * c * 9):.1%} of the params), "
          f"device {args.device}, numpy {np.__version__}, cpus {os.cpu_count()}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}, load avg before {load_average()}")
    w, s, built = benchmark_layer(c, args.seed)
    print(f"statistics: {built:.1f} s to build W and S (not part of the solve)")

    cp_decompose(w[:8, :8], s[:72, :72], 4, form=args.form, xp=xp, max_iter=2)  # warm-up (BLAS / cuBLAS init)

    runs = {}
    runs["Anderson"] = cp_decompose(w, s, r, form=args.form, xp=xp, tol=args.tol, max_iter=args.max_iter)
    describe("data-aware CP (Anderson-accelerated ALS, the default)", runs["Anderson"], args.tol)
    print(f"  load avg {load_average()}")
    if args.baseline_sweeps > 0:
        runs["plain ALS"] = cp_decompose(w, s, r, form=args.form, xp=xp, tol=args.tol, max_iter=args.baseline_sweeps,
                                         accelerate=False, cg_maxiter=4)
        describe("plain ALS (the previous sweep: no acceleration, 4 CG products per channel step; same init)",
                 runs["plain ALS"], args.tol)
        print(f"  load avg {load_average()}")
    compare(runs)
    numbers = {"device": args.device, "channels": c, "rank": r, "form": args.form, "tol": args.tol,
               "max_iter": args.max_iter, "statistics_seconds": built,
               **{label: summary(res) for label, res in runs.items()}}
    if not args.no_frobenius:
        res = runs["Anderson"]
        fro = cp_decompose(w, s, r, form=args.form, xp=xp, norm="frobenius", tol=1e-6, max_iter=200)
        print(f"Frobenius CP-ALS baseline: {fro.seconds:.2f} s, {fro.iterations} sweeps, "
              f"relative data error {fro.relative_error:.4f} (data-aware / Frobenius = {res.error / fro.error:.3f})")
        numbers["frobenius"] = {"seconds": fro.seconds, "sweeps": fro.iterations,
                                "relative_error": fro.relative_error}
    finish_benchmark(numbers, args.json)


if __name__ == "__main__":
    main()
