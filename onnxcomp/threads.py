"""How many threads onnxcomp computes with: one setting (``--threads``) for BLAS and onnxruntime.

Why deliberately: OpenBLAS starts one thread per core and, between calls, spins waiting for
work. When another process holds a core, every small LAPACK call of a solve waits for a thread
that is not running; on the project's 2-core machine LAPACK-heavy solves ran 50-90x slower
that way. So the solve runs each layer with one BLAS thread and spreads the layers over
``threads`` workers instead (layers are independent, and NumPy/LAPACK release the GIL), which
keeps every core busy on a quiet machine and degrades in proportion under load. Calibration's
Gram products run with one BLAS thread too (onnxruntime's session keeps ``threads`` intra-op
threads): with two BLAS threads and one core busy elsewhere, calibrating the digits example took
71.5 s instead of 1.7 s.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from .errors import OnnxcompError

T = TypeVar("T")
R = TypeVar("R")


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def available_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its control group's limit if lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        return min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        return total


def thread_count(threads: int | None) -> int:
    """``threads`` checked, or every available core when None."""
    if threads is None:
        return available_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise OnnxcompError(f"--threads must be a positive integer, got {threads!r}")
    return threads


@contextmanager
def blas_threads(count: int):
    """BLAS/LAPACK (OpenBLAS, MKL, BLIS) limited to ``count`` threads inside the block."""
    with threadpool_limits(limits=count, user_api="blas"):
        yield


# Where map_parallel sends its items instead of local threads (a Ray cluster: calibration/distributed.py).
_REMOTE: ContextVar[Callable | None] = ContextVar("onnxcomp_remote_map", default=None)


@contextmanager
def remote_map(mapper: Callable[[Callable, list], list] | None):
    """Inside the block, :func:`map_parallel` calls ``mapper(function, items)`` (None: local threads)."""
    token = _REMOTE.set(mapper)
    try:
        yield
    finally:
        _REMOTE.reset(token)


def map_parallel(function: Callable[[T], R], items: Sequence[T], workers: int, *, desc: str = "",
                 progress: bool = False) -> list[R]:
    """``[function(item) for item in items]`` on ``workers`` threads, each with one BLAS thread (or
    on a cluster's workers inside :func:`remote_map`); in order, and the same results as a sequential
    run (each item's arithmetic is unchanged)."""
    items = list(items)
    remote = _REMOTE.get()
    if remote is not None and workers > 1 and len(items) > 1:  # workers 1: a GPU's serial stream stays here
        return remote(function, items)
    bar = tqdm(total=len(items), desc=desc, unit="layer", disable=not progress)
    with bar:
        if workers <= 1 or len(items) <= 1:
            return list(_each(function, items, bar))
        with blas_threads(1), ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
            futures = [pool.submit(function, item) for item in items]
            results = []
            try:
                for future in futures:
                    results.append(future.result())
                    bar.update(1)
            except BaseException:  # the first failure (or Ctrl-C) ends the run: drop what has not started
                for future in futures:
                    future.cancel()
                raise
            return results


def _each(function: Callable[[T], R], items: Iterable[T], bar) -> Iterable[R]:
    for item in items:
        yield function(item)
        bar.update(1)
