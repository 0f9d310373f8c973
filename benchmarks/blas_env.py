"""Threads and load for benchmark scripts: ``--threads N`` applied before NumPy loads its BLAS,
and a competing process that keeps one core busy.

OpenBLAS reads OPENBLAS_NUM_THREADS once, when NumPy is first imported, so a script calls
:func:`preset_threads` on its arguments before it imports NumPy (this module imports neither).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from contextlib import contextmanager


def preset_threads(argv) -> None:
    """Set the BLAS thread variables from ``--threads N`` / ``--threads=N`` in ``argv``, if given."""
    for i, arg in enumerate(argv):
        count = arg.split("=", 1)[1] if arg.startswith("--threads=") else None
        if arg == "--threads" and i + 1 < len(argv):
            count = argv[i + 1]
        if count is not None:
            for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[var] = count


def _spin() -> None:
    while True:
        pass


@contextmanager
def competing_process(active: bool = True):
    """A child process that keeps one core busy while the block runs."""
    if not active:
        yield
        return
    child = multiprocessing.Process(target=_spin, daemon=True)
    child.start()
    try:
        time.sleep(0.5)
        yield
    finally:
        child.terminate()
        child.join()
