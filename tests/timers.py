"""Deterministic machines for the latency tests: injected as ``compress(..., timer=...)``, never monkeypatched."""

from __future__ import annotations

from onnxcomp.model import chain_nodes, count_macs, layer_macs
from onnxcomp.runtime import Profile, Timer


class MacTimer(Timer):
    """A deterministic machine: a run costs a fixed overhead, each node a little, each MAC 1 ns."""

    calls = 0

    def seconds(self, model, feed):
        MacTimer.calls += 1
        shapes = {name: list(value.shape) for name, value in feed.items()}
        macs = count_macs(model, shapes)
        return 1e-5 + 2e-6 * len(model.graph.node) + 1e-9 * macs

    def session(self, model):
        return model  # no onnxruntime: the "time" is computed from the model

    def ratio(self, model, reference, feed):
        return self.seconds(model, feed) / self.seconds(reference, feed)

    def machine(self):
        return "mac-timer"

    def compare(self, model, reference, feed, pairs=None):
        before, after = self.seconds(reference, feed), self.seconds(model, feed)
        return after / before, before, after

    def profile(self, model, feed, layers=(), runs=8):
        return Profile(self.seconds(model, feed), {})  # layers not found: each timed on its own


class SlowChainTimer(MacTimer):
    """MacTimer whose profiler also gives each target layer its time (2 us per node of its chain +
    1 ns per MAC), and where the chains of the ``slow`` layers run ``factor`` times slower inside a
    whole model, as a chain with subnormal factors did on a CPU without fast subnormal arithmetic.
    Whole runs (``seconds``, ``compare``) and one-layer timings do not see it: only the profile does."""

    def __init__(self, slow=(), factor=10.0, **options):
        super().__init__(**options)
        self.slow, self.factor = set(slow), factor

    def profile(self, model, feed, layers=(), runs=8):
        shapes = {name: list(value.shape) for name, value in feed.items()}
        macs = layer_macs(model, layers, shapes)
        times, extra = {}, 0.0
        for layer in layers:
            nodes = chain_nodes(model, layer.input, layer.output)
            seconds = 2e-6 * len(nodes) + 1e-9 * macs[layer.name]
            if layer.name in self.slow and len(nodes) > 1:
                extra += seconds * (self.factor - 1)
                seconds *= self.factor
            times[layer.output] = seconds
        return Profile(self.seconds(model, feed) + extra, times)
