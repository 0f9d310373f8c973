"""Where a model's time goes, what a compression can reach, and whether each rewritten layer got there.

Measured with onnxruntime's profiler inside the whole model (:meth:`onnxcomp.runtime.Timer.profile`:
each node's fastest kernel time, fused activations and NCHWc nodes attributed to their layer, every
node of a rewritten layer's chain to that layer):

- **Share**: the time of the layers onnxcomp can rewrite (Conv/Gemm/MatMul with constant weights),
  as a share of the model's time. The rest (element-wise nodes, depthwise convs, layout reorders,
  the run's own overhead) no decomposition touches.
- **Amdahl floor** of a compression: the untouched time plus each layer's time scaled by the share
  of its MACs it keeps, as a fraction of the model's time: what the compressed model would take if
  every chain ran at its dense layer's arithmetic rate. Thin chains run below that rate, so a
  measured ratio near the floor is as good as the MACs allow, and a floor near 1 says a MAC budget
  cannot buy much time on this model.
- **Guard**: after writing, every rewritten layer's chain time in the compressed model is compared
  with its dense time in the original, and with the latency budget's prediction where there is
  one. A chain slower than its dense layer, or slower than predicted by more than
  :data:`GUARD_MARGIN`, is flagged (subnormal weights were such a case: one chain ran 50x slower
  than a dense conv of its shape on a user's CPU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .calibration.readers import fixed_batch, iter_feeds, model_inputs
from .errors import first_line
from .model import with_input_shapes
from .runtime import Profile, Timer, feed_size

# A chain is flagged when it is slower than its dense layer by more than this share...
SLOWER_TOLERANCE = 0.10
# ...or slower than the latency budget's prediction by more than this share,
GUARD_MARGIN = 0.5
# and in both cases by at least this many seconds (the profiler counts whole microseconds).
MIN_DIFFERENCE = 2e-6
# Profiled runs at a large batch (each run is long: a few are enough for per-node minima).
LARGE_BATCH_RUNS = 2


@dataclass
class TimeShare:
    """One model's time at one batch size, and the part of it in the layers onnxcomp can rewrite."""

    batch: int
    seconds: float  # the model per run: summed fastest node times, or the fastest whole run if longer
    layers: dict[str, float]  # layer name -> seconds in place (its node, fused activations included)

    @property
    def rewritable(self) -> float:
        return float(sum(self.layers.values()))

    @property
    def share(self) -> float:
        return self.rewritable / self.seconds if self.seconds > 0 else 0.0

    def floor(self, kept: dict[str, float]) -> float | None:
        """The Amdahl floor: (untouched time + sum of layer time x MACs kept) / time. ``kept``: layer
        name -> fraction of its MACs kept (missing: 1, the layer is as it was)."""
        if self.seconds <= 0:
            return None
        saved = sum(seconds * (1.0 - kept.get(name, 1.0)) for name, seconds in self.layers.items())
        return 1.0 - saved / self.seconds

    def to_dict(self, kept: dict[str, float] | None = None) -> dict:
        out = {"batch": self.batch, "seconds": self.seconds, "rewritable_seconds": self.rewritable,
               "share": self.share}
        if kept is not None:
            out["floor"] = self.floor(kept)
        return out


def layer_times(profile: Profile, layers) -> dict[str, float]:
    """Layer name -> seconds, for the layers the profile found."""
    return {layer.name: profile.layers[layer.output] for layer in layers if layer.output in profile.layers}


def time_share(timer: Timer, model, layers, feed: dict, batch: int, whole: float | None = None,
               runs: int | None = None) -> TimeShare:
    """``model``'s time at ``feed`` (of ``batch`` samples) and its layers' share (profiled in place).
    ``whole``: the fastest whole run, if measured (it adds the run's overhead to the node times)."""
    runs = runs if runs is not None else (8 if batch == 1 else LARGE_BATCH_RUNS)
    profile = timer.profile(model, feed, layers, runs=runs)
    return TimeShare(batch, max(profile.total, whole or 0.0), layer_times(profile, layers))


@dataclass
class LayerCheck:
    """One rewritten layer after writing: its dense time in the original, its chain's in the compressed model."""

    name: str
    dense: float  # seconds in place in the original (batch 1)
    chain: float  # seconds of its chain in place in the compressed model
    predicted: float | None = None  # the latency budget's price of the chain (None: a MAC/params budget or a rule)
    flag: str | None = None  # why the chain is slower than it should be (None: it is not)


def guard(dense: dict[str, float], chains: dict[str, float], rewritten, predicted: dict | None = None
          ) -> dict[str, LayerCheck]:
    """Each rewritten layer's check (layer name -> :class:`LayerCheck`), flagged where its chain runs
    slower than its dense layer, or than predicted by more than :data:`GUARD_MARGIN`."""
    checks = {}
    for name in rewritten:
        if name not in dense or name not in chains:
            continue  # the profile did not find it: nothing to compare
        check = LayerCheck(name, dense[name], chains[name], (predicted or {}).get(name))
        if check.chain > check.dense * (1 + SLOWER_TOLERANCE) and check.chain - check.dense >= MIN_DIFFERENCE:
            check.flag = f"slower than the dense layer ({check.chain / max(check.dense, 1e-12):.2f}x its time)"
        elif (check.predicted is not None and check.chain > check.predicted * (1 + GUARD_MARGIN)
              and check.chain - check.predicted >= MIN_DIFFERENCE):
            check.flag = f"slower than predicted ({check.chain / max(check.predicted, 1e-12):.2f}x the prediction)"
        checks[name] = check
    return checks


@dataclass
class LatencyCheck:
    """The compressed model measured after writing: shares and floors per batch size, the whole-run
    ratio at batch 1, and each rewritten layer's check."""

    provider: str
    threads: int | None
    shares: list[TimeShare]
    kept: dict[str, float]  # layer name -> fraction of its MACs kept (rewritten layers)
    ratio: float | None  # compressed / original, whole runs at batch 1 (interleaved, fastest samples)
    seconds_before: float | None = None  # those whole runs: the original's fastest sample
    seconds_after: float | None = None  # and the compressed model's
    layers: dict[str, LayerCheck] = field(default_factory=dict)
    error: str | None = None  # why nothing was measured (the model would not run at this batch size)
    after: dict[str, float] = field(default_factory=dict)  # every layer's seconds in the compressed model (batch 1)

    @property
    def flagged(self) -> list[LayerCheck]:
        return [check for check in self.layers.values() if check.flag]

    def excess(self) -> dict[str, float]:
        """Rewritten layer -> seconds its chain takes beyond its MACs' share of the dense time
        (chain - MACs kept x dense; negative: faster than its MACs say). Their sum, over the model's
        time, is the gap between the floor and the profiled ratio."""
        return {name: check.chain - self.kept.get(name, 1.0) * check.dense for name, check in self.layers.items()}

    def to_dict(self) -> dict:
        return {
            "provider": self.provider, "threads": self.threads,
            "batches": [share.to_dict(self.kept) for share in self.shares],
            "ratio": self.ratio, "seconds_before": self.seconds_before, "seconds_after": self.seconds_after,
            "guard": {"tolerance": SLOWER_TOLERANCE, "margin": GUARD_MARGIN,
                      "flagged": [asdict(check) for check in self.flagged]},
            "excess_seconds": self.excess(),
            "error": self.error,
        }


def check_latency(timer: Timer, original, compressed, layers, kept: dict[str, float], sample: dict,
                  batch_feed: dict | None = None, predicted: dict | None = None, strict: bool = False) -> LatencyCheck:
    """Profile both models at batch 1 (``sample``; a fixed-batch model: its batch) and the original at
    the calibration batch (``batch_feed``); time both in whole interleaved runs at batch 1; check
    every rewritten layer (``kept``'s keys; ``predicted``: layer name -> the budget's price of its chain).
    A model that onnxruntime cannot run at these sizes gives a check with ``error`` set (``strict``:
    the error is raised, for latency budgets, which measured the same runs before)."""
    try:
        ratio, before_seconds, after_seconds = timer.whole_model_ratio(original, compressed, sample)
        before = time_share(timer, original, layers, sample, feed_size(sample), whole=before_seconds)
        after = layer_times(timer.profile(compressed, sample, layers), layers)
        shares = [before]
        if batch_feed is not None and feed_size(batch_feed) != before.batch:
            shares.append(time_share(timer, original, layers, batch_feed, feed_size(batch_feed)))
    except Exception as exc:  # an onnxruntime failure at batch 1 must not lose the compressed model
        if strict:
            raise
        return LatencyCheck(timer.provider, timer.threads, [], kept, None,
                            error=f"onnxruntime could not time the models: {first_line(exc)}")
    return LatencyCheck(timer.provider, timer.threads, shares, kept, ratio, before_seconds, after_seconds,
                        guard(before.layers, after, kept, predicted), after=after)


def kept_fractions(rows) -> dict[str, float]:
    """Layer name -> fraction of its MACs (else params) kept, for every compressed report row."""
    kept = {}
    for row in rows:
        if row.status != "compressed":
            continue
        if row.macs_before and row.macs_after is not None:
            kept[row.name] = row.macs_after / row.macs_before
        elif row.params_before:
            kept[row.name] = row.params_after / row.params_before
    return kept


def guard_warnings(check: LatencyCheck | None) -> list[str]:
    """The report's warning about chains that run slower than they should (or that nothing was timed)."""
    if check is not None and check.error:
        return [f"the latency check measured nothing: {check.error}"]
    warnings = _below_floor(check)
    flagged = check.flagged if check is not None else []
    if not flagged:
        return warnings
    names = ", ".join(f"{c.name!r} ({c.flag})" for c in flagged[:3]) + (", ..." if len(flagged) > 3 else "")
    return warnings + [
        f"{len(flagged)} rewritten layer(s) run slower than they should in the compressed model: {names}; "
        "keep them dense (--skip NAME) or budget in measured time (--target-latency)"]


# A whole-run ratio this far below its own Amdahl floor was disturbed, not fast: the floor assumes
# each rewritten layer runs in its MACs' share of its dense time, which thin chains never beat by much.
BELOW_FLOOR = 0.9


def _below_floor(check: LatencyCheck | None) -> list[str]:
    if check is None or check.ratio is None or not check.shares:
        return []
    floor = check.shares[0].floor(check.kept)
    if floor is None or check.ratio >= BELOW_FLOOR * floor:
        return []
    return [f"the measured latency ratio {check.ratio:.2f} is below its Amdahl floor {floor:.2f}: other work "
            "disturbed the timing (a busy machine); measure again with `onnxcomp bench`"]


def predicted_chains(allocation) -> dict[str, float] | None:
    """A latency budget's price of each chosen chain (layer name -> seconds); None without one."""
    priced = getattr(allocation, "layer_latency", None)
    return None if not priced else {name: chosen for name, (_, chosen) in priced.items()}


def uniform_floor(share: TimeShare, fraction: float) -> float:
    """The floor if every layer of ``share`` kept ``fraction`` of its MACs."""
    return share.floor({name: fraction for name in share.layers})


def model_shares(timer: Timer, model, layers, input_shapes: dict, data=None, batch: int = 32
                 ) -> tuple[list[TimeShare], str]:
    """``inspect``: the model's time at batch 1 and at ``batch``, and its layers' share, on ``data``
    (its first samples) or on random inputs of the model's (or ``input_shapes``') shapes. Returns
    the shares and where the inputs came from; no shares (and why) when the model cannot be fed."""
    fixed = fixed_batch(model_inputs(with_input_shapes(model, input_shapes)))
    if data is not None:
        from .bench.data import read_held_out  # a .npz may carry labels beside the inputs, as for bench

        held_out = read_held_out(data, None, model, model_inputs(model))
        first = next(iter_feeds(held_out.feeds, model, batch_size=fixed or batch, laid_out=True), None)
        if first is None:
            return [], "the data is empty"
        source = "the first samples of the data"
    else:
        first, why = _random_batch(with_input_shapes(model, input_shapes), fixed or batch)
        if first is None:
            return [], why
        source = "random inputs"
    one = first if fixed else {name: value[:1] for name, value in first.items()}
    shares = [time_share(timer, model, layers, one, feed_size(one), whole=timer.seconds(model, one))]
    if feed_size(first) != shares[0].batch:
        shares.append(time_share(timer, model, layers, first, feed_size(first)))
    return shares, source


def reach_lines(shares: list[TimeShare], source: str, layers, total_macs: int | None, provider: str,
                threads: int | None, fractions=(0.75, 0.5, 0.25)) -> list[str]:
    """``inspect``'s account of what is reachable: the rewritable layers' share of the time, and the
    Amdahl floor of ``--target-macs F`` (the layers keeping what F leaves them, spread evenly)."""
    if not shares:
        return [f"time: {source}"] if source else []
    setting = f"onnxruntime {provider}, threads {threads or 'default'}, {source}"
    lines = [f"time in these layers ({setting}, profiled in place): "
             + "; ".join(f"batch {s.batch}: {s.share:.1%} of {s.seconds * 1e3:.3g} ms" for s in shares)]
    in_bodies = sum(bool(layer.scope) for layer in layers)
    if in_bodies:  # onnxruntime's profile times an If / Loop / Scan as one node, not the nodes of its bodies
        lines.append(f"({in_bodies} of these layers are inside If/Loop/Scan bodies: their time is their body "
                     "owner's, not in the share above)")
    macs = [layer.macs() for layer in layers]
    ours = sum(macs) if total_macs and None not in macs else 0
    parts = []
    for fraction in fractions:
        # --target-macs F keeps F of the whole model: the layers keep what the rest leaves them
        kept = float(np.clip((fraction * total_macs - (total_macs - ours)) / ours, 0, 1)) if ours else fraction
        parts.append(f"F={fraction:g}: " + ", ".join(f"{uniform_floor(s, kept):.3f} (batch {s.batch})" for s in shares))
    lines.append("Amdahl floor of --target-macs F (untouched time + these layers' time x the MACs they keep, "
                 "spread evenly; the compress report gives the exact floor of its allocation): " + "; ".join(parts))
    return lines


def _random_batch(model, batch: int) -> tuple[dict | None, str]:
    """Standard normal values (zeros for non-float inputs) of each input's shape, the batch dimension
    (a dynamic first one) at ``batch``; None and why when another dimension is dynamic."""
    rng = np.random.default_rng(0)
    feed = {}
    for model_input in model_inputs(model):
        dims = list(model_input.dims or [])
        if dims and dims[0] is None:
            dims[0] = batch
        if model_input.dims is None or None in dims or model_input.dtype is None:
            return None, (f"input {model_input.name!r} has dynamic dimensions {model_input.describe()}: give "
                          "--input-shape or --data to time the model")
        dtype = np.dtype(model_input.dtype)
        feed[model_input.name] = (rng.standard_normal(dims).astype(dtype) if dtype.kind == "f"
                                  else np.zeros(dims, dtype))
    return feed, ""
