"""onnxcomp: data-aware low-rank compression of ONNX models.

Python API::

    import onnxcomp
    model, report = onnxcomp.compress("model.onnx", "calib.npz", keep=0.5)
    onnxcomp.save_model(model, "model.small.onnx")
    print(report.table())
"""

__version__ = "0.1.0"

from .errors import OnnxcompError
from .model import find_layers, load_model, save_model


def __getattr__(name):
    # The pipeline pulls in onnxruntime and the solvers: import it on first use only.
    if name in ("compress", "calibrate"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'onnxcomp' has no attribute {name!r}")

__all__ = ["OnnxcompError", "calibrate", "compress", "find_layers", "load_model", "save_model"]
