"""Run calibration data through onnxruntime and sum up each layer input's statistics.

For every statistic key (``TargetLayer.stats_key``: one tensor read one way) we
accumulate, in float64, the number of rows, the sum of the rows ``x`` and the
sum of ``x x^T`` (DESIGN.md §1, §3), batch by batch, never holding more than one
batch. The layer inputs become extra graph outputs (lifted out of If/Loop/Scan bodies
where they are in one: ``model/subgraphs.py``). Stride-1 kxk convs are
reduced by shifted products of their input (``shifts.py``: 13 C x C GEMMs per
pixel for a 3x3 instead of the patch Gram's 81/2 C^2, no im2col). Everything
else goes through rows: NumPy builds them (im2col for convs) in blocks and adds
``[x, 1] [x, 1]^T`` with BLAS ``syrk`` (symmetric rank-k: half the
multiply-adds of a GEMM; the trailing 1 gives the row sums in the same product).

Precision (``precision=``, ``--precision``): by default each block of at most
``FLOAT32_BLOCK_ROWS`` rows is multiplied in float32 (``ssyrk``, ``sgemm``) and
its product added into the float64 sums, so rounding stays that of one block and
never grows with the data; "float64" multiplies in double throughout. The
calibration session runs without onnxruntime's memory arena (a lower peak RSS on
large models, at some speed on a shared machine). Throughput and precision, measured
against the floor of the products alone: docs/RESULTS.md, "Calibration throughput
and precision".
"""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper
from scipy.linalg import blas
from tqdm import tqdm

from ..config import Precision
from ..errors import OnnxcompError, first_line
from ..model import ConvGeometry, TargetLayer, as_model, fingerprint, with_input_shapes
from ..model.subgraphs import lift, stacked_levels
from ..model.transposed import TransposedGeometry
from ..runtime import feed_size, open_session, repeated
from ..threads import available_cores, available_memory, blas_threads, thread_count
from .patches import channel_last_order, iter_patch_blocks
from .readers import count_samples, feed_samples, fixed_batch, iter_feeds, model_inputs
from .rowmask import RowMask, check_mask, kept_rows
from .shifts import ShiftPlan, shift_plan
from .stats import InputStats, Statistics

# Bytes of one row block in the "outputs" reduction: what memory the
# reduction adds to one batch of activations. 64 MiB keeps dsyrk at full speed.
BLOCK_BYTES = 64 * 2**20
# Most rows of one float32 block: each block's Gram is summed in float32 before it joins the float64
# sum, which grows its rounding with the rows (measured on YOLO-shaped activations: 1.6e-8 to 5.6e-8
# relative at 1024 rows, 3e-8 to 1.6e-7 at 16384, up to 3e-7 for a whole batch of 10^5-10^6 rows); 8192
# are as fast as larger blocks for ssyrk on this machine (d = 145-577).
FLOAT32_BLOCK_ROWS = 8192


def collect_statistics(
    model,
    layers: Sequence[TargetLayer],
    data,
    *,
    input_shapes: dict[str, list[int]] | None = None,
    batch_size: int = 32,
    providers: Sequence | None = None,
    progress: bool = True,
    total: int | None = None,
    block_bytes: int = BLOCK_BYTES,
    row_mask: RowMask | None = None,
    threads: int | None = None,
    precision: str = "float32",
    laid_out: bool = False,
    ray: str | None = None,
    products_xp=None,
) -> Statistics:
    """Input statistics of ``layers`` on calibration ``data``, keyed by ``layer.stats_key``.

    ``model`` is a ModelProto (left unchanged) or a path; ``data`` anything
    :func:`~onnxcomp.calibration.readers.iter_feeds` accepts; ``input_shapes``
    fixes dynamic input dims (the data is checked against them);
    ``providers`` are onnxruntime execution providers (CPU by default);
    ``total``: samples expected, for the progress bar, when ``data`` cannot tell (an iterator);
    ``block_bytes``: the size of one row block of the reduction;
    ``precision``: of the products, ``"float32"`` (each block's products in float32, summed in
    float64 across blocks and batches; float64 and float16 activations too) or ``"float64"``;
    ``row_mask``: the model input whose zeros mark token rows to leave out (padding), see
    :mod:`onnxcomp.calibration.rowmask`; ``threads``: onnxruntime's intra-op threads (default: its own choice);
    ``laid_out``: ``data`` is batches :func:`~onnxcomp.calibration.readers.iter_feeds` gave for ``model`` before;
    ``ray``: sum the batches on the actors of a Ray cluster (``"local"`` or an address; ``distributed.py``);
    ``products_xp``: the array module the Gram products run in (cupy: on the GPU, see :class:`_DeviceGramSums`;
    None: NumPy/BLAS on the host).
    """
    dtype = np.dtype(Precision.parse(precision, "--precision").value)
    model = as_model(model)
    targets = _targets(layers)
    _check_model(model, targets)
    identity = fingerprint(model)
    model = with_input_shapes(model, input_shapes or {})
    if not targets:
        return Statistics(model=identity)
    if ray is not None:
        from .distributed import RayCollector

        collector = RayCollector(ray, model, targets, block_bytes, dtype, row_mask)
    else:
        collector = _Collector(model, targets, providers, block_bytes, dtype, row_mask, threads, products_xp)
    input_names = [i.name for i in model_inputs(model)]
    total = total if total is not None else count_samples(data, model)
    with tqdm(total=total, unit="sample", desc="calibration", disable=not progress) as bar:
        batches = iter_feeds(data, model, batch_size, laid_out=laid_out)
        if isinstance(collector, _Collector) and collector.workers.count < available_cores():
            _overlapped(collector, batches, lambda feed: bar.update(feed_samples(feed, input_names)))
        else:
            for index, feed in enumerate(batches):
                collector.add(feed, index)
                bar.update(feed_samples(feed, input_names))
    statistics = collector.statistics()
    statistics.model = identity
    return statistics


def _overlapped(collector: "_Collector", batches, done) -> None:
    """Each batch run through onnxruntime while the previous one's products are summed (in batch
    order, so the sums are those of a run one after the other), when two batches of layer inputs fit
    in an eighth of the memory; else one after the other. Only where the products leave cores idle
    (fewer workers than cores): YOLOv8n-shaped, 128 images, 2 cores, 1 worker 13.75 -> 10.85 s, but
    2 workers 8.18 -> 9.02 s, onnxruntime's threads and the workers then fighting for the cores."""
    budget = available_memory() / 8  # read once: two batches of layer inputs must fit in it

    def finish(item) -> None:
        collector.reduce(*item)
        done(item[0])

    pending = None  # (feed, values, index) of the batch waiting for its products
    with ThreadPoolExecutor(1) as runner:
        for index, feed in enumerate(batches):
            if pending is not None and 2 * sum(np.asarray(v).nbytes for v in pending[1].values()) < budget:
                running = runner.submit(collector.run, feed, index)
                finish(pending)
                values = running.result()
            else:
                if pending is not None:
                    finish(pending)
                values = collector.run(feed, index)
            pending = (feed, values, index)
    if pending is not None:
        finish(pending)


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
    transposed: TransposedGeometry | None = None  # a ConvTranspose: patches of its stuffed input
    channels: tuple[int, int] | None = None  # a grouped conv's group reads these input channels only
    scope: tuple = ()  # the If/Loop/Scan body the tensor is read in (model/subgraphs.py); () : the main graph

    def read(self, tensor: np.ndarray) -> np.ndarray:
        """The part of the layer input this statistic's rows come from (a view)."""
        return tensor if self.channels is None else tensor[:, self.channels[0] : self.channels[1]]

    def _channels(self, shape: Sequence[int]) -> int:
        if self.channels is None:
            return int(shape[1])
        return self.channels[1] - self.channels[0] if shape[1] >= self.channels[1] else -1

    def rows_and_samples(self, shape: Sequence[int]) -> tuple[int, int]:
        """Rows ``x`` and batch samples in a tensor of this shape."""
        if self.conv is not None:
            positions = np.prod(self.conv.output_size(*(int(v) for v in shape[2:])), dtype=np.int64)
            return int(shape[0]) * int(positions), int(shape[0])
        if self.trans_a:
            return int(shape[1]), int(shape[1])
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        return rows, int(shape[0]) if len(shape) > 1 else 1

    def check_shape(self, shape: Sequence[int]) -> None:
        if self.conv is not None:
            ok = len(shape) == 2 + self.conv.rank and self._channels(shape) * np.prod(self.conv.kernel) == self.dim
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
        for group, key in enumerate(layer.stats_keys):
            c = layer.in_channels
            by_key.setdefault(key, _Target(
                key=key, tensor=layer.input, dim=layer.in_features, dtype=np.dtype(layer.weight.dtype),
                conv=layer.conv, trans_a=layer.trans_a, transposed=layer.transposed,
                channels=None if layer.groups == 1 else (group * c, (group + 1) * c), scope=layer.scope,
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
        if target.tensor not in known and not target.scope:
            raise OnnxcompError(
                f"layer input {target.tensor!r} is not a tensor of this model: were the layers found on another model?"
            )


# ---------------------------------------------------------------- onnxruntime


class _Session:
    """The instrumented model's session; its failures read as one-line onnxcomp errors."""

    def __init__(self, model: onnx.ModelProto, providers: Sequence | None, threads: int | None = None):
        # Without the memory arena, memory freed after a batch goes back to the system: peak RSS on
        # ResNet-50 at batch 32 fell from 4.4 to 3.7 GB at the same speed.
        self.session = open_session(model, "the instrumented model", providers, threads, memory_arena=False,
                                    quiet=True)

    def run(self, names: list[str], feed: dict[str, np.ndarray], index: int) -> list[np.ndarray]:
        try:
            return self.session.run(names, feed)
        except Exception as exc:
            raise OnnxcompError(f"onnxruntime failed on calibration batch {index}: {first_line(exc)}") from None


# ---------------------------------------------------------------- reduction


class _Collector:
    """Layer inputs leave the session as extra outputs; NumPy/BLAS reduce them, one layer input per
    worker at a time (``threads`` workers, one BLAS thread each: the sums of each statistic are added
    in the same order whatever the number of workers, so they are the same to the bit)."""

    def __init__(self, model: onnx.ModelProto, targets: list[_Target], providers, block_bytes: int,
                 dtype=np.float64, row_mask: RowMask | None = None, threads: int | None = None, products_xp=None):
        inputs = model_inputs(model)
        self.row_mask = row_mask
        self.masked = _MaskedRows()
        fed = {i.name for i in inputs}
        self.fixed = fixed_batch(inputs)
        # Largest first: workers that take the next layer input as they finish end close together.
        self.targets = sorted(targets, key=lambda t: -t.dim)
        self.order = targets  # statistics come out in the layers' order
        # A tensor that is fed comes straight from the feed; one inside a body is lifted out of it.
        instrumented, self.source = _instrumented(model, targets, fed)
        self.fetch = list(dict.fromkeys(name for name in self.source.values() if name not in fed))
        self.stacked = {self.source[t.key]: stacked_levels(t.scope) for t in targets}
        self.session = _Session(instrumented, providers, threads)
        self.device = products_xp is not None
        self.sums = {t.key: _DeviceGramSums(t.dim, products_xp) if self.device else _GramSums(t.dim, dtype)
                     for t in targets}
        self.block_bytes, self.dtype = block_bytes, dtype
        # One worker on a device: its stream runs the products one after the other anyway.
        self.workers = _Workers(1 if self.device else min(thread_count(threads), len(targets)), block_bytes, dtype)

    def add(self, feed: dict[str, np.ndarray], index: int) -> None:
        self.reduce(feed, self.run(feed, index), index)

    def run(self, feed: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
        """The layer inputs of one batch: the feed's and the instrumented session's outputs."""
        values = dict(feed)
        if self.fetch:
            real = feed_size(feed)
            padded = self.fixed is not None and real < self.fixed
            run_feed = repeated(feed, self.fixed) if padded else feed  # topped up by repeating samples
            fetched = self.session.run(self.fetch, run_feed, index)
            if padded:  # drop the rows of the repeated samples (where the batch is the leading axis)
                fetched = [_first_samples(t, real, self.fixed, self.stacked[name]) for name, t in zip(self.fetch, fetched)]
            _check_finite(self.fetch, fetched, index)
            values.update(zip(self.fetch, fetched))
        return values

    def reduce(self, feed: dict[str, np.ndarray], values: dict[str, np.ndarray], index: int) -> None:
        """Add one batch's layer inputs (:meth:`run`) to the sums."""
        mask = check_mask(feed[self.row_mask.input], self.row_mask.input, index) if self.row_mask else None
        work = [(target, values[self.source[target.key]]) for target in self.targets]
        for target, masked in zip(self.targets, self.workers.map(lambda item, state: self._reduce(*item, mask, state),
                                                                   work)):
            if masked is not None:
                self.masked.add(target.key, *masked)

    def _reduce(self, target: _Target, value: np.ndarray, mask, state: "_WorkerState"):
        """Add one batch of one layer input to its sums; (rows kept, rows seen) where a row mask applied."""
        tensor, per_sample = _iterations_as_rows(value, self.stacked[self.source[target.key]])
        if tensor is None:  # the body did not run on this batch (the other If branch, no iteration)
            return None
        if target.transposed is not None:  # a ConvTranspose: its equivalent conv's input
            tensor = target.transposed.stuffed(tensor)
        target.check_shape(tensor.shape)
        tensor = target.read(tensor)
        rows, samples = target.rows_and_samples(tensor.shape)
        samples //= per_sample
        buffer = state.buffer_for(tensor, rows)
        plan = shift_plan(tensor.shape, target.conv) if target.conv is not None and not self.device else None
        if plan is not None:  # a stride-1 conv: shifted products, no patches (shifts.py)
            self.sums[target.key].add_shifted(plan, tensor, buffer, rows, samples)
            return None
        keep = None if target.conv is not None or target.trans_a else kept_rows(tensor.shape, mask)
        masked = None
        if keep is not None:
            rows = int(np.count_nonzero(keep))
            masked = (rows, keep.size)
        blocks = _row_blocks(target, tensor, buffer.rows(target.dim), keep)
        self.sums[target.key].add(blocks, rows, samples, single=buffer.dtype == np.float32, scratch=state.scratch)
        return masked

    def statistics(self) -> Statistics:
        self.workers.close()
        # Pop as we go: the float64 sums of a ResNet-50 alone take ~1 GB, hold them once.
        statistics = Statistics({t.key: self.sums.pop(t.key).result(t) for t in self.order})
        statistics.row_mask = self.masked.summary(self.row_mask)
        return statistics


class _WorkerState:
    """What one reducing worker reuses from batch to batch: its block buffers and float32 scratch Grams."""

    def __init__(self, block_bytes: int, dtype):
        self.buffer = _BlockBuffer(block_bytes, dtype)
        self.wide: _BlockBuffer | None = None  # float64 blocks for activations too large for float32 sums
        self.scratch: dict = {}  # dim + 1 -> a float32 block Gram

    def buffer_for(self, tensor: np.ndarray, rows: int) -> "_BlockBuffer":
        """The block buffer for this tensor's products: float64 where float32 sums of its products could
        overflow (activations of 1e17 and more, as deep random-weight models make), else the chosen one."""
        if self.buffer.dtype != np.float32 or not tensor.size:
            return self.buffer
        peak = float(np.max(np.abs(tensor)))
        if peak * peak * max(rows, 1) < FLOAT32_SAFE:
            return self.buffer
        if self.wide is None:
            self.wide = _BlockBuffer(self.buffer.flat.nbytes, np.float64)
        return self.wide


class _Workers:
    """``count`` threads, each with its own :class:`_WorkerState`, taking items as they finish."""

    def __init__(self, count: int, block_bytes: int, dtype):
        self.count = max(1, count)
        self.states = queue.SimpleQueue()
        for _ in range(self.count):
            self.states.put(_WorkerState(block_bytes, dtype))
        self.pool = ThreadPoolExecutor(self.count) if self.count > 1 else None

    def map(self, function, items: list) -> list:
        if self.pool is None:
            state = self.states.get()
            try:
                return [function(item, state) for item in items]
            finally:
                self.states.put(state)

        def run(item):
            state = self.states.get()  # a free state: no two workers share a buffer
            try:
                return function(item, state)
            finally:
                self.states.put(state)

        with blas_threads(1):
            return list(self.pool.map(run, items))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


class _MaskedRows:
    """How many token rows the row mask kept, over the layer inputs it applied to."""

    def __init__(self):
        self.keys: set[str] = set()
        self.kept = self.total = 0

    def add(self, key: str, kept: int, total: int) -> None:
        self.keys.add(key)
        self.kept += kept
        self.total += total

    def summary(self, row_mask: RowMask | None) -> dict | None:
        if row_mask is None:
            return None
        return {"input": row_mask.input, "how": row_mask.how, "layer_inputs": len(self.keys),
                "rows_kept": self.kept, "rows_seen": self.total}


def _check_finite(names: list[str], tensors: list[np.ndarray], index: int) -> None:
    """Statistics of NaN or Inf activations are NaN: say where they first appear (the data itself
    was checked by the reader, so the model made them, e.g. float32 overflow)."""
    for name, tensor in zip(names, tensors):
        if not np.isfinite(tensor).all():
            bad = int(tensor.size - np.count_nonzero(np.isfinite(tensor)))
            raise OnnxcompError(
                f"layer input {name!r} holds {bad} NaN or Inf value(s) in calibration batch {index}: the model "
                "overflows on this data (check its scale and preprocessing)")


def _instrumented(model: onnx.ModelProto, targets: list[_Target], fed: set[str]) -> tuple[onnx.ModelProto, dict]:
    """The model with every layer input that is not fed as a graph output (lifted out of its body
    where it is in one), and target key -> the name its tensor is read by (a feed or an output)."""
    instrumented = onnx.ModelProto()
    instrumented.CopyFrom(model)
    existing = {o.name for o in instrumented.graph.output}
    in_bodies = list(dict.fromkeys((t.tensor, t.scope) for t in targets if t.scope))
    dtypes = {(t.tensor, t.scope): helper.np_dtype_to_tensor_dtype(t.dtype) for t in targets}
    lifted = dict(zip(in_bodies, lift(instrumented, [(name, scope, dtypes[name, scope]) for name, scope in in_bodies])))
    for name, scope in dtypes:
        if not scope and name not in existing and name not in fed:
            instrumented.graph.output.append(helper.make_tensor_value_info(name, dtypes[name, scope], None))
            existing.add(name)
    source = {t.key: lifted[t.tensor, t.scope] if t.scope else t.tensor for t in targets}
    return instrumented, source


def _first_samples(tensor: np.ndarray, real: int, fixed: int, stacked: int) -> np.ndarray:
    """A fetched tensor of a batch topped up to ``fixed`` samples, without the repeated ones (where
    the batch is the axis after the ``stacked`` iteration axes)."""
    if tensor.ndim > stacked and tensor.shape[stacked] == fixed:
        return tensor[(slice(None),) * stacked + (slice(0, real),)]
    return tensor


def _iterations_as_rows(tensor: np.ndarray, stacked: int) -> tuple[np.ndarray | None, int]:
    """A layer input as the layer reads it, and the iterations per sample it holds: a value lifted
    out of Loop/Scan bodies has one leading axis per level, merged into the batch here; an empty
    value (a branch that did not run) is None."""
    if tensor.size == 0:
        return None, 1
    if not stacked:
        return tensor, 1
    iterations = int(np.prod(tensor.shape[:stacked]))
    return tensor.reshape(-1, *tensor.shape[stacked + 1 :]), iterations


# Float32 products of a layer input whose largest |x|^2 times its rows passes this could overflow.
FLOAT32_SAFE = float(np.finfo(np.float32).max) / 16


class _BlockBuffer:
    """One reusable buffer for row blocks of the product dtype, so blocks cost no fresh pages."""

    def __init__(self, nbytes: int, dtype=np.float64):
        self.dtype = np.dtype(dtype)
        self.flat = np.empty(max(1, nbytes // self.dtype.itemsize), self.dtype)

    def max_rows(self, dim: int) -> int:
        """Rows ``[x, 1]`` of length ``dim + 1`` in one block."""
        rows = max(1, self.flat.size // (dim + 1))
        return min(rows, FLOAT32_BLOCK_ROWS) if self.dtype == np.float32 else rows

    def rows(self, dim: int) -> np.ndarray:
        """A ``(max_rows, dim + 1)`` view whose last column is ones."""
        max_rows = self.max_rows(dim)
        if max_rows * (dim + 1) > self.flat.size:  # a row longer than the budget still fits one
            self.flat = np.empty(max_rows * (dim + 1), self.dtype)
        view = self.flat[: max_rows * (dim + 1)].reshape(max_rows, dim + 1)
        view[:, dim] = 1.0
        return view


def _row_blocks(target: _Target, tensor: np.ndarray, buffer: np.ndarray,
                keep: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Blocks ``[x, 1]`` of the rows of ``tensor`` (those where ``keep``, if given), written into ``buffer``."""
    if target.conv is not None:
        for block in iter_patch_blocks(tensor, target.conv, len(buffer), out=buffer):
            yield buffer[: len(block)]
        return
    rows = tensor.T if target.trans_a else tensor.reshape(-1, target.dim)
    if keep is not None:
        rows = rows[keep]
    for start in range(0, len(rows), len(buffer)):
        count = min(len(buffer), len(rows) - start)
        buffer[:count, :-1] = rows[start : start + count]
        yield buffer[:count]


class _GramSums:
    """Upper triangle of sum [x, 1] [x, 1]^T in float64: the Gram matrix, the row sums and the count.

    Blocks of rows in float64 go straight into it (dsyrk); a float32 block's Gram is computed in
    float32 (ssyrk, twice as fast) and then added, so rounding does not grow across blocks and batches.
    """

    def __init__(self, dim: int, dtype=np.float64):
        self.upper = np.zeros((dim + 1, dim + 1), order="F")
        self.single = np.dtype(dtype) == np.float32
        self.rows = 0
        self.samples = 0

    def add(self, blocks: Iterator[np.ndarray], rows: int, samples: int, single: bool | None = None,
            scratch: dict | None = None) -> None:
        """``single``: the blocks are float32 (default: the dtype these sums were made for);
        ``scratch``: dim + 1 -> a float32 block Gram to reuse (one per worker)."""
        size = self.upper.shape[0]
        single = self.single if single is None else single
        scratch = {} if scratch is None else scratch
        for block in blocks:
            # block.T is Fortran-ordered (dim+1, n): syrk reads it in place and
            # updates a Fortran-ordered upper triangle in place.
            if not single:
                self.upper = blas.dsyrk(1.0, block.T, beta=1.0, c=self.upper, overwrite_c=1)
                continue
            if size not in scratch:  # zeros: ssyrk never writes the strict lower triangle
                scratch[size] = np.zeros((size, size), np.float32, order="F")
            scratch[size] = blas.ssyrk(1.0, block.T, beta=0.0, c=scratch[size], overwrite_c=1)
            self.upper += scratch[size]
        self.rows += rows
        self.samples += samples

    def add_shifted(self, plan: ShiftPlan, x: np.ndarray, buffer: _BlockBuffer, rows: int, samples: int) -> None:
        """Add a stride-1 conv's patch sums from shifted products (shifts.py) straight into ours, in
        the buffer's dtype and blocks (it adds blocks on the diagonal whole: result() reads the upper
        triangle only)."""
        dim = plan.dim
        plan.reduce(x, buffer.dtype, buffer.max_rows(dim), gram=self.upper[:dim, :dim], total=self.upper[:dim, dim])
        self.upper[dim, dim] += rows
        self.rows += rows
        self.samples += samples

    def result(self, target: _Target) -> InputStats:
        # syrk leaves the strict lower triangle alone, add_shifted does not: mirror the upper one, in
        # place (a 25088-wide layer input's sums are 5 GB: whole-matrix copies would take three more).
        return self._stats_of(_mirror_upper(self.upper), self.rows, self.samples, target)

    @staticmethod
    def _stats_of(full: np.ndarray, rows: int, samples: int, target: _Target) -> InputStats:
        """InputStats of the symmetric sums of ``[x, 1] [x, 1]^T``, patches back in (c, i, j) order."""
        dim = target.dim
        gram, total = full[:dim, :dim], full[:dim, dim]
        if target.conv is not None:  # patches were built channel-last (i, j, c)
            order = channel_last_order(dim // int(np.prod(target.conv.kernel)), target.conv.kernel)
            gram, total = gram[np.ix_(order, order)], total[order]
        return InputStats(rows, samples, np.ascontiguousarray(total), np.ascontiguousarray(gram))


class _DeviceGramSums:
    """The sums of :class:`_GramSums` kept on a device (``xp`` = cupy; numpy in tests: the same code):
    each block of rows ``[x, 1]`` built on the host goes over once, its Gram is a float32 product there
    (as the host's ``ssyrk``), added into float64 sums that stay on the device until :meth:`result`."""

    def __init__(self, dim: int, xp):
        self.xp = xp
        self.full = xp.zeros((dim + 1, dim + 1), dtype=xp.float64)
        self.rows = 0
        self.samples = 0

    def add(self, blocks: Iterator[np.ndarray], rows: int, samples: int, single: bool | None = None,
            scratch: dict | None = None) -> None:
        xp = self.xp
        for block in blocks:  # float32 blocks (float64 where float32 products could overflow, or asked)
            on_device = xp.asarray(block)
            self.full += (on_device.T @ on_device).astype(xp.float64)
        self.rows += rows
        self.samples += samples

    def result(self, target: _Target) -> InputStats:
        full = self.full.get() if hasattr(self.full, "get") else np.asarray(self.full)
        return _GramSums._stats_of(full, self.rows, self.samples, target)


def _mirror_upper(matrix: np.ndarray, block: int = 2048) -> np.ndarray:
    """``matrix`` (square, changed in place) made symmetric from its upper triangle, a block of rows
    at a time (temporaries of ``block`` rows, not of the whole matrix)."""
    n = len(matrix)
    for start in range(0, n, block):
        stop = min(n, start + block)
        matrix[start:stop, :start] = matrix[:start, start:stop].T
        diagonal = matrix[start:stop, start:stop]
        diagonal[...] = np.triu(diagonal) + np.triu(diagonal, 1).T
    return matrix
