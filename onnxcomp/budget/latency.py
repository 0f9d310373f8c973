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

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import onnx

from ..decompose.factors import CPFactors, GroupedFactors, LowRank, Tucker2Factors
from ..decompose.solve import Decomposition
from ..errors import OnnxcompError
from ..io import write_json
from ..model import TargetLayer
from ..model.transposed import flip_transpose
from ..passes import rewrite_layer
from ..passes.common import GraphEditor
from ..runtime import Timer, random_feed
from .candidates import Candidate

CACHE_ENV = "ONNXCOMP_CACHE"
CACHE_FORMAT = "chain/dense ratios v1"  # bump when what is cached changes meaning


def default_cache_path() -> Path:
    """``$ONNXCOMP_CACHE/latency.json``, else ``~/.cache/onnxcomp/latency.json``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "onnxcomp")
    return Path(root) / "latency.json"


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
            self._ratios[key] = self.timer.ratio(chain, reference, random_feed(layer.input, input_shape))
            self.measured += 1
        return self._ratios[key]

    def _dense_entry(self, layer, input_shape):
        key = _key(layer, input_shape, None)
        if key not in self._dense:
            session = self.timer.session(layer_model(layer, input_shape))
            self._dense[key] = (self.timer.seconds(session, random_feed(layer.input, input_shape)), session)
            self.measured += 1
        return self._dense[key]

    def save(self) -> None:
        """Write the cache (atomically; a failure to write is not fatal: the timings are only a cache)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, self._all, "latency cache")
        except (OSError, OnnxcompError):
            pass


# ---------------------------------------------------------------- one-layer models


def layer_model(layer: TargetLayer, input_shape, candidate: Candidate | None = None) -> onnx.ModelProto:
    """A model holding just ``layer`` (or the chain ``candidate`` rewrites it into), same names."""
    model = _dense_model(layer, input_shape)
    if candidate is None:
        return model
    editor = GraphEditor(model)
    rewrite_layer(editor, layer, placeholder_decomposition(layer, candidate))
    return editor.export()


def placeholder_decomposition(layer: TargetLayer, candidate: Candidate) -> Decomposition:
    """Factors of the right shapes (random: the values do not change the time) for the rewrite pass."""
    factors = [_placeholder_factors(layer, candidate, np.random.default_rng(g)) for g in range(layer.groups)]
    # A MatMul's bias correction is folded into the Add that follows it in real models: no extra node.
    bias = None if layer.op_type == "MatMul" else (None if layer.bias is None else layer.bias.astype(np.float64))
    return Decomposition(candidate.method, factors[0] if layer.groups == 1 else GroupedFactors(tuple(factors)), bias,
                         candidate.rank, candidate.params, int(candidate.macs), None, None, {})


def _placeholder_factors(layer: TargetLayer, candidate: Candidate, rng):
    """Random factors of one group (the whole layer where it is not grouped)."""
    m, d = layer.weight.shape
    m //= layer.groups
    kernel = layer.kernel
    c_in = layer.in_channels

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    if candidate.method == "svd":
        (r,) = candidate.rank
        factors = LowRank(first=rand(r, d), second=rand(m, r))
    elif candidate.method == "tucker2":
        r_out, r_in = candidate.rank
        factors = Tucker2Factors(u_out=rand(m, r_out), core=rand(r_out, r_in, *kernel), u_in=rand(c_in, r_in))
    elif candidate.method == "cp":
        (r,) = candidate.rank
        form = candidate.form or "4way"
        a, b = rand(m, r), rand(c_in, r)
        spatial = {"h": rand(kernel[0], r), "v": rand(kernel[1], r)} if form == "4way" else {"kernel": rand(r, *kernel)}
        factors = CPFactors(form, a, b, **spatial)
    else:
        raise OnnxcompError(f"no latency model for method {candidate.method!r}")
    return factors


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
        return w.reshape(m, layer.in_channels, *layer.kernel)
    if layer.op_type == "ConvTranspose":  # stored (C_in, C_out, kh, kw)
        return flip_transpose(w.reshape(m, layer.in_channels, *layer.kernel))
    if layer.op_type == "Gemm":
        return w if layer.attrs.get("transB", 0) else np.ascontiguousarray(w.T)
    return np.ascontiguousarray(w.T)  # MatMul: x @ B, B is (in, out)


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
    except (OSError, ValueError):
        return {}  # no cache yet, or an unreadable one: measure again
    if not isinstance(data, dict):
        return {}
    # A damaged or hand-edited cache: what is not a section of ratios, or not a ratio, is measured again.
    return {section: {key: ratio for key, ratio in ratios.items() if _is_ratio(ratio)}
            for section, ratios in data.items() if isinstance(ratios, dict)}


def _is_ratio(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
