"""What ``onnxcomp bench`` adds to the timings: the Amdahl floor, slow chains, and subnormal weights.

- **Floor** (:func:`floors`): the original is profiled at each timed batch size; each of its
  compressible layers is found again in the compressed model as the chain of nodes from the
  layer's input to its output (its own node when it was not rewritten) and keeps the MACs of
  that chain. The floor is the untouched time plus each layer's time scaled by its MACs kept
  (see :mod:`onnxcomp.reach`): printed next to the measured ratio.
- **Slow chains**: the compressed model profiled at the first batch size; a chain slower than
  its dense layer is named (the latency guard of ``compress``).
- **Subnormal weights** (:func:`subnormal_gains`): each model's subnormal weights counted; where
  there are any, the model is timed against itself with them set to 0 (interleaved pairs at the
  first batch size): what ``--flush-denormals`` buys on this machine.
"""

from __future__ import annotations

from ..model import find_layers, layer_macs
from ..model.denormals import count_subnormals, flush_model
from ..reach import guard, layer_times, time_share
from ..runtime import Timer, make_session
from .data import first_samples
from .result import Latency
from .timing import time_pair


def floors(models, feeds: dict, samples: int, latency: list[Latency], timer: Timer) -> dict:
    """Sets each ``Latency``'s floor and the rewritable share of the original's time; returns the
    layers' MACs kept and the latency guard's flagged chains, for the JSON."""
    original, compressed = models
    one = first_samples(feeds, 1, samples)
    shapes = {name: [1, *value.shape[1:]] for name, value in one.items()}
    layers, _ = find_layers(original, shapes)
    before = layer_macs(original, layers, shapes, one)
    after = layer_macs(compressed, layers, shapes, one)
    kept = {layer.name: after[layer.name] / before[layer.name] for layer in layers
            if before[layer.name] and after[layer.name] is not None}
    rewritten = [name for name, fraction in kept.items() if fraction != 1.0]
    if not layers or len(kept) < len(layers):
        return {"kept": kept, "flagged": [], "note": "the layers' MACs in the compressed model are unknown: no floor"}
    flagged = []
    for index, entry in enumerate(latency):
        feed = first_samples(feeds, entry.batch_size, samples)
        share = time_share(timer, original, layers, feed, entry.batch_size, whole=entry.original.min_ms / 1e3)
        entry.floor, entry.rewritable_share = share.floor(kept), share.share
        if index == 0 and rewritten:
            chains = layer_times(timer.profile(compressed, feed, layers, runs=8 if entry.batch_size == 1 else 2),
                                 layers)
            flagged = [{"layer": c.name, "dense_ms": c.dense * 1e3, "chain_ms": c.chain * 1e3, "flag": c.flag}
                       for c in guard(share.layers, chains, rewritten).values() if c.flag]
    return {"kept": kept, "flagged": flagged}


def subnormal_gains(models, feeds: dict, samples: int, batch: int, providers, threads, repeats, warmup) -> dict:
    """Per model: its subnormal weights, and (where it has any) its time with them set to 0 over its
    time as it is (interleaved pairs at ``batch``: below 1, flushing them makes it faster)."""
    out = {}
    for which, model in zip(("original", "compressed"), models):
        found = count_subnormals(model)
        entry = {**found.to_dict(), "flushed_ratio": None}
        if found.values:
            flushed, _ = flush_model(model)
            sessions = [make_session(m, providers, threads) for m in (model, flushed)]
            entry["flushed_ratio"] = time_pair(sessions, feeds, samples, batch, repeats, warmup).ratio
        out[which] = entry
    return out
