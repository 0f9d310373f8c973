"""The model side: files, the layers we can compress, shapes and counts.

Everything here reads ONNX and knows nothing of statistics or decompositions.
"""

from .constants import constant_tensors
from .counting import count_macs, count_params
from .files import as_model, fingerprint, load_model, save_model
from .layers import TARGET_OPS, ConvGeometry, Skipped, TargetLayer, find_layers, select_layers
from .shapes import infer_shapes, parse_input_shapes, runtime_shapes, static_product, with_input_shapes

__all__ = [
    "TARGET_OPS", "ConvGeometry", "Skipped", "TargetLayer", "as_model", "constant_tensors", "count_macs",
    "count_params", "find_layers", "fingerprint", "infer_shapes", "load_model", "parse_input_shapes", "runtime_shapes",
    "save_model", "select_layers", "static_product", "with_input_shapes",
]
