"""One array-backend switch under all numerical code (NumPy on the CPU, CuPy on a GPU).

Solvers take an ``xp`` module (``numpy`` or ``cupy``) and use only functions
both provide, so the same code runs on either; results come back to the host
with :func:`to_numpy`.
"""

from __future__ import annotations

import sys

import numpy as np

from ..errors import OnnxcompError


def cupy_or_none():
    """The CuPy module when it imports and sees a CUDA device, else None."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # not installed, no driver, no device
        pass
    return None


def get_backend(device: str = "cpu"):
    """``"cpu"`` -> numpy, ``"cuda"`` -> cupy (or an error), ``"auto"`` -> cupy if usable."""
    if device == "cpu":
        return np
    if device in ("cuda", "auto"):
        cupy = cupy_or_none()
        if cupy is not None:
            return cupy
        if device == "cuda":
            raise OnnxcompError("--device cuda: CuPy with a CUDA device is not available (pip install 'onnxcomp[gpu]')")
        print("onnxcomp: note: no CUDA device with CuPy found, solving on the CPU", file=sys.stderr)
        return np
    raise OnnxcompError(f"unknown device {device!r}: use cpu, cuda or auto")


def array_module(array):
    """numpy or cupy, whichever owns ``array``."""
    module = type(array).__module__.split(".")[0]
    if module == "cupy":
        import cupy

        return cupy
    return np


def to_numpy(array) -> np.ndarray:
    if array_module(array) is np:
        return np.asarray(array)
    return array.get()


def to_backend(xp, array, dtype=np.float64):
    """Move a host array to ``xp`` as ``dtype`` (float64 by default: solvers work in float64)."""
    if array is None:
        return None
    return xp.asarray(np.asarray(array, dtype=dtype)) if xp is not np else np.asarray(array, dtype=dtype)
