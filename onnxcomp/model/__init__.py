"""The model side: files, the layers we can compress, shapes and counts.

Everything here reads ONNX and knows nothing of statistics or decompositions.
"""

from .constants import constant_tensors
from .counting import chain_nodes, count_macs, count_params, layer_macs
from .denormals import count_subnormals, flush_model
from .files import as_model, fingerprint, load_model, save_model
from .layers import TARGET_OPS, ConvGeometry, NothingToCompress, Skipped, TargetLayer, find_layers, select_layers
from .shapes import infer_shapes, parse_input_shapes, runtime_shapes, static_product, with_input_shapes

__all__ = [
    "TARGET_OPS", "ConvGeometry", "NothingToCompress", "Skipped", "TargetLayer", "as_model", "chain_nodes", "constant_tensors",
    "count_macs", "count_params", "count_subnormals", "find_layers", "fingerprint", "flush_model", "infer_shapes",
    "layer_macs", "load_model", "parse_input_shapes", "runtime_shapes", "save_model", "select_layers", "static_product",
    "with_input_shapes",
]
