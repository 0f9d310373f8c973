"""Rewrites: one module per decomposition, each turning factors into a chain of nodes."""

from __future__ import annotations

import numpy as np
import onnx

from ..config import Method
from ..decompose.solve import Decomposition, Solved
from ..model import TargetLayer
from .bias import rewrite_bias
from .common import GraphEditor
from .cp import rewrite_cp
from .lowrank import rewrite_lowrank
from .transposed import rewrite_cp_transposed, rewrite_lowrank_transposed, rewrite_tucker2_transposed
from .tucker2 import rewrite_tucker2

REWRITES = {Method.SVD: rewrite_lowrank, Method.TUCKER2: rewrite_tucker2, Method.CP: rewrite_cp}
# A ConvTranspose's factors are those of its equivalent conv: their chains end in ConvTranspose cores.
TRANSPOSED_REWRITES = {Method.SVD: rewrite_lowrank_transposed, Method.TUCKER2: rewrite_tucker2_transposed,
                       Method.CP: rewrite_cp_transposed}


def apply_decompositions(
    model: onnx.ModelProto, plan: list[tuple[TargetLayer, Decomposition]],
    dense_biases: list[tuple[TargetLayer, np.ndarray]] = (),
) -> onnx.ModelProto:
    """A new model in which every planned layer is replaced by its chain (and each layer of
    ``dense_biases``, kept dense, gets that bias: bias re-estimation)."""
    editor = GraphEditor(model)
    for layer, decomposition in plan:
        rewrite_layer(editor, layer, decomposition)
    for layer, bias in dense_biases:
        rewrite_bias(editor, layer, bias)
    return editor.export()


def rewrite_layer(editor: GraphEditor, layer: TargetLayer, decomposition: Decomposition) -> None:
    """Replace one layer by the chain of its decomposition."""
    rewrites = TRANSPOSED_REWRITES if layer.transposed is not None else REWRITES
    rewrites[decomposition.method](editor, layer, decomposition)


def apply_solved(model: onnx.ModelProto, layers: list[TargetLayer], solved: Solved) -> onnx.ModelProto:
    """:func:`apply_decompositions` of the layers that were solved into a decomposition."""
    return apply_decompositions(model, planned(layers, solved))


def planned(layers: list[TargetLayer], solved: Solved) -> list[tuple[TargetLayer, Decomposition]]:
    """(layer, decomposition) of every layer that ``solved`` compresses, in the layers' order."""
    return [(layer, solved[layer.name]) for layer in layers if isinstance(solved.get(layer.name), Decomposition)]
