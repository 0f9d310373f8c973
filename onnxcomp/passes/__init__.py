"""Rewrites: one module per decomposition, each turning factors into a chain of nodes."""

from __future__ import annotations

import onnx

from ..decompose.solve import Decomposition
from ..graph import TargetLayer
from .common import GraphEditor
from .cp import rewrite_cp
from .lowrank import rewrite_lowrank
from .tucker2 import rewrite_tucker2

REWRITES = {"svd": rewrite_lowrank, "tucker2": rewrite_tucker2, "cp": rewrite_cp}


def apply_decompositions(
    model: onnx.ModelProto, plan: list[tuple[TargetLayer, Decomposition]]
) -> onnx.ModelProto:
    """A new model in which every planned layer is replaced by its chain."""
    editor = GraphEditor(model)
    for layer, decomposition in plan:
        REWRITES[decomposition.method](editor, layer, decomposition)
    return editor.export()
