"""Run calibration data through onnxruntime and sum up each layer input's statistics.

For every statistic key (``TargetLayer.stats_key``: one tensor read one way) we
accumulate, in float64, the number of rows, the sum of the rows ``x`` and the
sum of ``x x^T`` (DESIGN.md §1, §3), batch by batch, never holding more than one
batch. Two ways to instrument the model:

- ``"outputs"``: the layer inputs become extra graph outputs; NumPy builds the
  rows (im2col for convs) in float64 blocks and adds ``[x, 1] [x, 1]^T`` with
  BLAS ``dsyrk`` (symmetric rank-k: half the multiply-adds of a GEMM; the
  trailing 1 gives the row sums in the same product).
- ``"graph"``: the reductions run inside the session (one-hot depthwise Conv to
  unfold patches, Transpose/Reshape to ``(d, rows)``, Cast to double, Gemm
  ``Z Z^T``, ReduceSum); only ``(d, d)`` Gram matrices and sums leave it.
  The product runs in double: a float32 Gram of one batch is already off by
  0.9e-6 (layer1, 10^5 rows) to 1.5e-6 (stem, 4*10^5 rows) relative to
  float64, against an acceptance of 1e-6.

Measured on the project's 2-core CPU machine (AMD EPYC Zen 4, onnxruntime 1.32
CPU EP, OpenBLAS), ResNet-50 at batch 32, best / median of 3 batches on a quiet
machine (benchmarks/calibration_throughput.py): "outputs" 2.91 / 2.63
samples/s = 74% / 67% of the Gram floor (dsyrk alone: 3.93 samples/s, 40
GMAC/s), "graph" 1.61 / 1.50 samples/s = 41%; plain inference 22.3 samples/s.
Reducing the same activations layer by layer, the in-graph reduction runs at
13-21 GMAC/s and the NumPy one at 37-47 (2.3x less time): onnxruntime's double
GEMM computes the whole product at ~37 GMAC/s where dsyrk computes the half it
needs at 43-53. So "auto" picks "outputs" on the CPU. (On a loaded machine
OpenBLAS' threads suffer more than onnxruntime's: both methods fell to ~1
sample/s there and "graph" was at times ahead.) On an accelerator "auto" picks
"graph", which keeps activations on the device instead of copying every layer
input to the host for CPU products; that choice is reasoned, not measured (no
GPU onnxruntime in the dev setup).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from scipy.linalg import blas
from tqdm import tqdm

from ..errors import OnnxcompError, first_line
from ..graph import ConvGeometry, TargetLayer, as_model, with_input_shapes
from .patches import channel_last_order, iter_patch_blocks
from .readers import count_samples, feed_samples, iter_feeds, model_inputs
from .stats import InputStats, Statistics

METHODS = ("auto", "outputs", "graph")
# Bytes of one float64 row block in the "outputs" reduction: what memory the
# reduction adds to one batch of activations. 64 MiB keeps dsyrk at full speed.
BLOCK_BYTES = 64 * 2**20
_PROTOBUF_LIMIT = 2**31 - 2**24  # a model this large must reach onnxruntime as a file with external data


def collect_statistics(
    model,
    layers: Sequence[TargetLayer],
    data,
    *,
    input_shapes: dict[str, list[int]] | None = None,
    batch_size: int = 32,
    providers: Sequence | None = None,
    progress: bool = True,
    method: str = "auto",
    total: int | None = None,
) -> Statistics:
    """Input statistics of ``layers`` on calibration ``data``, keyed by ``layer.stats_key``.

    ``model`` is a ModelProto (left unchanged) or a path; ``data`` anything
    :func:`~onnxcomp.calibration.readers.iter_feeds` accepts; ``input_shapes``
    fixes dynamic input dims (the data is checked against them);
    ``providers`` are onnxruntime execution providers (CPU by default);
    ``method`` is "outputs", "graph" or "auto" (see the module docstring);
    ``total``: samples expected, for the progress bar, when ``data`` cannot tell (an iterator).
    """
    method = choose_method(method, providers)
    model = with_input_shapes(as_model(model), input_shapes or {})
    targets = _targets(layers)
    _check_model(model, targets)
    if not targets:
        return Statistics()
    collector = (_OutputsCollector if method == "outputs" else _GraphCollector)(model, targets, providers)
    input_names = [i.name for i in model_inputs(model)]
    total = total if total is not None else count_samples(data, model)
    with tqdm(total=total, unit="sample", desc=f"calibration ({method})", disable=not progress) as bar:
        for index, feed in enumerate(iter_feeds(data, model, batch_size)):
            collector.add(feed, index)
            bar.update(feed_samples(feed, input_names))
    return collector.statistics()


def choose_method(method: str = "auto", providers: Sequence | None = None) -> str:
    """Resolve "auto" to the faster instrumentation for these providers (numbers in the module docstring)."""
    if method not in METHODS:
        raise OnnxcompError(f"unknown calibration method {method!r}: use one of {list(METHODS)}")
    if method != "auto":
        return method
    first = (providers or ["CPUExecutionProvider"])[0]
    first = first if isinstance(first, str) else first[0]  # (name, options) pairs are allowed too
    return "outputs" if first == "CPUExecutionProvider" else "graph"


# ---------------------------------------------------------------- targets


@dataclass(frozen=True)
class _Target:
    """One statistic to collect: the rows ``x`` of one tensor, read one way."""

    key: str
    tensor: str
    dim: int
    dtype: np.dtype  # the tensor's element type: Conv/Gemm/MatMul give it to the weight too
    conv: ConvGeometry | None
    trans_a: bool

    def rows_and_samples(self, shape: Sequence[int]) -> tuple[int, int]:
        """Rows ``x`` and batch samples in a tensor of this shape."""
        if self.conv is not None:
            out_h, out_w = self.conv.output_size(int(shape[2]), int(shape[3]))
            return int(shape[0]) * out_h * out_w, int(shape[0])
        if self.trans_a:
            return int(shape[1]), int(shape[1])
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        return rows, int(shape[0]) if len(shape) > 1 else 1

    def check_shape(self, shape: Sequence[int]) -> None:
        if self.conv is not None:
            kh, kw = self.conv.kernel
            ok = len(shape) == 4 and shape[1] * kh * kw == self.dim
        else:
            ok = len(shape) >= 1 and shape[0 if self.trans_a else -1] == self.dim
        if not ok:
            raise OnnxcompError(
                f"layer input {self.tensor!r} has shape {list(shape)} at run time, which does not give "
                f"rows of length {self.dim}: were the layers found on another model?"
            )


def _targets(layers: Sequence[TargetLayer]) -> list[_Target]:
    by_key: dict[str, _Target] = {}
    for layer in layers:
        by_key.setdefault(layer.stats_key, _Target(
            key=layer.stats_key, tensor=layer.input, dim=layer.in_features, dtype=np.dtype(layer.weight.dtype),
            conv=layer.conv, trans_a=layer.trans_a,
        ))
    return list(by_key.values())


def _check_model(model: onnx.ModelProto, targets: list[_Target]) -> None:
    if any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer):
        raise OnnxcompError(
            "the model's weights are external data that was not loaded: pass the model's path, "
            "or load it with onnx.load(path, load_external_data=True)"
        )
    known = {i.name for i in model.graph.input} | {o for node in model.graph.node for o in node.output}
    for target in targets:
        if target.tensor not in known:
            raise OnnxcompError(
                f"layer input {target.tensor!r} is not a tensor of this model: were the layers found on another model?"
            )


# ---------------------------------------------------------------- onnxruntime


class _Session:
    """An onnxruntime session whose failures read as one-line onnxcomp errors."""

    def __init__(self, model: onnx.ModelProto, providers: Sequence | None):
        options = ort.SessionOptions()
        # Idle spinning threads would steal the cores NumPy needs between runs (DESIGN.md §5).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Without the arena, memory freed after a batch goes back to the system: peak RSS on
        # ResNet-50 at batch 32 drops from 4.4 to 3.7 GB ("outputs") and 6.4 to 4.4 GB
        # ("graph"), at the same speed (11.5-12.4 s per batch either way for "outputs").
        options.enable_cpu_mem_arena = False
        options.log_severity_level = 3
        providers = list(providers or ["CPUExecutionProvider"])
        try:
            if _fits_protobuf(model):
                self.session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
            else:
                self.session = self._from_file(model, options, providers)
        except Exception as exc:
            raise OnnxcompError(f"onnxruntime cannot load the instrumented model: {first_line(exc)}") from None

    def _from_file(self, model: onnx.ModelProto, options, providers) -> ort.InferenceSession:
        # Kept until the session goes: onnxruntime may memory-map the external data.
        self.folder = tempfile.TemporaryDirectory(prefix="onnxcomp-calibration-")
        path = os.path.join(self.folder.name, "model.onnx")
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data")
        return ort.InferenceSession(path, options, providers=providers)

    def run(self, names: list[str], feed: dict[str, np.ndarray], index: int) -> list[np.ndarray]:
        try:
            return self.session.run(names, feed)
        except Exception as exc:
            raise OnnxcompError(f"onnxruntime failed on calibration batch {index}: {first_line(exc)}") from None


def _fits_protobuf(model: onnx.ModelProto) -> bool:
    try:
        return model.ByteSize() < _PROTOBUF_LIMIT
    except Exception:  # protobuf may refuse to even size a message over 2 GB
        return False


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


# ---------------------------------------------------------------- method "outputs"


class _OutputsCollector:
    """Layer inputs leave the session as extra outputs; NumPy/BLAS reduce them."""

    def __init__(self, model: onnx.ModelProto, targets: list[_Target], providers):
        fed = {i.name for i in model_inputs(model)}
        self.targets = targets
        # A tensor that is fed comes straight from the feed.
        self.fetch = list(dict.fromkeys(t.tensor for t in targets if t.tensor not in fed))
        self.session = _Session(_with_outputs(model, targets, self.fetch), providers)
        self.sums = {t.key: _GramSums(t.dim) for t in targets}
        self.buffer = _BlockBuffer(BLOCK_BYTES)

    def add(self, feed: dict[str, np.ndarray], index: int) -> None:
        values = dict(feed)
        if self.fetch:
            values.update(zip(self.fetch, self.session.run(self.fetch, feed, index)))
        for target in self.targets:
            tensor = values[target.tensor]
            target.check_shape(tensor.shape)
            rows, samples = target.rows_and_samples(tensor.shape)
            self.sums[target.key].add(_row_blocks(target, tensor, self.buffer.rows(target.dim)), rows, samples)

    def statistics(self) -> Statistics:
        # Pop as we go: the float64 sums of a ResNet-50 alone take ~1 GB, hold them once.
        return Statistics({t.key: self.sums.pop(t.key).result(t) for t in self.targets})


def _with_outputs(model: onnx.ModelProto, targets: list[_Target], fetch: list[str]) -> onnx.ModelProto:
    instrumented = _copy(model)
    existing = {o.name for o in instrumented.graph.output}
    dtypes = {t.tensor: t.dtype for t in targets}
    for name in fetch:
        if name not in existing:
            elem_type = helper.np_dtype_to_tensor_dtype(dtypes[name])
            instrumented.graph.output.append(helper.make_tensor_value_info(name, elem_type, None))
    return instrumented


class _BlockBuffer:
    """One reusable float64 buffer for row blocks, so blocks cost no fresh pages."""

    def __init__(self, nbytes: int):
        self.flat = np.empty(nbytes // 8)

    def rows(self, dim: int) -> np.ndarray:
        """A ``(max_rows, dim + 1)`` view whose last column is ones."""
        max_rows = max(1, self.flat.size // (dim + 1))
        if max_rows * (dim + 1) > self.flat.size:  # a row longer than the budget still fits one
            self.flat = np.empty(max_rows * (dim + 1))
        view = self.flat[: max_rows * (dim + 1)].reshape(max_rows, dim + 1)
        view[:, dim] = 1.0
        return view


def _row_blocks(target: _Target, tensor: np.ndarray, buffer: np.ndarray) -> Iterator[np.ndarray]:
    """Blocks ``[x, 1]`` of the rows of ``tensor``, written into ``buffer``."""
    if target.conv is not None:
        for block in iter_patch_blocks(tensor, target.conv, len(buffer), out=buffer):
            yield buffer[: len(block)]
        return
    rows = tensor.T if target.trans_a else tensor.reshape(-1, target.dim)
    for start in range(0, len(rows), len(buffer)):
        count = min(len(buffer), len(rows) - start)
        buffer[:count, :-1] = rows[start : start + count]
        yield buffer[:count]


class _GramSums:
    """Upper triangle of sum [x, 1] [x, 1]^T: the Gram matrix, the row sums and the count."""

    def __init__(self, dim: int):
        self.upper = np.zeros((dim + 1, dim + 1), order="F")
        self.rows = 0
        self.samples = 0

    def add(self, blocks: Iterator[np.ndarray], rows: int, samples: int) -> None:
        for block in blocks:
            # block.T is Fortran-ordered (dim+1, n): dsyrk reads it in place and
            # updates our Fortran-ordered upper triangle in place.
            self.upper = blas.dsyrk(1.0, block.T, beta=1.0, c=self.upper, overwrite_c=1)
        self.rows += rows
        self.samples += samples

    def result(self, target: _Target) -> InputStats:
        full = self.upper + np.triu(self.upper, 1).T  # dsyrk left the strict lower triangle at zero
        dim = target.dim
        gram, total = full[:dim, :dim], full[:dim, dim]
        if target.conv is not None:  # patches were built channel-last (i, j, c)
            order = channel_last_order(dim // int(np.prod(target.conv.kernel)), target.conv.kernel)
            gram, total = gram[np.ix_(order, order)], total[order]
        return InputStats(self.rows, self.samples, np.ascontiguousarray(total), np.ascontiguousarray(gram))


# ---------------------------------------------------------------- method "graph"


class _GraphCollector:
    """Gram matrices and sums are computed inside the session; only they leave it."""

    def __init__(self, model: onnx.ModelProto, targets: list[_Target], providers):
        self.targets = targets
        instrumented, self.outputs = _with_reductions(model, targets)
        self.session = _Session(instrumented, providers)
        self.names = [name for names in self.outputs.values() for name in names]
        self.stats = {t.key: InputStats.empty(t.dim) for t in targets}

    def add(self, feed: dict[str, np.ndarray], index: int) -> None:
        values = dict(zip(self.names, self.session.run(self.names, feed, index)))
        for target in self.targets:
            gram, total, shape = (values[name] for name in self.outputs[target.key])
            target.check_shape(shape)
            rows, samples = target.rows_and_samples(shape)
            self.stats[target.key].add_sums(rows, samples, total, gram)

    def statistics(self) -> Statistics:
        for stats in self.stats.values():
            # GEMM need not round (a, b) and (b, a) alike: make the sums exactly symmetric, in place.
            np.add(stats.gram, stats.gram.T, out=stats.gram)
            stats.gram *= 0.5
        return Statistics(self.stats)


def _with_reductions(model: onnx.ModelProto, targets: list[_Target]) -> tuple[onnx.ModelProto, dict]:
    """A copy of the model with outputs (gram, sum, input shape) per target."""
    instrumented = _copy(model)
    builder = _ReductionBuilder(instrumented)
    outputs = {target.key: builder.add(target, index) for index, target in enumerate(targets)}
    graph = instrumented.graph
    graph.node.extend(builder.nodes)
    graph.initializer.extend(builder.initializers)
    for gram, total, shape in outputs.values():
        graph.output.append(helper.make_tensor_value_info(gram, TensorProto.DOUBLE, None))
        graph.output.append(helper.make_tensor_value_info(total, TensorProto.DOUBLE, None))
        graph.output.append(helper.make_tensor_value_info(shape, TensorProto.INT64, None))
    return instrumented, outputs


class _ReductionBuilder:
    """Nodes that turn a layer input into its Gram matrix and row sums, in double."""

    def __init__(self, model: onnx.ModelProto):
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        if self.opset < 11:
            raise OnnxcompError(f"calibration method 'graph' needs opset >= 11 (model has {self.opset}): use 'outputs'")
        graph = model.graph
        names = {n for node in graph.node for n in [*node.input, *node.output, node.name]}
        names |= {v.name for v in [*graph.input, *graph.output, *graph.initializer]}
        self.prefix = "onnxcomp_stats"
        while any(name.startswith(self.prefix) for name in names):
            self.prefix += "_"
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def add(self, target: _Target, index: int) -> tuple[str, str, str]:
        name = f"{self.prefix}/{index}"
        if target.conv is not None:
            columns, by_columns = self._patch_columns(target, name), True  # (d, rows)
        elif target.trans_a:
            columns, by_columns = target.tensor, True  # Gemm transA: A is (d, rows) already
        else:
            columns, by_columns = self._node("Reshape", [target.tensor, self._ints(f"{name}/shape", [-1, target.dim])]), False
        z = columns if target.dtype == np.float64 else self._node("Cast", [columns], to=TensorProto.DOUBLE)
        # Z (d, rows): Z Z^T and sums along axis 1; Z (rows, d): Z^T Z and sums along axis 0.
        gram = self._node("Gemm", [z, z], name=f"{name}/gram", transA=int(not by_columns), transB=int(by_columns))
        total = self._reduce_sum(z, axis=1 if by_columns else 0, name=f"{name}/sum")
        shape = self._node("Shape", [target.tensor], name=f"{name}/input_shape")
        return gram, total, shape

    def _patch_columns(self, target: _Target, name: str) -> str:
        """(d, rows) patch matrix of a conv input, rows ordered (c, i, j)."""
        geometry = target.conv
        kh, kw = geometry.kernel
        channels = target.dim // (kh * kw)
        x = target.tensor
        if target.dtype != np.float32:  # onnxruntime's CPU Conv is float32-only
            x = self._node("Cast", [x], to=TensorProto.FLOAT)
        trivial = (kh, kw) == (1, 1) and geometry.strides == (1, 1) and not any(geometry.resolve_pads(1, 1))
        patches = x if trivial else self._unfold(x, geometry, channels, name)  # (N, d, Ho, Wo)
        per_sample = self._node("Reshape", [patches, self._ints(f"{name}/per_sample", [0, target.dim, -1])])
        by_channel = self._node("Transpose", [per_sample], perm=[1, 0, 2])
        return self._node("Reshape", [by_channel, self._ints(f"{name}/columns", [target.dim, -1])])

    def _unfold(self, x: str, geometry: ConvGeometry, channels: int, name: str) -> str:
        """Depthwise Conv with one-hot kernels: output channel c*kh*kw + i*kw + j is tap (i, j) of channel c.

        Depthwise costs kh*kw multiply-adds per output value, where a dense
        one-hot kernel would cost C*kh*kw, as much as the Gram product itself
        (layer1 3x3 at batch 32: 15 ms against 304 ms).
        """
        kh, kw = geometry.kernel
        taps = np.eye(kh * kw, dtype=np.float32).reshape(kh * kw, 1, kh, kw)
        weight = f"{name}/one_hot"
        self.initializers.append(numpy_helper.from_array(np.tile(taps, (channels, 1, 1, 1)), weight))
        where = {"auto_pad": geometry.auto_pad} if geometry.auto_pad != "NOTSET" else {"pads": list(geometry.pads)}
        return self._node(
            "Conv", [x, weight], group=channels, kernel_shape=[kh, kw],
            strides=list(geometry.strides), dilations=list(geometry.dilations), **where,
        )

    def _reduce_sum(self, x: str, axis: int, name: str) -> str:
        if self.opset >= 13:  # axes moved from an attribute to an input in opset 13
            return self._node("ReduceSum", [x, self._ints(f"{name}/axes", [axis])], name=name, keepdims=0)
        return self._node("ReduceSum", [x], name=name, axes=[axis], keepdims=0)

    def _ints(self, name: str, values: list[int]) -> str:
        self.initializers.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    def _node(self, op_type: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        output = name or f"{self.prefix}/node{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output
