"""Tucker-2 candidate curves for whole-model budgets: cost per layer against the SVD curve, accuracy.

    python benchmarks/tucker2_curve.py [--images 128] [--image-size 320] [--layers N] [--threads 1]
        [--converged] [--allocation] [--stats F] [--json F]

Model: the YOLOv8n-shaped detector (benchmarks/yolo_shaped.py, 63 convs, 39 of them 3x3), statistics
from ``--images`` smooth random images (``--stats F``: saved there and reused). Prints (not a test):

- per 3x3 conv, interleaved in one run: the SVD curve (every rank from one eigendecomposition), the
  previous Tucker-2 curve (``search_ranks`` at each of the seven MAC fractions: a grid of R_in, two
  output steps per pair tried, one new problem per fraction) and this one (the proxy surface, then
  one ALS sweep per point); their totals and the ratios to the SVD curves.
- ``--converged``: every point of the curve solved to convergence (the final solve's tolerance,
  from the point's basis): the relative gap of the proxy (no sweep), of the score (one sweep), of
  the old proxy at the same pair (better of the HOSVD and data-aware bases at that R_out) and of the
  HOSVD basis alone, above the converged error.
- ``--allocation``: ``compress(method="auto", target_macs=F, sensitivity="off")`` with these curves
  against "full" curves (each Tucker-2 point scored by its converged error), and against the proxy
  alone (no sweep: ``TUCKER2_CANDIDATE_SWEEPS = 0``), on the digits example
  (F = 0.5, 0.75; error and accuracy on its 500 held-out images) and on the YOLO-shaped model (F =
  0.5, 0.75; 16 other images): the knapsack's objective after the final solves (sum over layers of
  the relative squared output errors), the standardised error, and the choices that differ.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from blas_env import preset_threads  # noqa: E402  (before NumPy: see blas_env.py)

preset_threads(sys.argv[1:])

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from yolo_shaped import build_yolo_shaped, smooth_images  # noqa: E402

import onnxcomp  # noqa: E402
from onnxcomp.budget import candidates  # noqa: E402
from onnxcomp.calibration.holdout import held_out_mask  # noqa: E402
from onnxcomp.calibration.stats import Statistics  # noqa: E402
from onnxcomp.config import Method, SolveConfig  # noqa: E402
from onnxcomp.decompose.solve import layer_problem  # noqa: E402
from onnxcomp.decompose.tucker2 import search_ranks, tucker2  # noqa: E402
from onnxcomp.decompose.tucker2.problem import Tucker2Problem  # noqa: E402
from onnxcomp.errors import OnnxcompError  # noqa: E402
from onnxcomp.metrics import output_errors  # noqa: E402
from onnxcomp.model import find_layers  # noqa: E402
from onnxcomp.runtime import make_session  # noqa: E402

from realistic_stats import finish_benchmark, load_average  # noqa: E402

SOLVE = SolveConfig(method=Method.AUTO)
MULTIPLE = 8  # the default rank multiple of MAC budgets
DIGITS = ROOT / "examples" / "digits"


def old_curve(problem, multiple=MULTIPLE):
    """The previous ``tucker2_candidates``: the best pair at each fraction by ``search_ranks``'s
    proxy. Returns the pairs and the number of fractions where the search raised ValueError (layers
    with few channels for the multiple: the previous budget stopped there)."""
    W, S = problem.conv_weight(), problem.fit_matrix(SOLVE)
    pairs, failed = [], 0
    for fraction in candidates.TUCKER2_FRACTIONS:
        try:
            search = search_ranks(W, S, fraction, measure="macs", in_positions=problem.input_ratio, grid=4,
                                  refine=0, multiple=multiple)
        except OnnxcompError:
            continue
        except ValueError:
            failed += 1
            continue
        if search.ranks not in pairs:
            pairs.append(search.ranks)
    return pairs, failed


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def yolo(args):
    model = build_yolo_shaped(args.image_size)
    shapes = {"images": [1, 3, args.image_size, args.image_size]}
    if args.stats and Path(args.stats).exists():
        stats = Statistics.load(args.stats)
    else:
        images = smooth_images(args.images, args.image_size, seed=1)
        stats, seconds = timed(lambda: onnxcomp.calibrate(model, images, progress=False))
        print(f"calibration of the YOLOv8n-shaped model on {args.images} images: {seconds:.1f} s")
        if args.stats:
            stats.save(args.stats)
    return model, shapes, stats


def curves(model, shapes, stats, args, numbers):
    layers, _ = find_layers(model, shapes)
    convs = [layer for layer in layers if layer.kernel != (1, 1)][: args.layers]
    print(f"\n{len(convs)} 3x3 convs; seconds per curve (multiples of {MULTIPLE}), one run, load {load_average()}")
    print(f"{'layer':18s} {'shape':>16s} {'svd':>7s} {'old t2':>7s} {'new t2':>7s} {'old/svd':>7s} {'new/svd':>7s}")
    totals = np.zeros(3)
    rows = []
    for layer in convs:
        problem = layer_problem(layer, stats[layer.stats_key])
        _, svd = timed(lambda p=problem: candidates.svd_candidates(p, SOLVE, np, MULTIPLE))
        (old, failed), t_old = timed(lambda p=problem: old_curve(p))
        new, t_new = timed(lambda p=problem: candidates.tucker2_candidates(p, SOLVE, np, MULTIPLE))
        totals += (svd, t_old, t_new)
        shape = "x".join(map(str, problem.conv_weight().shape))
        note = f"  (the old search raised ValueError at {failed} of 7 fractions)" if failed else ""
        print(f"{layer.name:18s} {shape:>16s} {svd:7.3f} {t_old:7.2f} {t_new:7.3f} {t_old / svd:7.0f} "
              f"{t_new / svd:7.1f}{note}")
        row = {"layer": layer.name, "shape": shape, "svd": svd, "old": t_old, "new": t_new,
               "old_failed": failed, "points": [list(c.rank) for c in new]}
        if args.converged:
            row["gaps"] = gaps(problem, new)
        rows.append(row)
    print(f"{'total':18s} {'':>16s} {totals[0]:7.2f} {totals[1]:7.1f} {totals[2]:7.2f} "
          f"{totals[1] / totals[0]:7.0f} {totals[2] / totals[0]:7.1f}")
    print(f"old / new Tucker-2 curves: {totals[1] / totals[2]:.1f}x")
    numbers["curves"] = {"layers": rows, "totals": {"svd": totals[0], "old": totals[1], "new": totals[2]}}
    if args.converged:
        summary = {}
        for key in ("proxy", "score", "old_proxy", "hosvd"):
            values = np.array([g[key] for row in rows for g in row["gaps"] if g.get(key) is not None])
            summary[key] = {"median": float(np.median(values)), "p90": float(np.percentile(values, 90)),
                            "max": float(values.max()), "min": float(values.min()), "points": len(values)}
        print("\nrelative gap above the converged error at each curve point "
              f"({summary['score']['points']} points):")
        for key, label in (("proxy", "proxy (surface, no sweep)"), ("score", "score (one sweep)  "),
                           ("old_proxy", "old proxy, same pair "), ("hosvd", "HOSVD basis alone   ")):
            s = summary[key]
            print(f"  {label}: median {s['median']:+.4f}, 90th percentile {s['p90']:+.4f}, "
                  f"max {s['max']:+.4f}, min {s['min']:+.4f}")
        numbers["gaps"] = summary


def gaps(problem, points):
    """Each point's proxy, score, the old proxy and the HOSVD-basis proxy over its converged error."""
    W, S = problem.conv_weight(), problem.fit_matrix(SOLVE)
    surface = problem.tucker2_surface(SOLVE, np)
    prob = Tucker2Problem(W, S)
    out = []
    for point in points:
        converged = tucker2(W, S, point.rank, init=point.start)
        truth = converged.error
        r_out, r_in = point.rank
        old = min(prob.output_step(u, r_out)[2] for u in (prob.hosvd_in(r_in), prob.data_in(r_out, r_in)))
        hosvd = prob.output_step(prob.hosvd_in(r_in), r_out)[2]
        out.append({"rank": [r_out, r_in], "converged": truth / converged.reference, "sweeps": converged.iterations,
                    "proxy": surface.error(r_out, r_in) / truth - 1,
                    "score": point.error * converged.reference / truth - 1,
                    "old_proxy": old / truth - 1, "hosvd": hosvd / truth - 1})
    return out


@contextlib.contextmanager
def curves_of(kind):
    """The curves a budget reads: "cheap" (as shipped), "converged", or "proxy only" (no sweep)."""
    if kind == "converged":
        with converged_curves():
            yield
    elif kind == "proxy only":
        sweeps = candidates.TUCKER2_CANDIDATE_SWEEPS
        candidates.TUCKER2_CANDIDATE_SWEEPS = 0
        try:
            yield
        finally:
            candidates.TUCKER2_CANDIDATE_SWEEPS = sweeps
    else:
        yield


@contextlib.contextmanager
def converged_curves():
    """Every Tucker-2 candidate scored by its converged error (the dense reference of the curves)."""
    cheap = candidates.tucker2_candidates

    def full(problem, solve, xp, multiple=None, fractions=candidates.TUCKER2_FRACTIONS):
        out = []
        for point in cheap(problem, solve, xp, multiple, fractions):
            if point.method is Method.TUCKER2:
                result = tucker2(problem.conv_weight(), problem.fit_matrix(solve), point.rank, init=point.start)
                point = candidates.Candidate(point.method, point.rank, point.params, point.macs,
                                             result.error / result.reference, start=result)
            out.append(point)
        return out

    saved = dict(candidates.CURVES), dict(candidates.REFINABLE)
    candidates.CURVES[Method.TUCKER2] = candidates.REFINABLE[Method.TUCKER2] = full
    candidates.CURVES[Method.AUTO] = lambda p, s, xp, m=None: candidates.svd_candidates(p, s, xp, m) + full(p, s, xp, m)
    try:
        yield
    finally:
        candidates.CURVES.update(saved[0])
        candidates.REFINABLE.update(saved[1])


def allocations(model, stats, validation, evaluate, fractions, name, numbers):
    print(f"\n{name}: compress(method='auto', target_macs=F, sensitivity='off'), these curves vs converged ones")
    rows = []
    for fraction in fractions:
        results = {}
        for kind in ("cheap", "converged", "proxy only"):
            with curves_of(kind):
                (compressed, report), seconds = timed(lambda f=fraction: onnxcomp.compress(
                    model, stats=stats, validation_data=validation, method="auto", target_macs=f,
                    sensitivity="off", progress=False, check_latency=False))
            objective = sum((row.relative_error or 0.0) ** 2 for row in report.layers)
            choices = {row.name: (row.method, tuple(row.rank)) for row in report.layers if row.method}
            results[kind] = {"seconds": seconds, "objective": objective, "choices": choices,
                             "achieved": report.settings["target"]["achieved"],
                             "standardized": report.fidelity.standardized, **evaluate(compressed)}
        cheap, full, proxy = results["cheap"], results["converged"], results["proxy only"]
        differ = sorted(k for k in set(cheap["choices"]) | set(full["choices"])
                        if cheap["choices"].get(k) != full["choices"].get(k))
        extra = "".join(f", {k} {cheap[k]:.4f} vs {full[k]:.4f}" for k in ("held_out_rel_l2", "accuracy") if k in cheap)
        print(f"  F={fraction}: objective {cheap['objective']:.5g} vs {full['objective']:.5g} "
              f"({cheap['objective'] / full['objective'] - 1:+.2%}; "
              f"proxy only {proxy['objective'] / full['objective'] - 1:+.2%})"
              f"; standardised error {cheap['standardized']:.4f} vs {full['standardized']:.4f} (proxy only "
              f"{proxy['standardized']:.4f}){extra}; MACs {cheap['achieved']:.4f} vs {full['achieved']:.4f}; "
              f"{len(differ)} of {len(cheap['choices'])} choices differ; "
              f"budget solve {cheap['seconds']:.0f} s vs {full['seconds']:.0f} s (proxy only {proxy['seconds']:.0f} s)")
        for k in differ:
            print(f"      {k}: {cheap['choices'].get(k)} vs {full['choices'].get(k)}")
        for r in results.values():
            r["choices"] = {k: [m, list(v)] for k, (m, v) in r["choices"].items()}
        rows.append({"fraction": fraction, **results, "differ": differ})
    numbers.setdefault("allocation", {})[name] = rows


def digits_allocations(numbers):
    model = onnxcomp.load_model(DIGITS / "digits_cnn.onnx")
    calibration = np.load(DIGITS / "calib.npz")["input"]
    held = np.load(DIGITS / "heldout.npz")
    validation = held_out_mask(len(calibration))
    stats = onnxcomp.calibrate(model, calibration[~validation], progress=False)
    reference = make_session(model).run(None, {"input": held["input"]})[0]

    def evaluate(compressed):
        logits = make_session(compressed).run(None, {"input": held["input"]})[0]
        error = output_errors([reference], [logits], ["logits"])["logits"]["relative_l2"]
        return {"held_out_rel_l2": float(error), "accuracy": float((logits.argmax(1) == held["labels"]).mean())}

    allocations(model, stats, calibration[validation], evaluate, (0.5, 0.75), "digits CNN", numbers)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=320)
    ap.add_argument("--layers", type=int, default=None, help="only the first N 3x3 convs (0: no curve timings)")
    ap.add_argument("--converged", action="store_true", help="solve every curve point to convergence: the gaps")
    ap.add_argument("--allocation", action="store_true", help="budgets with these curves vs converged curves")
    ap.add_argument("--stats", help="save the YOLO statistics here, or reuse them")
    ap.add_argument("--threads", type=int, default=None, help="BLAS threads (set before NumPy loads)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    numbers = {"threads": args.threads, "load_before": load_average()}
    model, shapes, stats = yolo(args)
    if args.layers != 0:
        curves(model, shapes, stats, args, numbers)
    if args.allocation:
        digits_allocations(numbers)
        validation = smooth_images(16, args.image_size, seed=2)
        allocations(model, stats, validation, lambda compressed: {}, (0.5, 0.75), "YOLOv8n-shaped", numbers)
    finish_benchmark(numbers, args.json)


if __name__ == "__main__":
    main()
