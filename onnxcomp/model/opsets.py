"""The ai.onnx opset a model imports: what the ops it holds and the ops a rewrite writes conform to."""

from __future__ import annotations

import onnx


def onnx_opset(model: onnx.ModelProto, default: int = 1) -> int:
    """The version of the default (ai.onnx) domain ``model`` imports; ``default`` where it lists none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default)
