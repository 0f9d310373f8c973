"""model -> layers -> statistics -> solver -> rewrite -> compressed model + report."""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import asdict, replace

import numpy as np
import onnx
from tqdm.auto import tqdm

from . import graph
from .calibration.collect import collect_statistics
from .calibration.readers import count_samples, iter_feeds
from .calibration.stats import Statistics
from .costs import LatencyCost, MacCost, ParamCost, layer_positions
from .decompose.backend import get_backend
from .decompose.budget import Option, allocate
from .decompose.solve import CANDIDATES, REFINABLE, Decomposition, LayerProblem, Options, RankChoice, solve_layer
from .errors import OnnxcompError
from .evaluate import compare_outputs, execution_providers
from .latency import Timer, interleaved_ratio
from .passes import apply_decompositions
from .report import LayerRow, Report
from .sensitivity import layer_sensitivities


def compress(
    model,
    data=None,
    *,
    method: str = "svd",
    rank: int | None = None,
    keep: float | None = None,
    energy: float | None = None,
    evbmf: bool = False,
    rule: str = "energy",
    spectrum: str = "data",
    norm: str = "data",
    centered: bool = True,
    stats=None,
    skip=(),
    input_shapes=None,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = True,
    target_macs: float | None = None,
    target_params: float | None = None,
    target_latency: float | None = None,
    sensitivity: str = "auto",
    cp_form: str = "4way",
    rank_multiple: int | None = None,
    provider: str = "cpu",
    threads: int | None = None,
    latency_cache=None,
) -> tuple[onnx.ModelProto, Report]:
    """Compress the Conv/Gemm/MatMul layers of ``model``; returns ``(model, report)``.

    ``data``: calibration data (CalibrationDataReader, iterable of feed dicts or
    arrays, array, dict of arrays, .npy/.npz path). ``stats``: a
    :class:`Statistics` or a stats file from ``onnxcomp calibrate`` (then
    ``data`` is only used for the final output check). Exactly one of
    ``rank``, ``keep`` (fraction of each layer's MACs kept) and ``energy``
    (threshold of the ``rule`` on the ``spectrum``) picks the ranks, or a
    whole-model budget: ``target_macs`` / ``target_params`` /
    ``target_latency``, the fraction of the original model's MACs / params /
    onnxruntime latency (batch 1, measured on ``provider`` with ``threads``,
    cached per machine in ``latency_cache``) to end up with, allocated across
    layers; ``sensitivity`` ("auto", "on", "off") weights each layer's error by
    its measured effect on the model's outputs ("auto": only where that wins on
    the probe batch). ``rank_multiple``: budget candidates only at ranks that are
    multiples of it (default 8 for latency budgets: such ranks run faster).
    """
    model = graph.as_model(model)
    target = _target(target_macs, target_params, target_latency)
    _one_rank_rule(rank, keep, energy, evbmf or None, target)
    if rank_multiple is None and target and target[0] == "latency":
        rank_multiple = 8
    if rank_multiple is not None and (not isinstance(rank_multiple, int) or rank_multiple < 1):
        raise OnnxcompError(f"--rank-multiple must be a positive integer, got {rank_multiple!r}")
    ranks_ = RankChoice(rank, keep, energy, rule, spectrum, evbmf)
    options = Options(method, norm, centered, ranks_, cp_form, rank_multiple)
    timer = Timer(provider, threads)
    if target and target[0] == "latency":
        execution_providers(provider)  # fail before calibrating if the provider is missing
    user_shapes = _input_shapes(input_shapes)
    shapes = dict(user_shapes)  # for shape inference: per-sample shapes, batch 1
    feeds, first_batch = _peek(iter_feeds(data, model, batch_size=batch_size)) if data is not None else (None, None)
    if first_batch is not None:
        shapes = {**_per_sample_shapes(first_batch), **shapes}
    layers, skipped = graph.find_layers(model, shapes)
    chosen = [layer for layer in layers if not _matches(layer, skip)]
    if not chosen:
        raise OnnxcompError(_no_layers_message(layers, skipped))

    clock = _Clock()
    probe, samples = None, count_samples(data, model) if data is not None else None
    if target and first_batch is not None and sensitivity != "off":
        probe, held, feeds = _hold_out_probe(first_batch, feeds, stats)
        samples = samples - held if samples else samples
    statistics = _statistics(model, chosen, feeds, stats, norm, user_shapes, batch_size, progress, samples)
    clock.lap("calibration")
    xp = get_backend(device)
    problems = {layer.name: _problem(layer, statistics.get(layer.stats_key) if statistics else None) for layer in chosen}
    sample = None if first_batch is None else {k: v[:1] for k, v in first_batch.items()}
    budget = None
    if target:
        costs = _cost_model(target[0], model, chosen, problems, shapes, sample, timer, latency_cache, progress)
        plan_once = functools.partial(_budgeted_plan, model, chosen, problems, options, costs,
                                      probe=probe, sensitivity=sensitivity, xp=xp, progress=progress)
        budget, plan, rows = plan_once(target[1])
        if target[0] == "latency":
            budget, plan, rows = _close_latency_loop(model, plan_once, (budget, plan, rows), target[1], costs)
            _add_layer_latencies(rows, chosen, budget, costs)
    else:
        plan, rows = _solve_all(chosen, problems, options, None, xp, progress)
    rows += [LayerRow(layer.name, layer.op_type, layer.shape_text, "skipped: --skip", params_before=layer.params,
                      params_after=layer.params, macs_before=layer.macs(), macs_after=layer.macs())
             for layer in layers if layer not in chosen]
    rows += [LayerRow(s.name, s.op_type, "-", f"skipped: {s.reason}") for s in skipped]

    clock.lap("solve")
    compressed = apply_decompositions(model, plan)
    clock.lap("rewrite")
    output_error = compare_outputs(model, compressed, first_batch) if first_batch is not None else None
    clock.lap("check")
    settings = {k: v for k, v in asdict(options).items()}
    settings.update(device=device, calibration_samples=_samples(statistics))
    totals = _totals(model, compressed, shapes, sample, len(plan), len(layers))
    if target and target[0] == "latency":
        wall_ratio, before, after = interleaved_ratio(model, compressed, sample, timer)
        totals.update(latency_before=costs.total, latency_after=costs.total * budget["measured"],
                      latency_ratio=budget["measured"], latency_wall_before=before, latency_wall_after=after,
                      latency_wall_ratio=wall_ratio, latency_setting={"provider": provider, "threads": threads, "batch": 1})
        clock.lap("latency")
    if budget is not None:
        kind, fraction = target
        achieved = _achieved(kind, totals)
        settings["target"] = {"kind": kind, "fraction": fraction, "predicted": budget["predicted"],
                              "achieved": achieved, "feasible": budget["feasible"],
                              "sensitivity": budget.get("sensitivity")}
        if kind == "latency":
            settings["target"].update(rounds=budget["rounds"], timed=costs.table.measured)
    return compressed, Report(settings, rows, totals, output_error, clock.seconds)


def _cost_model(kind, model, layers, problems, shapes, sample, timer, latency_cache, progress):
    if kind == "macs":
        return MacCost(model, layers, problems, shapes, sample)
    if kind == "params":
        return ParamCost(model)
    return LatencyCost(model, layers, shapes, sample, timer, latency_cache, progress)


# A measured latency further than this (relative to the target) from the target gets one correction round.
LATENCY_RETRY = 0.03


def _close_latency_loop(model, plan_once, first, fraction, costs):
    """Measure the planned model; if it misses the target, re-plan once, aiming off by the miss.

    The prediction (in-model dense times, isolated chain/dense ratios) misses what the
    rewritten model does by a few percent (its chains fuse and cache differently); one
    re-allocation at ``fraction + (fraction - measured)`` corrects most of it. The round
    whose measurement is closer to the target is kept.
    """
    rounds = []
    best = None
    aim = fraction
    for _ in range(2):
        budget, plan, rows = first if best is None else plan_once(aim)
        if best is not None and budget["ranks"] == best[0]["ranks"]:
            break  # the allocation cannot move: nothing new to measure
        measured = costs.measure(apply_decompositions(model, plan))
        rounds.append({"aimed": aim, "predicted": budget["predicted"], "measured": measured})
        if best is None or abs(measured - fraction) < abs(best[0]["measured"] - fraction):
            best = ({**budget, "measured": measured}, plan, rows)
        if abs(measured - fraction) <= LATENCY_RETRY * fraction:
            break
        aim = min(1.0, max(0.01, aim + fraction - measured))
    best[0]["rounds"] = rounds
    return best


def _add_layer_latencies(rows, layers, budget, costs) -> None:
    """Each row's predicted latency before and after, from the (cached) table."""
    for row, layer in zip(rows, layers):
        candidate = budget["ranks"][layer.name]
        row.latency_before = costs.dense(layer)
        row.latency_after = row.latency_before if candidate is None else costs.of(layer, candidate)


def _budgeted_plan(model, layers, problems, options, costs, fraction, *, probe, sensitivity, xp, progress):
    """Allocate the budget, solve at the allocated ranks; with sensitivity, maybe re-allocate."""
    curves = {layer.name: CANDIDATES[options.method](problems[layer.name], options, xp) for layer in layers}
    refine = functools.partial(_refine_curves, layers, problems, options, xp, curves, costs)
    budget = _allocate(layers, curves, costs, fraction)
    budget = refine(budget, fraction)
    plan, rows = _solve_all(layers, problems, options, budget, xp, progress)
    if probe is not None:
        # Weight each layer's error by how much it moves the model's outputs; "auto" keeps
        # whichever allocation gives the smaller output error on the probe samples.
        probe, where = probe
        gains = layer_sensitivities(model, layers, probe)
        weighted = refine(_allocate(layers, curves, costs, fraction, gains), fraction, gains)
        note = {}
        if weighted["ranks"] != budget["ranks"]:
            weighted_plan, weighted_rows = _solve_all(layers, problems, options, weighted, xp, progress)
            errors = [_first_output_error(model, p, probe) for p in (plan, weighted_plan)]
            note = {"unweighted_error": errors[0], "weighted_error": errors[1]}
            if sensitivity == "on" or errors[1] <= errors[0]:
                budget, plan, rows = weighted, weighted_plan, weighted_rows
        budget["sensitivity"] = {**note, "weighted": budget is weighted, "probe": where,
                                 "gains": {k: round(v, 6) for k, v in gains.items()}}
    costs.save()
    return budget, plan, rows


# Refine the coarse Tucker-2/CP curves while more than this share of the model's cost is left unspent.
SPARE_TOLERANCE = 0.002


def _refine_curves(layers, problems, options, xp, curves, costs, budget, fraction, gains=None, rounds: int = 3):
    """Spend what coarse curves leave: the Tucker-2 and CP curves are sampled at a few MAC fractions,
    so the allocation can stop short of the budget (digits, Tucker-2 at 75%: 71.7%). Each round adds
    to every layer on such a curve the candidate its current cost plus the whole spare would buy
    (its solver's proxy error, like the other points), then allocates again."""
    for _ in range(rounds):
        spare = (fraction - budget["predicted"]) * costs.total
        if spare <= SPARE_TOLERANCE * costs.total:
            break
        added = 0
        for layer in layers:
            chosen = budget["ranks"][layer.name]
            if chosen is None or chosen.method not in REFINABLE:
                continue
            cost = costs.of(layer, chosen)
            reach = min(0.95, chosen.macs / layer.weight.size * (cost + spare) / cost)  # cost ~ linear in MACs
            known = {c.rank for c in curves[layer.name]}
            new = [c for c in REFINABLE[chosen.method](problems[layer.name], options, xp, fractions=(reach,))
                   if c.rank not in known]
            curves[layer.name].extend(new)
            added += len(new)
        if not added:
            break
        budget = _allocate(layers, curves, costs, fraction, gains)
    return budget


# Samples the sensitivity probe takes from the first calibration batch, kept out of the statistics.
PROBE_SAMPLES = 8


def _hold_out_probe(first_batch: dict, feeds, stats):
    """((probe feed, where it came from), samples held out, the feeds left for the statistics).

    The weighted and the unweighted allocation are compared on samples the statistics never
    saw (the first ``PROBE_SAMPLES`` of the first batch), so the comparison is a held-out one;
    with precomputed statistics every sample given is already outside them; a first batch too
    small to spare them is probed in-sample, and the report says so.
    """
    size = len(next(iter(first_batch.values())))
    probe = {k: v[:PROBE_SAMPLES] for k, v in first_batch.items()}
    if stats is not None:
        return (probe, "data given besides --stats"), 0, feeds
    if size < 2 * PROBE_SAMPLES:
        return (probe, "calibration samples (too few to hold out)"), 0, feeds
    next(feeds)  # the first batch again: it is replaced by its remainder
    rest = {k: v[PROBE_SAMPLES:] for k, v in first_batch.items()}
    return (probe, f"{PROBE_SAMPLES} samples held out of the statistics"), PROBE_SAMPLES, itertools.chain([rest], feeds)


def _achieved(kind: str, totals: dict) -> float | None:
    if kind == "latency":
        return totals["latency_ratio"]
    before = totals[f"{kind}_before"]
    return totals[f"{kind}_after"] / before if before else None


def calibrate(model, data, *, input_shapes=None, skip=(), batch_size: int = 32, progress: bool = True) -> Statistics:
    """Statistics of every compressible layer's input, to save and reuse with ``stats=``."""
    model = graph.as_model(model)
    shapes = _input_shapes(input_shapes)
    layers, skipped = graph.find_layers(model, shapes)
    layers = [layer for layer in layers if not _matches(layer, skip)]
    if not layers:
        raise OnnxcompError(_no_layers_message(layers, skipped))
    return collect_statistics(model, layers, data, input_shapes=shapes, batch_size=batch_size, progress=progress)


# ---------------------------------------------------------------- helpers


class _Clock:
    """Seconds spent in each stage, for the report."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 3)
        self._last = now


def _target(target_macs, target_params, target_latency=None):
    """("macs" | "params" | "latency", fraction) or None."""
    kinds = (("macs", target_macs), ("params", target_params), ("latency", target_latency))
    given = [(kind, v) for kind, v in kinds if v is not None]
    if len(given) > 1:
        raise OnnxcompError("give one budget: --target-macs, --target-params or --target-latency")
    if given and not 0 < given[0][1] <= 1:
        raise OnnxcompError(f"--target-{given[0][0]} must be a fraction in (0, 1], got {given[0][1]}")
    return given[0] if given else None


def _one_rank_rule(rank, keep, energy, evbmf, target) -> None:
    rules = (("rank", rank), ("keep", keep), ("energy", energy), ("evbmf", evbmf), ("target", target))
    given = [name for name, v in rules if v is not None]
    if len(given) != 1:
        raise OnnxcompError(
            "give exactly one rank rule: --rank N, --keep F, --energy TAU, --evbmf or a budget --target-macs/--target-params/--target-latency F"
            + (f" (got {', '.join(given)})" if given else "")
        )


def _input_shapes(specs) -> dict[str, list[int]]:
    """``["name:1,3,224,224"]`` (CLI form) or ``{"name": [1, 3, 224, 224]}``."""
    return graph.parse_input_shapes(specs) if isinstance(specs, (list, tuple)) else dict(specs or {})


def _peek(iterator):
    """The first item, and an iterator that still yields it."""
    try:
        first = next(iterator)
    except StopIteration:
        raise OnnxcompError("the calibration data is empty") from None
    return itertools.chain([first], iterator), first


def _per_sample_shapes(feed: dict) -> dict[str, list[int]]:
    """Input shapes with batch 1, so shape inference can count MACs per sample."""
    return {name: [1, *value.shape[1:]] for name, value in feed.items() if value.ndim >= 1}


def _matches(layer: graph.TargetLayer, skip) -> bool:
    return any(s == layer.name or s == layer.op_type for s in skip or ())


def _no_layers_message(layers, skipped) -> str:
    if layers:
        return "every compressible layer was excluded by --skip"
    reasons = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:3])
    return "no compressible layers (Conv/Gemm/MatMul with constant weights) in the model" + (
        f" ({reasons}{'; ...' if len(skipped) > 3 else ''})" if reasons else ""
    )


def _statistics(model, layers, feeds, stats, norm, shapes, batch_size, progress, samples=None) -> Statistics | None:
    if stats is not None:
        statistics = stats if isinstance(stats, Statistics) else Statistics.load(stats)
        missing = [layer.name for layer in layers if layer.stats_key not in statistics]
        if missing:
            raise OnnxcompError(
                f"the statistics file has no entry for {len(missing)} layer(s) of this model, e.g. {missing[0]!r}"
            )
        return statistics
    if feeds is None:
        if norm == "data":
            raise OnnxcompError("the data norm needs calibration data (--data) or statistics (--stats); or use --norm frobenius")
        return None
    return collect_statistics(model, layers, feeds, input_shapes=shapes, batch_size=batch_size, progress=progress,
                              total=samples)


def _solve_all(layers, problems, options: Options, budget, xp, progress) -> tuple[list, list]:
    """Decompose every layer (at its budgeted rank and method, if a budget decided)."""
    plan, rows = [], []
    for layer in tqdm(layers, desc="solve", unit="layer", disable=not progress):
        problem = problems[layer.name]
        if budget is None:
            result = solve_layer(problem, options, xp)
        elif budget["ranks"][layer.name] is None:
            result = "the budget keeps it dense"
        else:
            candidate = budget["ranks"][layer.name]
            layer_options = replace(options, method=candidate.method, ranks=RankChoice(rank=candidate.rank))
            result = solve_layer(problem, layer_options, xp)
        if isinstance(result, Decomposition):
            plan.append((layer, result))
        rows.append(_row(layer, result, problem.stats))
    return plan, rows


def _first_output_error(model, plan, feed) -> float:
    errors = compare_outputs(model, apply_decompositions(model, plan), feed)
    return next(iter(errors.values()))["relative_l2"]


def _allocate(layers, curves, costs, fraction: float, gains=None) -> dict:
    """Ranks per layer meeting a whole-model budget (the layers outside the plan cost what they cost)."""
    choices, dense_total = [], 0.0
    for layer in tqdm(layers, desc="costs", unit="layer", disable=not costs.progress):
        dense = costs.dense(layer)
        dense_total += dense
        weight = 1.0 if gains is None else gains[layer.name]
        choices.append([Option(dense, 0.0, None)]
                       + [Option(costs.of(layer, c), weight * c.error, c) for c in curves[layer.name]])
    total = costs.total
    budget = fraction * total - (total - dense_total)
    picked, feasible = allocate(choices, budget)
    ranks = {layer.name: options_[i].label for layer, options_, i in zip(layers, choices, picked)}
    spent = sum(options_[i].cost for options_, i in zip(choices, picked))
    return {"ranks": ranks, "predicted": (total - dense_total + spent) / total, "feasible": feasible}


def _problem(layer: graph.TargetLayer, stats) -> LayerProblem:
    if stats is not None and stats.dim != layer.in_features:
        raise OnnxcompError(
            f"statistics for layer {layer.name!r} have dimension {stats.dim}, the layer reads {layer.in_features}"
        )
    bias = None if layer.bias is None else layer.bias.astype(np.float64)
    # A strided conv's first 1x1 conv of a Tucker-2 chain runs at the input resolution.
    input_ratio = float(np.prod(layer.conv.strides)) if layer.conv is not None else 1.0
    return LayerProblem(layer.name, layer.weight.astype(np.float64), bias, layer.kernel, stats, input_ratio)


def _row(layer: graph.TargetLayer, result, stats) -> LayerRow:
    positions = layer_positions(layer, stats)
    macs_before = layer.macs(positions)
    if not isinstance(result, Decomposition):
        return LayerRow(layer.name, layer.op_type, layer.shape_text, f"kept: {result}",
                        params_before=layer.params, params_after=layer.params,
                        macs_before=macs_before, macs_after=macs_before)
    return LayerRow(
        layer.name, layer.op_type, layer.shape_text, "compressed", method=result.method,
        rank=list(result.rank), params_before=layer.params, params_after=result.params,
        macs_before=macs_before, macs_after=None if positions is None else result.macs * positions,
        relative_error=result.relative_error, seconds=result.info.get("seconds"),
        info={k: v for k, v in result.info.items() if k != "seconds"},
    )


def _samples(statistics) -> int | None:
    if not statistics:
        return None
    return max(s.samples for s in statistics.values())


def _totals(original, compressed, shapes, sample, compressed_layers: int, found: int) -> dict:
    return {
        "params_before": graph.count_params(original),
        "params_after": graph.count_params(compressed),
        "macs_before": graph.count_macs(original, shapes, sample),
        "macs_after": graph.count_macs(compressed, shapes, sample),
        "layers_compressed": compressed_layers,
        "layers_found": found,
    }
