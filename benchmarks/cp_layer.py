"""Data-aware CP on one 256 -> 256 3x3 conv layer at R = 256: time to converge.

    python benchmarks/cp_layer.py [--device cpu|cuda] [--channels 256] [--rank 256] [--form 4way|3way]

Prints (this is not a timed test): the time to converge (relative improvement of the
data error per sweep < --tol), the number of sweeps, the time per sweep and where it
goes (channel step = CG on the (C_in R)^2 system, spatial steps, A step, init), the
relative data error against the Frobenius CP-ALS baseline at the same rank.

W is random with power-law decaying spectra in both channel modes; S is the covariance
of im2col patches of correlated, ReLU'd, image-like activations (tests/realistic_stats.py),
d = C_in*9 = 2304 for 256 channels.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from onnxcomp.decompose.backend import get_backend  # noqa: E402
from onnxcomp.decompose.cp import cp_cost, cp_decompose  # noqa: E402
from realistic_stats import decaying_conv_weight, realistic_patch_covariance  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--channels", type=int, default=256, help="C_out = C_in")
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--form", choices=["4way", "3way"], default="4way")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-frobenius", action="store_true", help="skip the Frobenius baseline")
    args = ap.parse_args(argv)
    xp = get_backend(args.device)
    c, r = args.channels, args.rank
    d = c * 9
    cost = cp_cost(c, c, 3, 3, r, args.form)
    print(f"layer {c} -> {c} 3x3, d = {d}, CP {args.form} rank {r} ({cost.params / (c * c * 9):.1%} of the params), "
          f"device {args.device}, numpy {np.__version__}, cpus {os.cpu_count()}, "
          f"load avg before {os.getloadavg() if hasattr(os, 'getloadavg') else None}")
    t0 = time.perf_counter()
    w = decaying_conv_weight(c, c, 3, 3, args.seed + 1)
    s, _ = realistic_patch_covariance(c, 3, 3, args.seed)
    print(f"statistics: {time.perf_counter() - t0:.1f} s to build W and S (not part of the solve)")

    cp_decompose(w[:8, :8], s[:72, :72], 4, form=args.form, xp=xp, max_iter=2)  # warm-up (BLAS / cuBLAS init)

    res = cp_decompose(w, s, r, form=args.form, xp=xp, tol=args.tol, max_iter=args.max_iter)
    init_s = res.timings.get("init", 0.0) + res.timings.get("setup", 0.0)
    sweep_s = (res.seconds - init_s) / max(res.iterations, 1)
    print(f"data-aware CP: {res.seconds:.2f} s total, converged={res.converged} after {res.iterations} sweeps "
          f"(tol {args.tol:g}), {sweep_s:.3f} s per sweep, setup+init {init_s:.2f} s (init '{res.init}')")
    print("  phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(res.timings.items(), key=lambda kv: -kv[1])))
    print(f"  CG products per sweep (channel step): {res.cg_iterations[:5]}{' ...' if len(res.cg_iterations) > 5 else ''}"
          f", reverted steps {res.reverted}")
    print(f"  relative data error: initial {res.initial_error / res.reference:.4f} -> final {res.relative_error:.4f}")
    if not args.no_frobenius:
        fro = cp_decompose(w, s, r, form=args.form, xp=xp, norm="frobenius", tol=1e-6, max_iter=200)
        print(f"Frobenius CP-ALS baseline: {fro.seconds:.2f} s, {fro.iterations} sweeps, "
              f"relative data error {fro.relative_error:.4f} (data-aware / Frobenius = {res.error / fro.error:.3f})")


if __name__ == "__main__":
    main()
