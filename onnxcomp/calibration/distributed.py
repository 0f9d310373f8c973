"""Calibration on a Ray cluster: batches spread over actors, each with its own onnxruntime session,
partial statistics merged exactly.

Statistics are sums, so shards of the data add up to the statistics of the whole. The driver reads
the data as a local calibration does (the same batches, the same held-out split) and hands each
batch to the actor with the fewest batches in flight; each actor (one CPU, one onnxruntime intra-op
thread, one BLAS thread) instruments its own copy of the model and sums its batches' layer inputs
(``collect._Collector``); at the end the actors' sums are added in the driver. At most
``IN_FLIGHT`` batches per actor wait in Ray's object store, so memory stays bounded by a few
batches whatever the data's size. An actor that dies ends the calibration with a one-line error
and nothing is written (partial sums would be statistics of an unknown part of the data).

The solves of a budget go to the cluster too (:func:`ray_mapper`): every layer's candidate curve and
final solve is a task of its own, sent only that layer's problem.

``ray``: ``"local"`` starts Ray on this machine (``ray.init``), any other string is the address of
a running cluster (``ray start --head`` on one machine, ``ray start --address=HEAD:6379`` on the
others; ``"auto"`` joins the cluster this machine is part of).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import onnx

from ..errors import OnnxcompError, first_line
from ..runtime import feed_size
from .stats import Statistics

IN_FLIGHT = 2  # batches per actor queued in the object store at most


def require_ray():
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise OnnxcompError("--ray needs Ray, which is not installed: pip install 'onnxcomp[distributed]'") from None
    return ray


def connect(address: str):
    """Ray, started locally (``"local"``) or joined to the cluster at ``address``."""
    ray = require_ray()
    if not ray.is_initialized():
        try:
            if address == "local":
                ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except Exception as exc:
            raise OnnxcompError(f"cannot reach the Ray cluster at {address!r}: {first_line(exc)}") from None
    return ray


def ray_mapper(address: str):
    """A ``threads.remote_map`` mapper: each item a Ray task of one CPU (one BLAS thread), the
    function sent to the object store once; results in order."""
    ray = connect(address)
    task = ray.remote(num_cpus=1, max_retries=0)(_call)

    def mapper(function, items: list) -> list:
        shared = ray.put(function)
        references = [task.remote(shared, item) for item in items]
        try:
            return ray.get(references)
        except ray.exceptions.RayTaskError as exc:
            cause = _cause(exc)
            if isinstance(cause, OnnxcompError):
                raise OnnxcompError(str(cause)) from None
            raise OnnxcompError(f"a Ray task of the solve failed: {first_line(cause)}") from None
        except ray.exceptions.RayError as exc:
            raise OnnxcompError(f"a Ray worker of the solve died ({first_line(exc)})") from None

    return mapper


def _cause(error: Exception) -> Exception:
    """The exception a Ray task raised, out of Ray's wrapper."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, Exception) else error


def _call(function, item):
    from ..threads import blas_threads

    with blas_threads(1):
        return function(item)


class RayCollector:
    """The interface of ``collect._Collector`` (``add`` a batch, then ``statistics``), on Ray actors."""

    def __init__(self, address: str, model: onnx.ModelProto, targets, block_bytes: int, dtype, row_mask,
                 actors: int | None = None):
        ray = connect(address)
        self.ray = ray
        count = actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
        actor = ray.remote(num_cpus=1, max_restarts=0)(_StatisticsActor)
        payload = model.SerializeToString()
        self.actors = [actor.remote(payload, targets, block_bytes, np.dtype(dtype).str, row_mask)
                       for _ in range(count)]
        self.pending: list[deque] = [deque() for _ in self.actors]

    def add(self, feed: dict, index: int) -> None:
        slot = min(range(len(self.actors)), key=lambda k: len(self.pending[k]))
        while len(self.pending[slot]) >= IN_FLIGHT:  # wait for its oldest batch: memory stays bounded
            self._get(self.pending[slot].popleft())
        self.pending[slot].append(self.actors[slot].add.remote(feed, index))

    def statistics(self) -> Statistics:
        for queue in self.pending:
            while queue:
                self._get(queue.popleft())
        parts = [self._get(actor.result.remote()) for actor in self.actors]
        merged = parts[0]
        for part in parts[1:]:
            merged = merged.merged(part)
        for actor in self.actors:
            self.ray.kill(actor)
        return merged

    def _get(self, reference):
        try:
            return self.ray.get(reference)
        except self.ray.exceptions.RayActorError as exc:
            raise OnnxcompError(f"a Ray worker of the calibration died ({first_line(exc)}): nothing was written; "
                                "run it again") from None
        except self.ray.exceptions.RayTaskError as exc:
            raise OnnxcompError(first_line(_cause(exc))) from None


class _StatisticsActor:
    """One onnxruntime session and the sums of the batches it was given."""

    def __init__(self, model: bytes, targets, block_bytes: int, dtype: str, row_mask):
        from ..threads import blas_threads
        from .collect import _Collector

        self._blas = blas_threads(1)
        self._blas.__enter__()  # the actor's lifetime: one BLAS thread, as every calibration worker
        self.collector = _Collector(onnx.load_from_string(model), targets, None, block_bytes, np.dtype(dtype),
                                    row_mask, threads=1)

    def add(self, feed: dict, index: int) -> int:
        self.collector.add(feed, index)
        return feed_size(feed)

    def result(self) -> Statistics:
        return self.collector.statistics()
