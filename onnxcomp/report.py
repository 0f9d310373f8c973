"""What was compressed, what it saved, what it cost: a table for people, JSON for tools."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .calibration.holdout import VALIDATION_MIN
from .config import BudgetKind
from .io import columns, write_json
from .judge import Fidelity
from .model import count_macs, count_params
from .model.blocks import block_index, block_role
from .model.semantics import OutputSemantics
from .reach import LatencyCheck, uniform_floor


@dataclass
class LayerRow:
    name: str
    op: str
    shape: str  # Conv: C_out x C_in x kh x kw; Gemm/MatMul: in x out
    status: str  # "compressed", "kept: <why>", "skipped: <why>"
    method: str | None = None
    rank: list[int] | None = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None  # per sample
    macs_after: int | None = None
    relative_error: float | None = None  # sqrt(output error / output variance) on calibration data
    seconds: float | None = None
    latency_before: float | None = None  # seconds at batch 1, from the latency table (--target-latency)
    latency_after: float | None = None
    measured_before: float | None = None  # seconds at batch 1, profiled in place in the original (latency check)
    measured_after: float | None = None  # the same for its chain in the compressed model
    flag: str | None = None  # the latency guard: why this chain is slower than it should be
    info: dict = field(default_factory=dict)


@dataclass
class Report:
    settings: dict
    layers: list[LayerRow]
    totals: dict  # params / macs of the whole model, before and after
    fidelity: Fidelity | None = None  # compressed vs original on the validation samples (None: no data)
    seconds: dict = field(default_factory=dict)  # time per stage: calibration, solve, rewrite, check
    warnings: list[str] = field(default_factory=list)  # what the user should know before trusting the result
    latency: LatencyCheck | None = None  # the result measured after writing (None: no data, or not asked)

    def __post_init__(self):
        check = self.latency
        if check is None or not check.shares:
            return
        for row in self.layers:
            row.measured_before = check.shares[0].layers.get(row.name)
            row.measured_after = check.after.get(row.name)
            row.flag = check.layers[row.name].flag if row.name in check.layers else None

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "totals": self.totals,
            "fidelity": None if self.fidelity is None else self.fidelity.to_dict(),
            "latency": None if self.latency is None else self.latency.to_dict(),
            "warnings": self.warnings,
            "seconds": self.seconds,
            "layers": [asdict(row) for row in self.layers],
            "blocks": self.blocks(),
        }

    def blocks(self) -> dict | None:
        """Where the budget went in a transformer: MACs before/after and the relative errors per
        part of a block (attention q/k/v/out, MLP up/down) and per block; None when the layer
        names do not say (fewer than two parts recognised, or under half of the MACs)."""
        rows = [row for row in self.layers if row.macs_before and row.macs_after is not None]
        roles = {row.name: block_role(row.name) for row in rows}
        known = sum(row.macs_before for row in rows if roles[row.name] != "other")
        if len(set(roles.values()) - {"other"}) < 2 or known * 2 < sum(row.macs_before for row in rows):
            return None
        return {"roles": _grouped(rows, lambda row: roles[row.name]),
                "blocks": _grouped(rows, lambda row: _or_other(block_index(row.name)))}

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as JSON, atomically."""
        write_json(path, self.to_dict(), "report")

    def table(self) -> str:
        predicted = any(row.latency_before is not None for row in self.layers)
        measured = any(row.measured_before is not None for row in self.layers)
        header = ("layer", "op", "shape", "method", "rank", "params", "MACs") + (("ms pred.",) if predicted else ()) + (
            ("ms b1",) if measured else ()) + ("rel.err", "status")
        rows = [header]
        for row in self.layers:
            rows.append((
                _short(row.name, 28), row.op, row.shape, row.method or "-",
                "x".join(map(str, row.rank)) if row.rank else "-",
                f"{_count(row.params_before)}->{_count(row.params_after)}",
                f"{_count(row.macs_before)}->{_count(row.macs_after)}",
                *((_ms(row.latency_before, row.latency_after),) if predicted else ()),
                *((_ms(row.measured_before, row.measured_after),) if measured else ()),
                "-" if row.relative_error is None else f"{row.relative_error:.4f}",
                row.status + (f" SLOW: {row.flag}" if row.flag else ""),
            ))
        lines = columns(rows, rule=True)
        lines.append("")
        lines.extend(self.summary_lines())
        return "\n".join(lines)

    def summary_lines(self) -> list[str]:
        t = self.totals
        lines = [
            f"model params: {_change(t['params_before'], t['params_after'])}",
            f"model MACs per sample: {_change(t['macs_before'], t['macs_after'])}",
            f"layers compressed: {t['layers_compressed']} of {t['layers_found']}",
        ]
        if t.get("latency_before") is not None:
            setting = t.get("latency_setting", {})
            threads = setting.get("threads") or "default"
            lines.append(
                f"model latency (onnxruntime {setting.get('provider', 'cpu')}, threads {threads}, batch 1), "
                f"summed fastest node times: {t['latency_before'] * 1e3:.3g} ms -> {t['latency_after'] * 1e3:.3g} ms "
                f"({t['latency_ratio']:.1%}); whole runs, interleaved: {t['latency_wall_before'] * 1e3:.3g} ms -> "
                f"{t['latency_wall_after'] * 1e3:.3g} ms ({t['latency_wall_ratio']:.1%})"
            )
        lines += _row_mask_lines(self.settings.get("row_mask"))
        lines += _block_lines(self.blocks())
        lines += _denormal_lines(t.get("denormals"))
        lines += _reach_lines(self.latency)
        target = self.settings.get("target")
        if target:
            achieved = "?" if target["achieved"] is None else f"{target['achieved']:.1%}"
            lines.append(
                f"budget: {target['fraction']:.1%} of the model's {target['kind']}, "
                f"predicted {target['predicted']:.1%}, achieved {achieved}"
                + ("" if target["feasible"] else " (not reachable: the closest feasible point)")
                + (" (ranks at any value: multiples of "
                   f"{self.settings['rank_multiple']} could not meet it)" if target.get("rank_multiple") is None
                   and self.settings.get("rank_multiple") and target["kind"] == "macs" else "")
                + _rounds_note(target.get("rounds"))
            )
            if target.get("search"):
                lines.append(_search_line(target["search"]))
        if self.seconds:
            lines.append("time: " + ", ".join(f"{stage} {s:.2f}s" for stage, s in self.seconds.items()))
        lines += _fidelity_lines(self.fidelity, changed=bool(t["layers_found"]))
        lines += [f"  judged as: {OutputSemantics(**meaning).line()}" for meaning in self.settings.get("output_semantics", ())]
        scores = self.settings.get("scores")
        if scores:
            original, compressed = scores["original"] + 0.0, scores["compressed"] + 0.0  # no "-0"
            lines.append(f"metric {self.settings['metric']}: original {original:.4g}, compressed {compressed:.4g} "
                         f"(drop {original - compressed:.4g})")
        lines += [f"warning: {warning}" for warning in self.warnings]
        return lines


def _or_other(index: int | None) -> str:
    return "other" if index is None else str(index)


def _grouped(rows: list[LayerRow], key) -> dict:
    groups: dict = {}
    for row in rows:
        group = groups.setdefault(str(key(row)), {"layers": 0, "macs_before": 0, "macs_after": 0, "errors": []})
        group["layers"] += 1
        group["macs_before"] += row.macs_before
        group["macs_after"] += row.macs_after
        if row.relative_error is not None:
            group["errors"].append(row.relative_error)
    for group in groups.values():
        errors = group.pop("errors")
        group["kept"] = group["macs_after"] / group["macs_before"]
        group["max_relative_error"] = max(errors) if errors else None
    return groups


def _block_lines(blocks: dict | None) -> list[str]:
    if not blocks:
        return []

    def part(name, group):
        error = group["max_relative_error"]
        return f"{name} {group['kept']:.0%}" + ("" if error is None else f" (err <= {error:.3f})")

    return ["MACs kept per part of the transformer blocks: "
            + ", ".join(part(name, group) for name, group in blocks["roles"].items()),
            "MACs kept per block: " + ", ".join(part(name, group) for name, group in blocks["blocks"].items())]


def _row_mask_lines(mask: dict | None) -> list[str]:
    if not mask:
        return []
    if mask["padding_rows"] == "kept":
        return [f"row mask: {mask['input']} ({mask['how']}): padding rows kept in the statistics "
                "(--drop-padding-rows leaves them out), left out of the comparisons"]
    kept = mask["rows_kept"] / mask["rows_seen"] if mask["rows_seen"] else 0.0
    return [f"row mask: {mask['input']} ({mask['how']}): statistics of {mask['layer_inputs']} token-layout layer "
            f"input(s) from {kept:.1%} of their rows (padding left out)"]


def _denormal_lines(denormals: dict | None) -> list[str]:
    """Subnormal weights: what the original held, what the written model holds, what was flushed."""
    if not denormals or not denormals["original"]["values"] and not denormals["compressed"]["values"]:
        return []
    original, left, flushed = denormals["original"], denormals["compressed"], denormals["flushed"]
    line = (f"subnormal (denormal) weights: {original['values']} in the original ({original['tensors']} tensors), "
            f"none in the factors written")
    if flushed is not None:
        return [line + f"; --flush-denormals set {flushed['values']} in the layers left alone to 0"]
    return [line + f"; {left['values']} left in the layers left alone ({left['tensors']} tensors): CPUs without "
            "fast subnormal arithmetic run them slowly; --flush-denormals sets them to 0 (`onnxcomp bench` "
            "measures what that buys)"]


def _reach_lines(check: LatencyCheck | None) -> list[str]:
    """Where the time goes, the Amdahl floor of this compression, the measured ratio, the guard's flags."""
    if check is None or not check.shares or not check.shares[0].layers:
        return []
    setting = f"onnxruntime {check.provider}, threads {check.threads or 'default'}"
    shares = "; ".join(f"batch {s.batch}: {s.share:.1%} of {s.seconds * 1e3:.3g} ms" for s in check.shares)
    floors = ", ".join(f"batch {s.batch} {s.floor(check.kept):.3f}" for s in check.shares)
    lines = [f"time in the layers onnxcomp can rewrite ({setting}, profiled in place): {shares}",
             f"Amdahl floor of this compression (untouched time + each layer's time x its MACs kept): {floors}"
             + ("" if check.ratio is None else f"; measured at batch {check.shares[0].batch}: {check.ratio:.3f} "
                "(whole runs, interleaved)")]
    if not check.kept:
        first = check.shares[0]
        lines[-1] = (f"Amdahl floor if every rewritable layer kept F of its MACs (batch {first.batch}): "
                     + ", ".join(f"F={f:g}: {uniform_floor(first, f):.3f}" for f in (0.75, 0.5, 0.25)))
    excess = sorted(check.excess().items(), key=lambda item: -item[1])
    if excess:
        top = ", ".join(f"{name} {seconds * 1e3:+.3g} ms" for name, seconds in excess[:3] if seconds > 0)
        lines.append(f"the rewritten chains take {sum(s for _, s in excess) * 1e3:+.3g} ms beyond their MACs' share of "
                     f"the dense layers' time at batch {check.shares[0].batch} (what separates the floor from the "
                     "profiled time)" + (f"; most: {top}" if top else ""))
    for flagged in check.flagged:
        lines.append(f"latency guard: {flagged.name}: chain {flagged.chain * 1e3:.3g} ms, dense "
                     f"{flagged.dense * 1e3:.3g} ms"
                     + ("" if flagged.predicted is None else f", predicted {flagged.predicted * 1e3:.3g} ms")
                     + f": {flagged.flag}")
    return lines


def _search_line(search: dict) -> str:
    """--max-drop: what the search tried."""
    tried = ", ".join(f"{t['fraction']:.1%}: {t['loss']:.3g}" for t in search["trials"])
    return (f"search: the smallest fraction whose {search['metric']} drop stays within {search['max_drop']:g} "
            f"is {search['fraction']:.1%} (fraction tried: drop = {tried})")


# How the fidelity line labels its samples: held out of the statistics, among them, or nobody can tell.
HELD_OUT_LABELS = {True: "held-out", False: "IN-SAMPLE", None: "NOT KNOWN TO BE HELD OUT"}


def _fidelity_lines(fidelity: Fidelity | None, changed: bool = True) -> list[str]:
    """The judge's verdict, labelled with where its samples came from (held-out or in-sample)."""
    if fidelity is None:
        return ["fidelity: not measured (" + ("no data given)" if changed else "the model is unchanged)")]
    where = HELD_OUT_LABELS[fidelity.held_out] + f", {fidelity.source}"
    agreement = "" if fidelity.top1_agreement is None else f", top-1 agreement {fidelity.top1_agreement:.1%}"
    lines = [f"fidelity ({where}): standardised error {fidelity.standardized:.4g}{agreement}"]
    for name, err in fidelity.outputs.items():
        lines.append(f"  output {name!r}: standardised error {err['standardized']:.4g}, relative L2 "
                     f"{err['relative_l2']:.4g}, cosine {err['cosine']:.6f}, max abs {err['max_abs']:.4g}")
    return lines


# Fewer calibration samples than this behind a data-aware fit deserve a warning.
FEW_SAMPLES = 32


def data_warnings(problems: dict, solved: dict, statistics, budget: bool, judge) -> list[str]:
    """Warnings about the data behind the result: too few samples, rank-deficient statistics, in-sample judging."""
    warnings = []
    samples = max((s.samples for s in statistics.values()), default=0) if statistics else None
    if samples is not None and samples < FEW_SAMPLES:
        warnings.append(f"only {samples} calibration sample(s) behind the statistics"
                        f"{' of a whole-model budget' if budget else ''}: the fit can follow these samples "
                        f"and not the data the model will see; give {FEW_SAMPLES} or more (a few hundred for "
                        "large models)")
    short = [(name, p.stats.rows, p.weight.shape[1]) for name, p in problems.items()
             if p.stats is not None and p.stats.rows < p.weight.shape[1] and not isinstance(solved.get(name), str)]
    if short:
        name, rows, dim = short[0]
        warnings.append(f"{len(short)} compressed layer(s) have fewer statistics rows than input dimensions (e.g. "
                        f"{name!r}: {rows} rows for {dim} dimensions): their covariance is rank-deficient, and the "
                        "fit can match the calibration samples exactly and generalise badly; give more data")
    if judge is not None and judge.held_out is False:
        warnings.append("the fidelity above was measured on calibration samples (in-sample): it flatters the result")
    if judge is not None and judge.held_out is None:
        warnings.append("the fidelity above may have been measured on calibration samples: the statistics do not "
                        "record which samples they saw (collect them again with `onnxcomp calibrate`)")
    return warnings


def judge_warnings(judge, max_drop: float | None) -> list[str]:
    """What the validation samples cannot show: a drop finer than one sample, anything from one or
    a handful of samples."""
    if judge is None:
        return []
    warnings = []
    step = judge.metric.step(judge)
    if max_drop is not None and step is not None and step > max_drop:
        warnings.append(f"--max-drop {max_drop:g} with --metric {judge.metric.name} on {judge.samples} validation "
                        f"sample(s): one disagreement is a drop of {step:.3g}, so only candidates that agree on every "
                        f"one were accepted, and a drop of {max_drop:g} on other data cannot be told from none; give "
                        f"--validation-data with well over {math.ceil(1 / max_drop)} samples")
    if judge.samples < VALIDATION_MIN:
        warnings.append(f"only {judge.samples} validation sample(s) judged the result and the candidates"
                        + (" (one sample has no spread: its standardised errors are relative to the values' size)"
                           if judge.samples == 1 else "")
                        + f": their figures are noise; give --validation-data with {VALIDATION_MIN} or more")
    return warnings


def nonfinite_warnings(fidelity: Fidelity | None) -> list[str]:
    """NaN or Inf in the compressed model's outputs: the infinite error above, said in words."""
    if fidelity is None or not fidelity.nonfinite:
        return []
    names = ", ".join(repr(name) for name, errors in fidelity.outputs.items() if errors.get("nonfinite"))
    return [f"the compressed model's outputs hold {fidelity.nonfinite} NaN or Inf value(s) where the original's "
            f"hold finite ones (output {names}, on the {fidelity.samples} validation samples): an infinite error; "
            "keep more of the layers that feed them (a larger rank or budget, or --skip)"]


def layer_rows(layers, chosen, skipped, problems, solved, allocation=None, not_chosen=None) -> list[LayerRow]:
    """One row per Conv/Gemm/MatMul: the solved layers in model order, then those left alone
    (``not_chosen``: layer name -> why it was left out, where not by --skip)."""
    not_chosen = not_chosen or {}
    latency = (allocation.layer_latency if allocation is not None else None) or {}
    rows = []
    for layer in chosen:
        row = _solved_row(layer, problems[layer.name], solved[layer.name])
        row.latency_before, row.latency_after = latency.get(layer.name, (None, None))
        rows.append(row)
    rows += [LayerRow(layer.name, layer.op_type, layer.shape_text, f"skipped: {not_chosen.get(layer.name, '--skip')}",
                      params_before=layer.params, params_after=layer.params, macs_before=layer.macs(),
                      macs_after=layer.macs())
             for layer in layers if layer not in chosen]
    rows += [LayerRow(s.name, s.op_type, "-", f"skipped: {s.reason}") for s in skipped]
    return rows


def _solved_row(layer, problem, result) -> LayerRow:
    macs_before = layer.macs(problem.positions)
    if isinstance(result, str):
        return LayerRow(layer.name, layer.op_type, layer.shape_text, f"kept: {result}",
                        params_before=layer.params, params_after=layer.params,
                        macs_before=macs_before, macs_after=macs_before)
    return LayerRow(
        layer.name, layer.op_type, layer.shape_text, "compressed", method=str(result.method),
        rank=list(result.rank), params_before=layer.params, params_after=result.params,
        macs_before=macs_before, macs_after=None if problem.positions is None else result.macs * problem.positions,
        relative_error=result.relative_error, seconds=result.info.get("seconds"),
        info={k: v for k, v in result.info.items() if k != "seconds"},
    )


def model_totals(original, compressed, shapes, sample, compressed_layers: int, found: int) -> dict:
    """Params and MACs per sample of the whole model, before and after."""
    return {
        "params_before": count_params(original),
        "params_after": count_params(compressed),
        "macs_before": count_macs(original, shapes, sample),
        "macs_after": count_macs(compressed, shapes, sample),
        "layers_compressed": compressed_layers,
        "layers_found": found,
    }


def target_settings(budget, allocation, totals) -> dict:
    """The report's ``settings.target``: what the budget asked, predicted and achieved."""
    if budget.kind is BudgetKind.LATENCY:
        achieved = allocation.measured
    else:
        before = totals[f"{budget.kind.value}_before"]
        achieved = totals[f"{budget.kind.value}_after"] / before if before else None
    fraction = budget.fraction if budget.fraction is not None else allocation.search["fraction"]
    target = {"kind": budget.kind.value, "fraction": fraction, "predicted": allocation.predicted,
              "achieved": achieved, "feasible": allocation.feasible, "sensitivity": allocation.sensitivity,
              "rank_multiple": allocation.rank_multiple}
    if allocation.search:
        target["search"] = allocation.search
    return target


def add_latency(totals, target, allocation, measured, latency) -> None:
    """The latency budget's accounting: profiled totals, the whole-run interleaved check
    (``measured``: the latency check after writing), the rounds."""
    total = allocation.total
    totals.update(latency_before=total, latency_after=total * allocation.measured, latency_ratio=allocation.measured,
                  latency_wall_before=measured.seconds_before, latency_wall_after=measured.seconds_after,
                  latency_wall_ratio=measured.ratio,
                  latency_setting={"provider": latency.provider.value, "threads": latency.threads, "batch": 1})
    target.update(rounds=allocation.rounds, timed=allocation.timed)


def _rounds_note(rounds) -> str:
    """Latency budgets: say when the kept allocation aimed off the target to correct a measured miss."""
    if not rounds or len(rounds) < 2:
        return ""
    first = rounds[0]
    return (f"; measured: round 1 (aimed {first['aimed']:.1%}) {first['measured']:.1%}, "
            + ", ".join(f"round {i} (aimed {r['aimed']:.1%}) {r['measured']:.1%}" for i, r in enumerate(rounds[1:], 2))
            + ", the closer kept")


def _count(value) -> str:
    if value is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(int(value))


def _change(before, after) -> str:
    return f"{_count(before)} -> {_count(after)} ({_ratio(after, before)})"


def _ms(before, after) -> str:
    if before is None:
        return "-"
    return f"{before * 1e3:.3g}->{after * 1e3:.3g}"


def _ratio(after, before) -> str:
    if not before or after is None:
        return "?"
    return f"{after / before:.1%} kept"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]
