"""One array-backend switch under all numerical code (NumPy on the CPU, CuPy on a GPU).

The convention: a solver's entry point takes ``xp`` (``numpy`` or ``cupy``,
from :func:`get_backend`) and moves its host inputs there with
:func:`to_backend`; every function below it finds the module from the arrays
it is given (:func:`array_module`) and uses only functions both modules
provide, plus :func:`scipy_linalg` for the few SciPy ones (CuPy mirrors them in
``cupyx.scipy.linalg``). Results come back to the host with :func:`to_numpy`.
"""

from __future__ import annotations

import sys

import numpy as np
import scipy.linalg

from ..errors import OnnxcompError


def cupy_or_none():
    """The CuPy module when it imports and sees a CUDA device, else None."""
    try:
        import cupy

        devices = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - not installed, broken install, no driver: each means "no GPU here"
        return None
    return cupy if devices > 0 else None


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


def scipy_linalg(array):
    """``scipy.linalg``, or ``cupyx.scipy.linalg`` for a CuPy array (same names and signatures)."""
    if array_module(array) is np:
        return scipy.linalg
    import cupyx.scipy.linalg

    return cupyx.scipy.linalg


def to_numpy(array) -> np.ndarray:
    if array_module(array) is np:
        return np.asarray(array)
    return array.get()


def to_backend(xp, array, dtype=np.float64):
    """Move a host array to ``xp`` as ``dtype`` (float64 by default: solvers work in float64)."""
    if array is None:
        return None
    return xp.asarray(np.asarray(array, dtype=dtype)) if xp is not np else np.asarray(array, dtype=dtype)
