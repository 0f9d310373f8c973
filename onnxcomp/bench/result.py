"""What ``onnxcomp bench`` found: the sizes, output errors and timings of both models, as a table or JSON."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from ..io import columns, json_safe, write_json


@dataclass
class ModelInfo:
    """Static size of one model."""

    source: str  # the file path, or "<ModelProto>"
    params: int
    macs_per_sample: int | None  # None when shape inference cannot tell
    file_bytes: int  # the .onnx file plus its external data files (serialized size for a ModelProto)


@dataclass
class Timing:
    """One model's run times at one batch size, in milliseconds."""

    median_ms: float
    p10_ms: float
    p25_ms: float
    p75_ms: float
    p90_ms: float
    min_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> "Timing":
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p10, p25, p50, p75, p90 = np.percentile(ms, [10, 25, 50, 75, 90])
        return cls(float(p50), float(p10), float(p25), float(p75), float(p90), float(ms.min()))


@dataclass
class Latency:
    """Both models at one batch size: timed in interleaved pairs after a warm-up."""

    batch_size: int
    pairs: int  # timed runs of each model
    warmup: int  # warm-up runs of each model
    original: Timing
    compressed: Timing
    ratio: float  # median over the pairs of compressed / original (< 1: compressed is faster)
    pair_ratio_p10: float  # spread of that per-pair ratio
    pair_ratio_p90: float
    ratio_of_medians: float  # compressed median / original median
    note: str | None = None
    floor: float | None = None  # the Amdahl floor of the compression at this batch size (None: not measured)
    rewritable_share: float | None = None  # share of the original's time in the layers onnxcomp can rewrite

    def to_dict(self) -> dict:
        return {**{k: v for k, v in vars(self).items() if k not in ("original", "compressed")},
                "original": vars(self.original), "compressed": vars(self.compressed)}


@dataclass
class BenchResult:
    original: ModelInfo
    compressed: ModelInfo
    samples: int
    inputs: dict  # name -> shape of the whole data array
    outputs: dict  # output name -> {standardized, relative_l2, cosine, max_abs, nonfinite}
    top1_output: str | None  # the output used for agreement/accuracy (None: none looks like scores)
    top1_agreement: float | None  # fraction of samples whose argmax matches the original's
    accuracy: dict | None  # {"original": a, "compressed": b, "labels": source} when labels are given
    latency: list[Latency]
    settings: dict
    notes: list[str] = field(default_factory=list)
    reach: dict | None = None  # the layers' MACs kept and the chains slower than their dense layer
    subnormals: dict | None = None  # per model: subnormal weights and the time ratio once they are set to 0

    @property
    def ratios(self) -> dict:
        """compressed / original for params, MACs and file size."""
        return {
            "params": _ratio(self.compressed.params, self.original.params),
            "macs_per_sample": _ratio(self.compressed.macs_per_sample, self.original.macs_per_sample),
            "file_bytes": _ratio(self.compressed.file_bytes, self.original.file_bytes),
        }

    def to_dict(self) -> dict:
        """Plain JSON-ready data; NaN/Inf (e.g. from NaN outputs) become null."""
        return json_safe({
            "original": vars(self.original),
            "compressed": vars(self.compressed),
            "ratios": self.ratios,
            "data": {"samples": self.samples, "inputs": self.inputs},
            "outputs": self.outputs,
            "top1_output": self.top1_output,
            "top1_agreement": self.top1_agreement,
            "accuracy": self.accuracy,
            "latency": [latency.to_dict() for latency in self.latency],
            "settings": self.settings,
            "notes": self.notes,
            "reach": self.reach,
            "subnormals": self.subnormals,
        })

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as JSON (atomically: no half-written file)."""
        write_json(path, self.to_dict(), "output")

    def table(self) -> str:
        lines = self._header() + [""] + self._sizes() + [""] + self._errors() + [""] + self._latency()
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines).rstrip()

    def _header(self) -> list[str]:
        shapes = ", ".join(f"{name} {list(shape)}" for name, shape in self.inputs.items())
        provider = self.settings["provider"]
        threads = self.settings["threads"] or "default"
        return [f"original:   {self.original.source}", f"compressed: {self.compressed.source}",
                f"data: {self.samples} samples ({shapes}); {provider}, intra-op threads {threads}"]

    def _sizes(self) -> list[str]:
        rows = [("", "original", "compressed", "ratio")]
        for label, key in (("params", "params"), ("MACs/sample", "macs_per_sample"), ("file bytes", "file_bytes")):
            a, b = getattr(self.original, key), getattr(self.compressed, key)
            rows.append((label, _int(a), _int(b), _fmt_ratio(self.ratios[key])))
        if self.accuracy is not None:
            a, b = self.accuracy["original"], self.accuracy["compressed"]
            rows.append(("accuracy", f"{a:.2%}", f"{b:.2%}", f"{(b - a) * 100:+.2f} pts"))
        return columns(rows, right=(1, 2, 3))

    def _errors(self) -> list[str]:
        lines = [f"output error, compressed vs original, over all {self.samples} samples:"]
        rows = [("output", "std. error", "rel. L2", "cosine", "max abs")]
        for name, e in self.outputs.items():
            extra = f"  ({e['nonfinite']} non-finite values)" if e.get("nonfinite") else ""
            rows.append((name, _g(e["standardized"]), _g(e["relative_l2"]), _cos(e["cosine"]),
                         _g(e["max_abs"]) + extra))
        lines += columns(rows, right=(1, 2, 3))
        lines.append("std. error: per output channel, RMS error / the channel's spread in the original's outputs")
        if self.top1_agreement is not None:
            agree = round(self.top1_agreement * self.samples)
            lines.append(f"top-1 agreement ({self.top1_output}): {self.top1_agreement:.2%} ({agree}/{self.samples})")
        else:
            lines.append("top-1 agreement: n/a (the first output is not [batch, classes] scores)")
        return lines

    def _latency(self) -> list[str]:
        if not self.latency:
            return []
        floors = any(l.floor is not None for l in self.latency)
        lines = ["latency in ms: median [p10, p90], both models in one process, runs interleaved after warm-up"]
        rows = [("batch", "pairs", "original", "compressed", "ratio [p10, p90]") + (("floor", "rewritable") if floors
                                                                                     else ())]
        for l in self.latency:
            rows.append((
                str(l.batch_size), str(l.pairs), _timing(l.original), _timing(l.compressed),
                f"{l.ratio:.3f} [{l.pair_ratio_p10:.2f}, {l.pair_ratio_p90:.2f}]",
                *((_fmt_ratio(l.floor), "?" if l.rewritable_share is None else f"{l.rewritable_share:.1%}")
                  if floors else ()),
            ))
        lines += columns(rows, right=(0, 1))
        lines.append("ratio = compressed / original within each pair of runs, median "
                     "(< 1: the compressed model is faster)")
        if floors:
            lines.append("floor = the Amdahl floor: the original's time outside the compressible layers + each layer's "
                         "time x the MACs its chain keeps (profiled in place); rewritable = those layers' share of "
                         "the original's time. A ratio near the floor is what the MACs allow")
        for flagged in (self.reach or {}).get("flagged", []):
            lines.append(f"slow chain: {flagged['layer']}: {flagged['chain_ms']:.3g} ms in the compressed model, "
                         f"{flagged['dense_ms']:.3g} ms dense in the original ({flagged['flag']})")
        if (self.reach or {}).get("note"):
            lines.append(f"floor: {self.reach['note']}")
        return lines + self._subnormal_lines()

    def _subnormal_lines(self) -> list[str]:
        lines = []
        for which, entry in (self.subnormals or {}).items():
            if not entry["values"]:
                continue
            gain = "" if entry["flushed_ratio"] is None else (
                f"; with them set to 0 it runs at {entry['flushed_ratio']:.3f}x its time (batch "
                f"{self.latency[0].batch_size}, interleaved)")
            lines.append(f"subnormal weights: the {which} model holds {entry['values']:,} in {entry['tensors']} "
                         f"tensor(s){gain}; `onnxcomp compress --flush-denormals` sets them to 0")
        return lines


# ---------------------------------------------------------------- number formats


def _ratio(new, old) -> float | None:
    if new is None or old is None or old == 0:
        return None
    return new / old


def _int(value) -> str:
    return "?" if value is None else f"{value:,}"


def _fmt_ratio(value) -> str:
    return "?" if value is None else f"{value:.3f}"


def _g(value: float) -> str:
    if value is None or not math.isfinite(value):
        return str(value)
    return "0" if value == 0 else f"{value:.3g}"


def _cos(value: float) -> str:
    return f"{value:.6f}" if math.isfinite(value) else str(value)


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _timing(t: Timing) -> str:
    return f"{_ms(t.median_ms)} [{_ms(t.p10_ms)}, {_ms(t.p90_ms)}]"
