"""Every onnxruntime session onnxcomp opens, and how it times models.

Sessions (:func:`make_session`) never spin when idle: in one process, a spinning
idle session steals the cores of the other one (an original-vs-itself timing read
anywhere from 0.67 to 1.30 with spinning on). Models too large for one protobuf
message reach onnxruntime as a file with external data.

Timing (:class:`Timer`) is the seam that tests replace with a deterministic
machine: the latency budget asks it for one model's time, for the ratio of two
models timed in interleaved samples, and for a per-node profile.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from .errors import OnnxcompError, first_line
from .model.counting import chain_nodes

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# A model this large must reach onnxruntime as a file with external data.
PROTOBUF_LIMIT = 2**31 - 2**24


def execution_providers(provider: str) -> list[str]:
    """onnxruntime's provider list for ``"cpu"`` or ``"cuda"``, or a one-line error if this install lacks it."""
    if provider not in PROVIDERS:
        raise OnnxcompError(f"unknown provider {provider!r}: use one of {sorted(PROVIDERS)}")
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise OnnxcompError(
            f"--provider cuda: this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider "
            f"(it has {', '.join(available)}); install onnxruntime-gpu instead of onnxruntime"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class Session(ort.InferenceSession):
    """An InferenceSession that keeps the folder of a large model's external data alive with it."""

    folder: tempfile.TemporaryDirectory | None = None


def make_session(model: onnx.ModelProto | str | os.PathLike, providers=None, threads: int | None = None, *,
                 profile_prefix: str | None = None, memory_arena: bool = True, quiet: bool = False,
                 via_file: bool | None = None) -> Session:
    """A session that does not spin when idle.

    ``profile_prefix``: write onnxruntime's profile there. ``memory_arena=False`` gives
    memory freed after a run back to the system (calibration: peak RSS on ResNet-50 at
    batch 32 fell from 4.4 to 3.7 GB at the same speed). ``quiet``: errors only in the log.
    ``via_file``: hand a ModelProto to onnxruntime as a file with external data (default:
    only when it is too large for one protobuf message).
    """
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    options.enable_cpu_mem_arena = memory_arena
    if quiet:
        options.log_severity_level = 3
    providers = list(providers or ["CPUExecutionProvider"])
    if not isinstance(model, onnx.ModelProto):
        return Session(str(model), options, providers=providers)
    if not (via_file if via_file is not None else not fits_protobuf(model)):
        return Session(model.SerializeToString(), options, providers=providers)
    # Kept as long as the session: onnxruntime may memory-map the external data.
    folder = tempfile.TemporaryDirectory(prefix="onnxcomp-session-")
    path = os.path.join(folder.name, "model.onnx")
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data")
    session = Session(path, options, providers=providers)
    session.folder = folder
    return session


def open_session(model, what: str, providers=None, threads: int | None = None, **options) -> Session:
    """:func:`make_session` for a model the user gave: a failure to load it is a one-line error,
    and so is a GPU provider that silently fell back to the CPU."""
    providers = list(providers or ["CPUExecutionProvider"])
    try:
        session = make_session(model, providers, threads, **options)
    except Exception as exc:
        raise OnnxcompError(f"onnxruntime cannot load {what}: {first_line(exc)}") from None
    if providers[0] != "CPUExecutionProvider" and providers[0] not in session.get_providers():
        raise OnnxcompError(
            f"onnxruntime fell back to {session.get_providers()} for {what}: "
            f"{providers[0]} failed to start (check the CUDA/cuDNN libraries)"
        )
    return session


def fits_protobuf(model: onnx.ModelProto) -> bool:
    try:
        return model.ByteSize() < PROTOBUF_LIMIT
    except Exception:  # protobuf may refuse to even size a message over 2 GB
        return False


# ---------------------------------------------------------------- timing


@dataclass
class Profile:
    """A model's time as onnxruntime's profiler sees it: each node's fastest kernel time over a
    few runs (robust to a busy machine: a node's ~1 ms is often undisturbed, a model's 100 ms never is)."""

    total: float  # seconds: the sum over all nodes
    layers: dict[str, float]  # target layer output tensor -> seconds of the node(s) computing it


@dataclass
class Timer:
    """How models are timed: warm-up runs, then samples of at least ``min_seconds`` each."""

    provider: str = "cpu"
    threads: int | None = None
    warmup: int = 3
    repeats: int = 9  # samples of one model (its time: the fastest)
    pairs: int = 15  # interleaved pairs of a ratio (its value: the fastest sample of each)
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

    def compare(self, model, reference, feed: dict, pairs: int | None = None) -> tuple[float, float, float]:
        """(time(model) / time(reference), reference seconds, model seconds).

        The two are sampled in interleaved pairs, so both see the same stretches of
        background load, and each time is its fastest sample: when other processes hold
        the cores, most samples are slowed at random, the fastest are the least disturbed
        (more robust than a median of per-pair ratios when the machine is oversubscribed).
        """
        sessions = [self.session(reference), self.session(model)]
        runs = [self._runs_per_sample(s, feed) for s in sessions]
        times = ([], [])
        for i in range(pairs or self.pairs):
            for k in ((0, 1) if i % 2 == 0 else (1, 0)):
                times[k].append(self._sample(sessions[k], feed, runs[k]))
        fastest = [min(t) for t in times]
        return fastest[1] / max(fastest[0], 1e-12), fastest[0], fastest[1]

    def whole_model_ratio(self, original, compressed, feed: dict) -> tuple[float, float, float]:
        """(compressed / original time, original seconds, compressed seconds) of two whole models,
        by :meth:`compare` with at least 21 pairs (``onnxcomp bench`` reports the median per-pair ratio too)."""
        return self.compare(compressed, original, feed, pairs=max(self.pairs, 21))

    def profile(self, model: onnx.ModelProto, feed: dict, layers=(), runs: int = 8) -> Profile:
        """Per-node fastest kernel times of ``model`` on ``feed`` and the target ``layers``' share."""
        with tempfile.TemporaryDirectory() as folder:
            session = make_session(model, execution_providers(self.provider), self.threads,
                                   profile_prefix=os.path.join(folder, "profile"))
            for _ in range(self.warmup + runs):
                session.run(None, feed)
            with open(session.end_profiling()) as f:
                events = json.load(f)
        return _profile_of(events, model, layers)

    def machine(self) -> str:
        """The cache key of this machine and setting: timings are only valid where they were taken."""
        return (f"{_cpu_name()} | {os.cpu_count()} cpus | onnxruntime {ort.__version__} | "
                f"{self.provider} | threads {self.threads or 'default'}")

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


# Ops onnxruntime fuses into a preceding Conv/Gemm/MatMul (the fused node is named after the last one).
_FUSED_AFTER = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Add", "Sum",
                "BatchNormalization", "Mul", "Identity"}


def _profile_of(events: list, model: onnx.ModelProto, layers) -> Profile:
    fastest: dict[str, float] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            base = name[: -len("_kernel_time")]
            fastest[base] = min(fastest.get(base, float("inf")), event["dur"] * 1e-6)
    owner = _layer_of_node(model, layers)
    shares: dict[str, float] = {}
    for base, seconds in fastest.items():
        # NCHWc nodes are named "<output>_nchwc", fusions of a Gemm/MatMul "fused <node name>" or
        # "<node name>/<the fusion>/" (MatmulTransposeFusion, MatMulScaleFusion)
        fusion = base[:-1].rsplit("/", 1)[0] if base.endswith("/") else base
        layer = next((owner[n] for n in (base, base.removesuffix("_nchwc"), base.removeprefix("fused "), fusion)
                      if n in owner), None)
        if layer is not None:
            shares[layer] = shares.get(layer, 0.0) + seconds
    return Profile(sum(fastest.values()), shares)


def _layer_of_node(model: onnx.ModelProto, layers) -> dict[str, str]:
    """Name in a profile -> the target layer (by its output tensor). onnxruntime names an NCHWc
    node after its output tensor, which is the output of the last op fused into the conv
    (an activation, a residual add), and other nodes by their node name. In a rewritten model
    every node of a layer's chain (the nodes from the layer's input to its output) is the layer's."""
    producer = {out: node for node in model.graph.node for out in node.output}
    targets = {}  # tensor computed by a target layer (its chain's intermediate tensors too) -> the layer's output
    for layer in layers:
        targets[layer.output] = layer.output
        for node in chain_nodes(model, layer.input, layer.output, producer):
            targets.setdefault(node.output[0], layer.output)
    owner = {}
    for tensor, node in producer.items():
        current, hops = tensor, 0
        while current not in targets and hops < 3 and node.op_type in _FUSED_AFTER and node.input:
            current, hops = node.input[0], hops + 1
            node = producer.get(current)
            if node is None:
                break
        if current in targets:
            owner[tensor] = targets[current]
    for node in model.graph.node:  # nodes the optimiser leaves alone keep their own names
        if node.name and node.output and node.output[0] in owner:
            owner.setdefault(node.name, owner[node.output[0]])
    return owner


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def random_feed(name: str, shape, seed: int = 1) -> dict:
    """A float32 feed of standard normal values (timings do not depend on the values)."""
    return {name: np.random.default_rng(seed).standard_normal(list(shape)).astype(np.float32)}


def fixed_batch(session, names=None) -> int | None:
    """The batch size a session's inputs (those in ``names``, default all) fix as their first dimension."""
    firsts = {tuple(i.shape[:1]) for i in session.get_inputs() if names is None or i.name in names}
    if len(firsts) != 1:
        return None
    (first,) = firsts
    return first[0] if first and isinstance(first[0], int) and first[0] > 0 else None


def feed_size(feed: dict) -> int:
    """How many samples a feed holds: the leading dimension of its first array (1 for a scalar)."""
    first = np.asarray(next(iter(feed.values())))
    return int(first.shape[0]) if first.ndim else 1


def repeated(feed: dict, count: int, start: int = 0) -> dict:
    """Samples ``start`` to ``start + count`` of every array, contiguous, wrapping around to the first
    samples where the feed holds fewer (a batch topped up to a model's fixed batch size)."""
    index = np.arange(start, start + count) % feed_size(feed)
    return {name: np.ascontiguousarray(np.asarray(value)[index]) for name, value in feed.items()}


def run_arrays(session, names, feed: dict) -> list[np.ndarray]:
    """``session.run`` with every output as one array (:func:`output_array`): what comparisons take."""
    return [output_array(value) for value in session.run(names, feed)]


def output_array(value) -> np.ndarray:
    """A model output as one array, samples first where its parts have them: a tensor as it is; a
    sequence of tensors (``SequenceConstruct``) as its elements stacked on axis 1 when they share
    one shape [N, ...] ([N, elements, ...]: never taken for class scores), side by side per sample
    when they share only N ([N, their sizes summed]), else all flattened into one vector; a sequence
    of maps (``ZipMap``) as [N, keys] by sorted key; an optional without a value as an empty array."""
    if value is None:
        return np.zeros(0, dtype=np.float32)
    if not isinstance(value, list):
        return np.asarray(value)
    if value and all(isinstance(item, dict) for item in value):
        return np.array([[item[key] for key in sorted(item)] for item in value])
    parts = [np.asarray(item) for item in value]
    if not parts:
        return np.zeros(0, dtype=np.float32)
    if all(p.ndim for p in parts) and len({p.shape for p in parts}) == 1:
        return np.stack(parts, axis=1)
    if all(p.ndim for p in parts) and len({p.shape[0] for p in parts}) == 1:
        return np.concatenate([p.reshape(p.shape[0], -1) for p in parts], axis=1)
    return np.concatenate([p.ravel() for p in parts])


def run_in_batches(session, feed: dict, batch: int = 32) -> list[np.ndarray]:
    """The session's outputs on all samples of ``feed`` (axis 0), run ``batch`` samples at a time.

    A model with a fixed batch size runs at that size; the last batch is topped up with the
    first samples and their output rows are dropped."""
    samples = feed_size(feed)
    fixed = fixed_batch(session)
    size = fixed or batch
    parts: list[list[np.ndarray]] = []
    for start in range(0, samples, size):
        real = min(size, samples - start)
        run = fixed or real
        outputs = run_arrays(session, None, repeated(feed, run, start))
        parts.append([out[:real] if out.ndim and out.shape[0] == run else out for out in outputs])
    return [np.concatenate([p[i] for p in parts], axis=0) if parts[0][i].ndim else parts[0][i]
            for i in range(len(parts[0]))]
