"""model -> layers -> statistics -> solver -> rewrite -> compressed model + report.

Each stage lives in its own package (``model/``, ``calibration/``, ``decompose/``,
``budget/``, ``passes/``); this module only runs them in order and times them.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import replace

import numpy as np
import onnx

from .budget import Planning, make_costs, plan_budget
from .budget.candidates import rank_multiple_warnings
from .calibration.collect import collect_statistics
from .calibration.digests import DigestRecorder
from .calibration.holdout import (compare_with_statistics, held_out_count, split_validation, validation_besides_stats,
                                  validation_from)
from .calibration.quality import check_statistics
from .calibration.readers import count_samples, fixed_batch, iter_feeds, model_inputs
from .calibration.rowmask import resolve_row_mask
from .calibration.stats import Statistics
from .config import BudgetKind, CompressConfig, Norm, OutputSpec
from .decompose.backend import get_backend
from .decompose.solve import layer_problem, solve_layers
from .errors import OnnxcompError
from .judge import Judge, check_output_axes
from .model import NothingToCompress, as_model, find_layers, fingerprint, select_layers
from .model.denormals import flush_written
from .model.downstream import outputs_reached
from .model.opsets import onnx_opset
from .model.prepare import prepare_model
from .model.subgraphs import describe
from .passes import apply_solved, planned
from .reach import check_latency, guard_warnings, kept_fractions, predicted_chains
from .refit import SampleCapture, refit_biases
from .report import (Report, add_latency, data_warnings, judge_warnings, layer_rows, model_totals, nonfinite_warnings,
                     target_settings)
from .runtime import Timer, execution_providers
from .threads import available_memory, blas_threads, remote_map


def compress(model, data=None, config: CompressConfig | None = None, *, stats=None, validation_data=None,
             timer: Timer | None = None, **options) -> tuple[onnx.ModelProto, Report]:
    """Compress the Conv/Gemm/MatMul layers of ``model``; returns ``(model, report)``.

    ``data``: calibration data (CalibrationDataReader, iterable of feed dicts or arrays,
    array, dict of arrays, .npy/.npz path); a validation part of it (every 10th sample, 8 to
    64 of them) is held out of the statistics to judge candidates and the result, unless
    ``validation_data`` gives a separate set. ``stats``: a :class:`Statistics` or a stats
    file from ``onnxcomp calibrate`` (then ``data`` only judges). ``config``: a
    :class:`~onnxcomp.config.CompressConfig`, or instead its flat keyword ``options`` (the
    README's names: ``keep=0.5``, ``target_macs=0.5``, ``method="tucker2"``, ... see
    :meth:`CompressConfig.from_options`). ``timer``: how latency is measured (default:
    :class:`~onnxcomp.runtime.Timer` on the configured provider and threads).
    """
    if config is not None and options:
        raise OnnxcompError(f"give a config or keyword options, not both (got {sorted(options)})")
    config = config or CompressConfig.from_options(**options)
    if stats is not None and not isinstance(stats, (Statistics, str, os.PathLike)):
        raise OnnxcompError(f"stats must be a Statistics or the path of a statistics file, got {type(stats).__name__}")
    with blas_threads(1):  # parallel work is spread over threads by layer instead (onnxcomp.threads)
        return _compress(model, data, config, stats, validation_data, timer)


def _compress(model, data, config: CompressConfig, stats, validation_data, timer: Timer | None):
    latency = config.budget.latency if config.budget else config.latency
    timer = timer or Timer(latency.provider.value, latency.threads)
    latency_budget = config.budget is not None and config.budget.kind is BudgetKind.LATENCY
    if latency_budget or (config.check_latency and data is not None):
        execution_providers(latency.provider.value)  # fail before calibrating if the provider is missing
    given = as_model(model)
    prepared = prepare_model(given, config.initializer_inputs, config.batch_axes)
    model = prepared.model
    config, opset_notes = _for_opset(config, model)
    if config.refit_bias:
        _check_refit(data, stats, model)
    run = _Run(model, data, stats, config.input_shapes, config.skip, config.batch_size, config.progress,
               validation_data, row_mask=config.row_mask, threads=config.threads,
               drop_padding_rows=config.drop_padding_rows, precision=config.precision.value,
               nothing_ok=not config.fail_if_unchanged, capture=config.refit_bias, ray=config.ray,
               device=config.device.value)
    if not run.chosen:
        return _unchanged(given, run, config, prepared)
    check_output_axes(config.outputs, declared_ranks(model))  # before any work, where the graph tells
    multiple_notes = rank_multiple_warnings(config.budget.rank_multiple if config.budget else None, run.chosen)
    clock = _Clock()
    statistics = run.statistics(config.solve.norm)
    if not run.keep_unseen(statistics):
        return _unchanged(given, run, config, prepared)
    statistics_notes = check_statistics(statistics, run.chosen)  # before the solve: constant data is refused
    clock.lap("calibration")
    judge = run.judge(config.outputs, config.metric, statistics)
    problems = {layer.name: layer_problem(layer, statistics.of_layer(layer) if statistics else None)
                for layer in run.chosen}
    with remote_map(_remote_solves(config)):
        allocation, solved = _solve(run, config, problems, timer, judge)
    clock.lap("solve")
    compressed = apply_solved(model, run.chosen, solved)
    refit_notes = []
    plan = planned(run.chosen, solved)
    if config.refit_bias and plan:
        clock.lap("rewrite")
        refit = refit_biases(model, run.chosen, plan, run.capture.kept, compressed, judge, config.threads)
        compressed, refit_notes = refit.model, [refit.note()]
        clock.lap("refit_bias")
    compressed, denormals = flush_written(model, compressed, config.flush_denormals)
    clock.lap("rewrite")
    fidelity = judge.fidelity(compressed) if judge is not None else None
    clock.lap("check")
    compressed_layers = sum(not isinstance(result, str) for result in solved.values())
    totals = model_totals(model, compressed, run.shapes, run.sample, compressed_layers, len(run.layers))
    totals["denormals"] = denormals
    settings = {**config.settings(), "calibration_samples": _samples(statistics),
                "row_mask": _mask_settings(run.row_mask, statistics)}
    if judge is not None:
        settings["output_semantics"] = [meaning.to_dict() for meaning in judge.semantics.values()]
    if judge is not None and (judge.metric.name != "fidelity" or allocation is not None and allocation.search):
        settings["metric"] = judge.metric.name
        settings["scores"] = {"original": judge.original_score, "compressed": judge.metric.score(judge, compressed)}
    rows = layer_rows(run.layers, run.chosen, run.skipped, problems, solved, allocation, run.not_chosen)
    measured = None
    if run.sample is not None and (config.check_latency or latency_budget):
        measured = check_latency(timer, model, compressed, run.layers, kept_fractions(rows), run.timing_feed,
                                 run.first_batch, predicted_chains(allocation), strict=latency_budget)
        clock.lap("latency")
    if allocation is not None:
        settings["target"] = target_settings(config.budget, allocation, totals)
        if latency_budget:
            add_latency(totals, settings["target"], allocation, measured, latency)
    warnings = [*prepared.notes, *opset_notes, *multiple_notes, *refit_notes, *statistics_notes,
                *data_warnings(problems, solved, statistics, config.budget is not None, judge),
                *judge_warnings(judge, config.budget.max_drop if config.budget else None),
                *nonfinite_warnings(fidelity), *guard_warnings(measured)]
    return prepared.restore(compressed), Report(settings, rows, totals, fidelity, clock.seconds, warnings, measured)


# Float64 copies of a layer's d x d second moment alive at once between calibration and its solve
# (the sums, the statistics, the solver's eigen form and workspace).
MEMORY_COPIES = 6

# Below this opset onnxruntime has no Add kernel, which the bias correction of a MatMul chain needs.
FIRST_ADD_OPSET = 7


def _for_opset(config: CompressConfig, model: onnx.ModelProto) -> tuple[CompressConfig, list[str]]:
    """The config the model's opset can carry out: below opset 7 the fit is uncentered (its optimum
    needs no bias change, so no Add node), with a warning."""
    opset = onnx_opset(model)
    if opset >= FIRST_ADD_OPSET or not config.solve.centered or config.solve.norm is not Norm.DATA:
        return config, []
    note = (f"opset {opset}: the layers are fitted uncentered (as with --uncentered): the mean correction of a "
            f"MatMul chain's bias needs an Add node, which onnxruntime runs from opset {FIRST_ADD_OPSET} on")
    return replace(config, solve=replace(config.solve, centered=False)), [note]


def _remote_solves(config: CompressConfig):
    """Where the layers are solved: a Ray cluster's workers with ``ray`` (solved on the CPU), else
    local threads (None)."""
    if config.ray is None or config.device.value != "cpu":
        return None
    from .calibration.distributed import ray_mapper

    return ray_mapper(config.ray)


def _check_refit(data, stats, model: onnx.ModelProto) -> None:
    """Bias re-estimation measures the compressed model on calibration samples: before any work, say
    when it cannot."""
    if stats is not None or data is None:
        raise OnnxcompError("refit_bias (--refit-bias) measures the compressed model on the calibration data: give "
                            "it with --data, not --stats")
    opset = onnx_opset(model)
    if opset < FIRST_ADD_OPSET:
        raise OnnxcompError(f"refit_bias (--refit-bias) needs opset {FIRST_ADD_OPSET} or later (a MatMul chain's bias "
                            f"is an Add node); the model's is {opset}")


def _unchanged(given: onnx.ModelProto, run: "_Run", config: CompressConfig, prepared) -> tuple:
    """No layer to compress: the model as given (a copy), and a report that says why. A pipeline
    over many models must not stop at one whose layers are all depthwise."""
    copy = onnx.ModelProto()
    copy.CopyFrom(given)
    rows = layer_rows(run.layers, [], run.skipped, {}, {}, None, run.not_chosen)
    totals = model_totals(run.model, run.model, run.shapes, run.sample, 0, len(run.layers))
    warning = (f"{run.nothing}: the model is written unchanged (fail_if_unchanged=True / --fail-if-unchanged "
               "makes this an error)")
    return copy, Report(config.settings(), rows, totals, None, {}, [*prepared.notes, warning])


def calibrate(model, data, *, input_shapes=None, skip=(), batch_size: int = 32, progress: bool = True,
              row_mask: str | None = "auto", threads: int | None = None, drop_padding_rows: bool = False,
              precision: str = "float32", initializer_inputs: str = "constant", batch_axes=None,
              ray: str | None = None) -> Statistics:
    """Statistics of every compressible layer's input (every sample: nothing is held out), to save
    and reuse with ``stats=``. ``row_mask``, ``threads``, ``drop_padding_rows``, ``precision`` (of the
    products: "float32" or "float64"), ``initializer_inputs``, ``batch_axes``, ``ray``: as :func:`compress`'s."""
    config = CompressConfig.from_options(input_shapes=input_shapes, rank=1, skip=skip, batch_size=batch_size,
                                         row_mask=row_mask, threads=threads, precision=precision,
                                         initializer_inputs=initializer_inputs, batch_axes=batch_axes, ray=ray)
    with blas_threads(1):  # parallel work is spread over threads by layer instead (onnxcomp.threads)
        working = prepare_model(as_model(model), initializer_inputs, config.batch_axes).model
        run = _Run(working, data, None, config.input_shapes, config.skip, batch_size, progress, hold_out=False,
                   row_mask=row_mask, threads=config.threads, drop_padding_rows=drop_padding_rows,
                   precision=config.precision.value, ray=config.ray)
        return run.statistics(Norm.DATA)


class _Run:
    """The model's layers and the calibration data, read once: what every stage starts from."""

    def __init__(self, model: onnx.ModelProto, data, stats, input_shapes: dict, skip, batch_size: int,
                 progress: bool, validation_data=None, hold_out: bool = True, row_mask: str | None = None,
                 threads: int | None = None, drop_padding_rows: bool = False, precision: str = "float32",
                 nothing_ok: bool = False, capture: bool = False, ray: str | None = None, device: str = "cpu"):
        self.model, self.data, self.stats, self.threads = model, data, stats, threads
        self.nothing_ok, self.ray = nothing_ok, ray
        # Where calibration's Gram products run: on the GPU with --device cuda (CuPy), else the host.
        products = get_backend(device) if device != "cpu" else None
        self.products_xp = None if products is None or products is np else products
        self.not_chosen: dict[str, str] = {}  # layer name -> why it was left out after all (default: --skip)
        self.row_mask = resolve_row_mask(model, row_mask)
        self.drop_padding_rows = drop_padding_rows
        self.precision = precision
        self.input_shapes, self.batch_size, self.progress = input_shapes, batch_size, progress
        self.feeds = self.first_batch = None
        if data is not None:
            self.feeds = iter_feeds(data, model, batch_size=batch_size)
            self.first_batch = next(self.feeds, None)
            if self.first_batch is None:
                raise OnnxcompError("the calibration data is empty")
            self.feeds = itertools.chain([self.first_batch], self.feeds)
        self.total = count_samples(data, model) if data is not None else None
        self.validation = None
        if validation_data is not None:
            self.validation = validation_from(validation_data, model, batch_size)
        elif self.feeds is not None and stats is not None:
            self.validation = validation_besides_stats(self.feeds)
        elif self.feeds is not None and hold_out:
            self.validation, self.feeds = split_validation(self.feeds, self.total)
        # The first samples the statistics see, kept for bias re-estimation (``capture``).
        self.capture = SampleCapture(self.feeds) if capture and self.feeds is not None else None
        if self.capture is not None:
            self.feeds = self.capture
        # One sample of the data (else of the validation samples): per-sample shapes for shape
        # inference and MAC counting, and the feed latency is measured on.
        example = self.first_batch or (self.validation.parts[0] if self.validation and self.validation.parts else {})
        per_sample = {name: [1, *value.shape[1:]] for name, value in example.items() if value.ndim}
        self.shapes = {**per_sample, **input_shapes}
        self.sample = {k: v[:1] for k, v in example.items()} or None
        # What latency is measured on: one sample, or the batch a fixed-batch model takes.
        self.timing_feed = example if fixed_batch(model_inputs(model)) else self.sample
        self.layers, self.skipped = find_layers(model, self.shapes)
        _refuse_rows_across_samples(model, self.layers)
        self.nothing = None  # why no layer can be compressed (``nothing_ok``: then nothing is chosen)
        try:
            self.chosen = select_layers(self.layers, self.skipped, skip)
        except NothingToCompress as nothing:
            if not nothing_ok:
                raise
            self.chosen, self.nothing = [], str(nothing)
        self._leave_out_too_wide()

    def _leave_out_too_wide(self) -> None:
        """Keep dense the layers whose input rows are so long that their statistics and solve would
        not fit in memory (a VGG's 25088-wide classifier: 5 GB per copy of its second moment)."""
        budget = available_memory() / 2
        for layer in self.chosen:
            need = MEMORY_COPIES * 8 * layer.in_features ** 2 / layer.groups
            if need > budget:
                self.not_chosen[layer.name] = (f"input rows of {layer.in_features} values: its statistics and solve "
                                               f"would need about {_size(need)}, more than half of the "
                                               f"{_size(2 * budget)} of memory here")
        if self.not_chosen:
            self.chosen = [layer for layer in self.chosen if layer.name not in self.not_chosen]
            if not self.chosen and self.nothing is None:
                self.nothing = "every compressible layer is too wide for this machine's memory"
                if not self.nothing_ok:
                    raise OnnxcompError(self.nothing)

    def keep_unseen(self, statistics: Statistics | None) -> bool:
        """Leave dense the layers that the calibration data never reached (a branch of an If that no
        sample took: no statistics to fit them to), with why; False when no layer is left."""
        if statistics is None:
            return True
        unseen = [layer for layer in self.chosen
                  if layer.scope and any(statistics[key].rows == 0 for key in layer.stats_keys)]
        for layer in unseen:
            self.not_chosen[layer.name] = (f"inside {describe(layer.scope)}, which no calibration sample ran "
                                           "(no statistics to fit it to)")
        self.chosen = [layer for layer in self.chosen if layer not in unseen]
        if not self.chosen:
            self.nothing = "no compressible layer ran on the calibration data"
            if not self.nothing_ok:
                raise OnnxcompError(f"{self.nothing} (every one is inside a body no sample ran)")
        return bool(self.chosen)

    def judge(self, outputs, metric, statistics: Statistics | None) -> Judge | None:
        """The judge of candidate models, on the validation samples (None: no data given), held
        out only if none of its samples is among those ``statistics`` saw."""
        validation = self.validation
        if validation is None or not validation.samples:
            return None
        compare_with_statistics(validation, statistics)
        mask = self.row_mask.input if self.row_mask else None
        validation.row_mask = mask
        return Judge(self.model, validation.feed, validation.source, validation.held_out,
                     list(outputs) or self._changing_outputs(), self.batch_size, metric, mask, self.threads)

    def _changing_outputs(self) -> list[OutputSpec]:
        """Without ``--outputs``: the outputs a compressed layer can change, each weighing 1 (the
        others, which stay exact, weigh 0); empty when that is every output."""
        names = [o.name for o in self.model.graph.output]
        changing = outputs_reached(self.model, [layer.output for layer in self.chosen])
        if not changing or len(changing) == len(names):
            return []
        return [OutputSpec(name, 1.0 if name in changing else 0.0) for name in names]

    def statistics(self, norm: Norm) -> Statistics | None:
        if self.stats is not None:
            statistics = self.stats if isinstance(self.stats, Statistics) else Statistics.load(self.stats)
            statistics.check_model(fingerprint(self.model), "the statistics given with --stats")
            missing = [layer.name for layer in self.chosen if any(key not in statistics for key in layer.stats_keys)]
            if missing:
                raise OnnxcompError(
                    f"the statistics file has no entry for {len(missing)} layer(s) of this model, e.g. {missing[0]!r}")
            return statistics
        if self.feeds is None:
            if norm is Norm.DATA:
                raise OnnxcompError(
                    "the data norm needs calibration data (--data) or statistics (--stats); or use --norm frobenius")
            return None
        total = self.total
        if total and self.validation is not None and self.validation.held_out:
            total -= held_out_count(total)
        recorder = DigestRecorder()  # which samples the statistics saw: see calibration/digests.py
        statistics = collect_statistics(self.model, self.chosen, recorder.passing(self.feeds),
                                        input_shapes=self.input_shapes, batch_size=self.batch_size,
                                        progress=self.progress, total=total,
                                        row_mask=self.row_mask if self.drop_padding_rows else None,
                                        threads=self.threads, precision=self.precision, laid_out=True,
                                        ray=self.ray, products_xp=self.products_xp)
        statistics.digests = recorder.digests
        return statistics


def declared_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Output name -> rank, for the tensor outputs whose shape the graph declares."""
    return {o.name: len(o.type.tensor_type.shape.dim) for o in model.graph.output
            if o.type.HasField("tensor_type") and o.type.tensor_type.HasField("shape")}


def _refuse_rows_across_samples(model: onnx.ModelProto, layers) -> None:
    """A Gemm with transA=1 reading a model input takes its rows along the input's axis 1, but the
    working model takes that input's samples along axis 0 (its features, here): holding samples
    out would cut the rows short. Say which axis holds the samples instead."""
    inputs = {i.name for i in model.graph.input}
    for layer in layers:
        if layer.trans_a and layer.input in inputs:
            raise OnnxcompError(
                f"layer {layer.name!r} (Gemm, transA=1) reads its rows along axis 1 of input {layer.input!r}, but "
                f"its samples are taken along axis 0 (the model does not say otherwise): give --batch-axis "
                f"{layer.input}:1 (and the output's, e.g. --batch-axis {layer.output}:0)")


def _solve(run: _Run, config: CompressConfig, problems: dict, timer: Timer, judge: Judge | None):
    """(the budget's allocation or None, each layer solved)."""
    xp = get_backend(config.device.value)
    if config.budget is None:
        plan = {layer.name: (config.solve, None) for layer in run.chosen}
        return None, solve_layers(problems, plan, xp, config.progress, config.threads)
    costs = make_costs(config.budget, run.model, run.chosen, problems, run.shapes, run.sample, timer, config.progress)
    planning = Planning(run.model, run.chosen, problems, config.solve, costs, xp, config.progress, judge,
                        config.threads)
    return plan_budget(config.budget, planning)


class _Clock:
    """Seconds spent in each stage, for the report."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self._last, 3)  # a stage may lap twice
        self._last = now


def _mask_settings(row_mask, statistics) -> dict | None:
    """The report's ``row_mask``: the mask, and what the statistics did with its padding rows."""
    if statistics is not None and statistics.row_mask:
        return {**statistics.row_mask, "padding_rows": "dropped"}
    return None if row_mask is None else {"input": row_mask.input, "how": row_mask.how, "padding_rows": "kept"}


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MB"


def _samples(statistics) -> int | None:
    return max(s.samples for s in statistics.values()) if statistics else None
