"""onnxcomp: data-aware low-rank compression of ONNX models.

Python API::

    import onnxcomp
    model, report = onnxcomp.compress("model.onnx", "calib.npz", keep=0.5)
    onnxcomp.save_model(model, "model.small.onnx")
    print(report.table())
"""

__version__ = "0.1.0"

from .config import (
    BudgetConfig,
    BudgetKind,
    CompressConfig,
    LatencyConfig,
    Method,
    Norm,
    RankChoice,
    Sensitivity,
    SolveConfig,
)
from .errors import OnnxcompError
from .model import find_layers, load_model, save_model

# The pipeline and the statistics pull in onnxruntime and the solvers: imported on first use.
_LAZY = {"compress": "pipeline", "calibrate": "pipeline", "Statistics": "calibration.stats"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'onnxcomp' has no attribute {name!r}")


__all__ = [
    "BudgetConfig", "BudgetKind", "CompressConfig", "LatencyConfig", "Method", "Norm", "OnnxcompError",
    "RankChoice", "Sensitivity", "SolveConfig", "Statistics", "calibrate", "compress", "find_layers",
    "load_model", "save_model",
]
