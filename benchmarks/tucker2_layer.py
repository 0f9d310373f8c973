"""Data-aware Tucker-2 on one 512 -> 512 3x3 conv layer: time to converge and operator speed.

    python benchmarks/tucker2_layer.py [--device cpu|cuda] [--channels 512] [--ranks 256 256] [--json F]

Prints (this is not a timed test):
- the time to converge (relative improvement of the data error < --tol), the number
  of sweeps, the time per sweep and where it goes;
- the achieved GFLOP/s of the input step's matrix-free operator against a plain
  float64 GEMM of the same shape as its main product, measured interleaved in the
  same run (so a busy machine slows both alike);
- the data error against the Frobenius (HOSVD/HOOI) baseline at the same ranks.

W is random with power-law decaying spectra in both channel modes; S is the
covariance of im2col patches of correlated, ReLU'd, image-like activations
(tests/realistic_stats.py), d = C_in*9 = 4608 for 512 channels.
Targets on the 2-core dev machine: converge < 60 s; operator >= 50% of the GEMM rate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from blas_env import preset_threads  # noqa: E402  (before NumPy: see blas_env.py)

preset_threads(sys.argv[1:])

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from onnxcomp.decompose.backend import get_backend, to_backend  # noqa: E402
from onnxcomp.decompose.kron import KronBlockOperator, KronPreconditioner  # noqa: E402
from onnxcomp.decompose.tucker2 import tucker2  # noqa: E402

from realistic_stats import benchmark_layer, finish_benchmark, load_average  # noqa: E402


def sync(xp):
    if xp is not np:
        xp.cuda.Device().synchronize()


def timed(xp, fn):
    sync(xp)
    t0 = time.perf_counter()
    fn()
    sync(xp)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--channels", type=int, default=512, help="C_out = C_in")
    ap.add_argument("--ranks", type=int, nargs=2, default=(256, 256), metavar=("R_OUT", "R_IN"))
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved operator/GEMM timings")
    ap.add_argument("--no-frobenius", action="store_true", help="skip the Frobenius baseline")
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS threads (sets OPENBLAS/OMP/MKL_NUM_THREADS before NumPy loads; default: as is). "
                         "On a shared machine 1 thread avoids OpenBLAS's thread thrashing in LAPACK calls")
    ap.add_argument("--json", help="write the numbers printed as JSON here")
    args = ap.parse_args(argv)
    xp = get_backend(args.device)
    c = args.channels
    r_out, r_in = args.ranks
    k = 9
    d = c * k
    print(f"layer {c} -> {c} 3x3, d = {d}, ranks (R_out, R_in) = ({r_out}, {r_in}), device {args.device}, "
          f"numpy {np.__version__}, cpus {os.cpu_count()}, "
          f"BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}, "
          f"load avg before {load_average()}")

    w, s, built = benchmark_layer(c, args.seed)
    print(f"statistics: {built:.1f} s to build W and S (not part of the solve)")

    # warm-up on a small layer: BLAS/cuBLAS initialisation is not the solver's time
    tucker2(w[:16, :16], s[: 16 * k, : 16 * k], (4, 4), xp=xp, max_iter=2)

    res = tucker2(w, s, (r_out, r_in), xp=xp, tol=args.tol)
    sweeps = res.iterations
    tm = res.timings
    print()
    print(f"data-aware Tucker-2: converged={res.converged} in {res.seconds:.2f} s, {sweeps} sweeps "
          f"(tol {args.tol:g} on the relative improvement)")
    print(f"  init '{res.init}' (candidates, relative error after one output step: "
          + ", ".join(f"{n} {e / res.reference:.5g}" for n, e in res.init_errors.items()) + ")")
    print(f"  relative data error: initial {res.initial_error / res.reference:.6g} -> final {res.relative_error:.6g}")
    sw = res.sweep_seconds
    print(f"  time per sweep: mean {statistics.mean(sw):.2f} s, min {min(sw):.2f} s, max {max(sw):.2f} s "
          f"(setup {tm.get('setup', 0):.2f} s, init {tm.get('init', 0):.2f} s); "
          f"CG products per sweep: {sum(res.cg_iterations) / max(sweeps, 1):.1f} (+1 cheap initial residual)")
    print("  phases (s): " + ", ".join(f"{n} {v:.2f}" for n, v in sorted(tm.items(), key=lambda kv: -kv[1])))
    if res.psd is not None:
        print(f"  S: support {res.psd.support}/{res.psd.dim}, positive definite {res.psd.positive_definite}, "
              f"projected {res.psd.projected} ({res.psd.seconds:.2f} s)")

    # ---- operator throughput vs GEMM (interleaved)
    sx = to_backend(xp, s)
    core = to_backend(xp, res.factors.core.reshape(r_out, -1))
    m = core.T @ core
    op = KronBlockOperator(sx, m, c, k, r_in)
    pre = KronPreconditioner(sx, m, c, k, r_in)
    u = to_backend(xp, res.factors.u_in)
    a = xp.asarray(np.random.default_rng(1).standard_normal((c, k * d)))
    b = xp.asarray(np.random.default_rng(2).standard_normal((k * d, r_in)))
    gemm_flops = 2.0 * c * (k * d) * r_in
    op(u), a @ b  # warm
    t_op, t_gemm, t_pre = [], [], []
    for _ in range(args.repeats):
        t_op.append(timed(xp, lambda: op(u)))
        t_gemm.append(timed(xp, lambda: a @ b))
        t_pre.append(timed(xp, lambda: pre(u)))
    op_rate = op.flops / statistics.median(t_op) / 1e9
    gemm_rate = gemm_flops / statistics.median(t_gemm) / 1e9
    print()
    print(f"input-step operator: {op.flops / 1e9:.1f} GFLOP per product, median {statistics.median(t_op) * 1e3:.0f} ms "
          f"-> {op_rate:.1f} GFLOP/s")
    print(f"plain float64 GEMM ({c} x {k * d}) @ ({k * d} x {r_in}): {gemm_flops / 1e9:.1f} GFLOP, "
          f"median {statistics.median(t_gemm) * 1e3:.0f} ms -> {gemm_rate:.1f} GFLOP/s")
    print(f"operator / GEMM rate: {op_rate / gemm_rate:.0%}   "
          f"(preconditioner: {statistics.median(t_pre) * 1e3:.1f} ms per application)")

    numbers = {
        "device": args.device, "channels": c, "ranks": [r_out, r_in], "tol": args.tol,
        "statistics_seconds": built, "seconds": res.seconds, "converged": bool(res.converged), "sweeps": sweeps,
        "sweep_seconds_mean": statistics.mean(sw) if sw else None, "timings": dict(tm),
        "relative_error": res.relative_error, "initial_relative_error": res.initial_error / res.reference,
        "operator_gflop": op.flops / 1e9, "operator_gflops": op_rate, "gemm_gflops": gemm_rate,
        "operator_fraction_of_gemm": op_rate / gemm_rate,
        "preconditioner_seconds": statistics.median(t_pre),
    }
    if not args.no_frobenius:
        fro = tucker2(w, s, (r_out, r_in), norm="frobenius", xp=xp, tol=args.tol)
        print()
        print(f"Frobenius HOSVD/HOOI baseline: {fro.seconds:.2f} s, {fro.iterations} sweeps, relative data error "
              f"{fro.relative_error:.6g} (data-aware: {res.relative_error:.6g}, {fro.error / res.error:.2f}x lower)")
        numbers["frobenius"] = {"seconds": fro.seconds, "sweeps": fro.iterations,
                                "relative_error": fro.relative_error}
    finish_benchmark(numbers, args.json)


if __name__ == "__main__":
    main()
