"""Measured latency of layers and of their low-rank chains: the cost model of ``--target-latency``.

MACs are a poor proxy for time: a rank-r chain adds nodes and thin convolutions
that run at a lower fraction of the machine's peak than the dense layer did
(PP-OCR at 50% MACs ran at 70-80% of the original latency). So the budget prices
each candidate by a measurement:

- every candidate (the dense layer, SVD rank r, Tucker-2 (R_out, R_in), CP R) is
  built as a one-layer ONNX model by the *real* rewrite pass (placeholder factors
  of the right shapes), so the timed chain is exactly the chain that will be
  written, fusions and all;
- it is timed with onnxruntime on the target execution provider and thread
  count, at batch 1, *as a ratio to the dense layer*: the two run in interleaved
  pairs, so both see the same background load (absolute times on a shared
  machine move by tens of percent from one minute to the next; ratios do not);
- ratios are cached per machine (CPU model, cores, onnxruntime version,
  provider, threads) in a JSON file: layers of the same shape are timed once and
  later runs reuse them. The dense layers and the whole model are timed afresh
  in each run, within the same few seconds.

The predicted model latency is ``T - sum_i dense_i * (1 - ratio_i)``: the whole
model's time minus each replaced layer's saving. What an isolated timing adds
to both the dense layer and its chain (the session run, the NCHWc reorders of
input and output) cancels in that saving; what it cannot see (fusions, cache
effects inside the whole model) is corrected by measuring the result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .decompose.factors import CPFactors, LowRank, Tucker2Factors
from .decompose.solve import Candidate, Decomposition
from .errors import OnnxcompError
from .evaluate import execution_providers, make_session
from .graph import TargetLayer
from .passes import REWRITES
from .passes.common import GraphEditor

CACHE_ENV = "ONNXCOMP_CACHE"
CACHE_FORMAT = "chain/dense ratios v1"  # bump when what is cached changes meaning


def default_cache_path() -> Path:
    """``$ONNXCOMP_CACHE/latency.json``, else ``~/.cache/onnxcomp/latency.json``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "onnxcomp")
    return Path(root) / "latency.json"


@dataclass
class Timer:
    """How models are timed: warm-up runs, then samples of at least ``min_seconds`` each."""

    provider: str = "cpu"
    threads: int | None = None
    warmup: int = 3
    repeats: int = 9  # samples of one model (its time: the fastest)
    pairs: int = 15  # interleaved pairs of a ratio (its value: the median)
    min_seconds: float = 0.002

    def session(self, model):
        if isinstance(model, ort.InferenceSession):
            return model
        return make_session(model, execution_providers(self.provider), self.threads)

    def seconds(self, model, feed: dict) -> float:
        """Seconds per run of ``model`` on ``feed``: the *fastest* sample (as ``timeit`` advises:
        on a shared machine the slower samples measure the neighbours' load, not the model)."""
        session = self.session(model)
        runs = self._runs_per_sample(session, feed)
        return min(self._sample(session, feed, runs) for _ in range(self.repeats))

    def ratio(self, model, reference, feed: dict) -> float:
        """time(model) / time(reference), see :meth:`compare`."""
        return self.compare(model, reference, feed)[0]

    def compare(self, model, reference, feed: dict) -> tuple[float, float, float]:
        """(time(model) / time(reference), reference seconds, model seconds).

        The two are sampled in interleaved pairs, so both see the same stretches of
        background load, and each time is its fastest sample: when other processes hold
        the cores, most samples are slowed at random, the fastest are the least disturbed
        (more robust than a median of per-pair ratios when the machine is oversubscribed).
        """
        sessions = [self.session(reference), self.session(model)]
        runs = [self._runs_per_sample(s, feed) for s in sessions]
        times = ([], [])
        for i in range(self.pairs):
            for k in ((0, 1) if i % 2 == 0 else (1, 0)):
                times[k].append(self._sample(sessions[k], feed, runs[k]))
        fastest = [min(t) for t in times]
        return fastest[1] / max(fastest[0], 1e-12), fastest[0], fastest[1]

    def _runs_per_sample(self, session, feed) -> int:
        """Warm up, and how many runs make one sample of at least ``min_seconds``."""
        start = time.perf_counter()
        for _ in range(self.warmup):
            session.run(None, feed)
        each = (time.perf_counter() - start) / max(self.warmup, 1)
        return max(1, int(self.min_seconds / max(each, 1e-9)))

    @staticmethod
    def _sample(session, feed, runs: int) -> float:
        start = time.perf_counter()
        for _ in range(runs):
            session.run(None, feed)
        return (time.perf_counter() - start) / runs

    def machine(self) -> str:
        """The cache key of this machine and setting: timings are only valid where they were taken."""
        return (f"{_cpu_name()} | {os.cpu_count()} cpus | onnxruntime {ort.__version__} | "
                f"{self.provider} | threads {self.threads or 'default'}")


class LatencyTable:
    """Per-layer latencies: each candidate chain as a ratio to its dense layer (measured
    interleaved with it, cached per machine), times the dense layer's time measured now.

    Ratios are what a shared machine can measure and reuse: absolute times move with the
    background load, so the dense times are taken afresh in each process, in the same few
    seconds as the whole model's time that the budget is a fraction of.
    """

    def __init__(self, timer: Timer | None = None, path: str | os.PathLike | None = None):
        self.timer = timer or Timer()
        self.path = Path(path) if path is not None else default_cache_path()
        self.measured = 0  # timings taken in this process (the other ratios came from the cache)
        self._all = _read_cache(self.path)
        self._ratios = self._all.setdefault(f"{CACHE_FORMAT} | {self.timer.machine()}", {})
        self._dense: dict[str, tuple[float, object]] = {}  # key -> (seconds, session), this process only

    def layer_seconds(self, layer: TargetLayer, input_shape, candidate: Candidate | None = None) -> float:
        """Latency of ``layer`` (``candidate`` None: dense) reading an input of ``input_shape`` (batch 1)."""
        dense = self._dense_entry(layer, input_shape)[0]
        return dense if candidate is None else dense * self.ratio(layer, input_shape, candidate)

    def ratio(self, layer: TargetLayer, input_shape, candidate: Candidate) -> float:
        """time(chain) / time(dense layer), cached."""
        key = _key(layer, input_shape, candidate)
        if key not in self._ratios:
            reference = self._dense_entry(layer, input_shape)[1]
            chain = layer_model(layer, input_shape, candidate)
            self._ratios[key] = self.timer.ratio(chain, reference, _random_feed(layer.input, input_shape))
            self.measured += 1
        return self._ratios[key]

    def _dense_entry(self, layer, input_shape):
        key = _key(layer, input_shape, None)
        if key not in self._dense:
            session = self.timer.session(layer_model(layer, input_shape))
            self._dense[key] = (self.timer.seconds(session, _random_feed(layer.input, input_shape)), session)
            self.measured += 1
        return self._dense[key]

    def save(self) -> None:
        """Write the cache (atomically; a failure to write is not fatal: the timings are only a cache)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".latency-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(self._all, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:
            pass


def interleaved_ratio(original: onnx.ModelProto, compressed: onnx.ModelProto, feed: dict,
                      timer: Timer) -> tuple[float, float, float]:
    """(compressed / original time, original seconds, compressed seconds), by :meth:`Timer.compare`
    with at least 21 interleaved pairs (``onnxcomp bench`` reports the median per-pair ratio too)."""
    wider = dataclasses.replace(timer, pairs=max(timer.pairs, 21))
    return wider.compare(compressed, original, feed)


# ---------------------------------------------------------------- whole models, node by node

# Ops onnxruntime fuses into a preceding Conv/Gemm/MatMul (the fused node is named after the last one).
_FUSED_AFTER = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Add", "Sum",
                "BatchNormalization", "Mul", "Identity"}


@dataclass
class Profile:
    """A model's time as onnxruntime's profiler sees it: each node's fastest kernel time over a
    few runs (robust to a busy machine: a node's ~1 ms is often undisturbed, a model's 100 ms never is)."""

    total: float  # seconds: the sum over all nodes
    layers: dict[str, float]  # target layer output tensor -> seconds of the node(s) computing it


def profile(model: onnx.ModelProto, feed: dict, timer: Timer, layers=(), runs: int = 8) -> Profile:
    """Per-node fastest kernel times of ``model`` on ``feed`` and the target ``layers``' share."""
    with tempfile.TemporaryDirectory() as folder:
        session = make_session(model, execution_providers(timer.provider), timer.threads,
                               profile_prefix=os.path.join(folder, "profile"))
        for _ in range(timer.warmup + runs):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    fastest: dict[str, float] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            base = name[: -len("_kernel_time")]
            fastest[base] = min(fastest.get(base, float("inf")), event["dur"] * 1e-6)
    owner = _layer_of_node(model, layers)
    shares: dict[str, float] = {}
    for base, seconds in fastest.items():
        # NCHWc nodes are named "<output>_nchwc", fusions of a Gemm/MatMul "fused <node name>"
        layer = next((owner[n] for n in (base, base.removesuffix("_nchwc"), base.removeprefix("fused "))
                      if n in owner), None)
        if layer is not None:
            shares[layer] = shares.get(layer, 0.0) + seconds
    return Profile(sum(fastest.values()), shares)


def _layer_of_node(model: onnx.ModelProto, layers) -> dict[str, str]:
    """Name in a profile -> the target layer (by its output tensor). onnxruntime names an NCHWc
    node after its output tensor, which is the output of the last op fused into the conv
    (an activation, a residual add), and other nodes by their node name."""
    targets = {layer.output for layer in layers}
    producer = {out: node for node in model.graph.node for out in node.output}
    owner = {}
    for tensor, node in producer.items():
        current, hops = tensor, 0
        while current not in targets and hops < 3 and node.op_type in _FUSED_AFTER and node.input:
            current, hops = node.input[0], hops + 1
            node = producer.get(current)
            if node is None:
                break
        if current in targets:
            owner[tensor] = current
    for node in model.graph.node:  # nodes the optimiser leaves alone keep their own names
        if node.name and node.output and node.output[0] in owner:
            owner.setdefault(node.name, owner[node.output[0]])
    return owner


# ---------------------------------------------------------------- one-layer models


def layer_model(layer: TargetLayer, input_shape, candidate: Candidate | None = None) -> onnx.ModelProto:
    """A model holding just ``layer`` (or the chain ``candidate`` rewrites it into), same names."""
    model = _dense_model(layer, input_shape)
    if candidate is None:
        return model
    editor = GraphEditor(model)
    REWRITES[candidate.method](editor, layer, placeholder_decomposition(layer, candidate))
    return editor.export()


def placeholder_decomposition(layer: TargetLayer, candidate: Candidate) -> Decomposition:
    """Factors of the right shapes (random: the values do not change the time) for the rewrite pass."""
    rng = np.random.default_rng(0)
    m, d = layer.weight.shape
    kh, kw = layer.kernel
    c_in = layer.in_channels

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    if candidate.method == "svd":
        (r,) = candidate.rank
        factors = LowRank(first=rand(r, d), second=rand(m, r))
    elif candidate.method == "tucker2":
        r_out, r_in = candidate.rank
        factors = Tucker2Factors(u_out=rand(m, r_out), core=rand(r_out, r_in, kh, kw), u_in=rand(c_in, r_in))
    elif candidate.method == "cp":
        (r,) = candidate.rank
        form = candidate.form or "4way"
        a, b = rand(m, r), rand(c_in, r)
        spatial = {"h": rand(kh, r), "v": rand(kw, r)} if form == "4way" else {"kernel": rand(r, kh, kw)}
        factors = CPFactors(form, a, b, **spatial)
    else:
        raise OnnxcompError(f"no latency model for method {candidate.method!r}")
    # A MatMul's bias correction is folded into the Add that follows it in real models: no extra node.
    bias = None if layer.op_type == "MatMul" else (None if layer.bias is None else layer.bias.astype(np.float64))
    return Decomposition(candidate.method, factors, bias, candidate.rank, candidate.params, int(candidate.macs),
                         None, None, {})


def _dense_model(layer: TargetLayer, input_shape) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    names = [layer.input, "W"] + (["B"] if layer.bias is not None else [])
    initializers = [onnx.numpy_helper.from_array(_stored_weight(layer, rng), "W")]
    if layer.bias is not None:
        initializers.append(onnx.numpy_helper.from_array(layer.bias.astype(np.float32), "B"))
    node = onnx.helper.make_node(layer.op_type, names, [layer.output], name=layer.name, **layer.attrs)
    graph = onnx.helper.make_graph(
        [node], "layer", [onnx.helper.make_tensor_value_info(layer.input, onnx.TensorProto.FLOAT, list(input_shape))],
        [onnx.helper.make_tensor_value_info(layer.output, onnx.TensorProto.FLOAT, None)], initializers,
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def _stored_weight(layer: TargetLayer, rng) -> np.ndarray:
    """The weight as the node stores it (layer.weight is the (out, in) matrix view)."""
    m, d = layer.weight.shape
    w = rng.standard_normal((m, d)).astype(np.float32)
    if layer.op_type == "Conv":
        kh, kw = layer.kernel
        return w.reshape(m, layer.in_channels, kh, kw)
    if layer.op_type == "Gemm":
        return w if layer.attrs.get("transB", 0) else np.ascontiguousarray(w.T)
    return np.ascontiguousarray(w.T)  # MatMul: x @ B, B is (in, out)


def _random_feed(name: str, shape) -> dict:
    return {name: np.random.default_rng(1).standard_normal(list(shape)).astype(np.float32)}


# ---------------------------------------------------------------- cache


def _key(layer: TargetLayer, input_shape, candidate: Candidate | None) -> str:
    """What determines the time: op, shapes, attributes and the chain (not names or weight values)."""
    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in sorted(layer.attrs.items())}
    text = json.dumps({
        "op": layer.op_type, "input": list(input_shape), "weight": list(layer.weight.shape),
        "kernel": list(layer.kernel), "bias": layer.bias is not None, "attrs": attrs,
        "chain": None if candidate is None else [candidate.method, list(candidate.rank), candidate.form],
    }, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def _read_cache(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache yet, or an unreadable one: measure again


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
