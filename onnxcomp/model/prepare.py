"""The model every stage works on: initializers listed as inputs taken as constants, weights folded.

Two things real exports do that hide a layer's weight from :func:`~onnxcomp.model.find_layers`:

- IR 3 (ONNX <= 1.2, the Model Zoo's classic opset 7-9 models, older exporters) lists every
  initializer as a graph input too. onnxruntime treats such an initializer as a default the caller
  may override; almost nobody does, so by default they are constants here (``initializer_inputs=
  "constant"``), and ``"refuse"`` keeps them overridable: layers reading one stay dense.
- Weights computed by a constant subgraph: ``Transpose(W) -> MatMul`` (older torch Linear exports),
  ``ConstantOfShape`` weights, ``Reshape``/``Cast``/``Unsqueeze`` of an initializer. Each such weight
  (and bias) of a layer is evaluated by onnxruntime once and becomes an initializer of the same
  name; the nodes that only computed it go; nothing else in the graph changes. A weight behind
  ``DequantizeLinear`` belongs to a quantized model: it is left alone, and the layer says why.

:func:`prepare_model` returns the working model and :meth:`Prepared.restore` puts the original
signature back on a compressed one: every input the original listed is listed again, except the
weights that the rewrite replaced (they no longer exist).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import OnnxcompError
from .sample_axes import SampleAxes, find_sample_axes, parse_batch_axes, restore_layout, with_samples_first
from .subgraphs import walk_graphs

INITIALIZER_INPUTS = ("constant", "refuse")

# Weight inputs of each layer op: (weight, bias) positions.
_WEIGHT_SLOTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,)}
# Ops whose output is not a function of their inputs alone: never folded.
_NOT_FOLDABLE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                 "Bernoulli", "If", "Loop", "Scan"}
# A weight reached through one of these is a quantized model's: refused by name.
QUANTIZED_OPS = {"DequantizeLinear", "DynamicQuantizeLinear", "QuantizeLinear"}


@dataclass(frozen=True)
class Prepared:
    """The working model, what was done to get it, and how to give a result the original's signature."""

    model: onnx.ModelProto
    original_inputs: tuple  # the original's graph inputs (ValueInfoProto), in order
    unread_initializers: tuple = ()  # initializer inputs no node reads: the rewrite's cleanup drops them
    notes: tuple[str, ...] = ()  # one line each, for the report's warnings
    sample_axes: SampleAxes = field(default_factory=SampleAxes)  # inputs/outputs the working model batches on 0
    original_outputs: tuple = ()  # the original's graph outputs (ValueInfoProto)

    def restore(self, compressed: onnx.ModelProto) -> onnx.ModelProto:
        """``compressed`` (changed in place) with the original's input list, in its order: every input
        is listed again, except the weights that no longer exist (replaced by the rewrite); inputs and
        outputs in the original's layout."""
        graph = compressed.graph
        restore_layout(compressed, self.sample_axes, self.original_inputs, self.original_outputs)
        for tensor in self.unread_initializers:
            if tensor.name not in {t.name for t in graph.initializer}:
                graph.initializer.append(tensor)
        present = {t.name for t in graph.initializer}
        current = {i.name: i for i in graph.input}
        kept = [current.get(info.name, info) for info in self.original_inputs
                if info.name in current or info.name in present]
        if compressed.ir_version < 4:  # IR 3 wants every initializer listed: the new factors are not inputs
            compressed.ir_version = 4
        del graph.input[:]
        graph.input.extend(kept)
        return compressed


def prepare_model(model: onnx.ModelProto, initializer_inputs: str = "constant", batch_axes=None) -> Prepared:
    """The model the stages work on (a copy; ``model`` is not changed). ``batch_axes``: input or output
    name -> its sample axis (an int, or None for an input without one) where the graph cannot tell."""
    if initializer_inputs not in INITIALIZER_INPUTS:
        raise OnnxcompError(f"initializer_inputs must be one of {', '.join(INITIALIZER_INPUTS)}, "
                            f"got {initializer_inputs!r}")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    graph = work.graph
    initializers = {t.name: t for t in graph.initializer}
    listed = [i for i in graph.input if i.name in initializers]
    notes = []
    if listed and initializer_inputs == "constant":
        names = {i.name for i in listed}
        kept = [i for i in graph.input if i.name not in names]
        del graph.input[:]
        graph.input.extend(kept)
        work.ir_version = max(work.ir_version, 4)  # IR 3 wants every initializer listed as an input
        notes.append(f"{len(listed)} initializer(s) are also listed as graph inputs (IR {model.ir_version} style): "
                     "taken as constants; the compressed model lists them again, except the replaced weights "
                     "(initializer_inputs='refuse' / --initializer-inputs refuse keeps them overridable)")
    folded = fold_layer_weights(work)
    if folded:
        notes.append(f"{len(folded)} layer weight(s) computed by constant subgraphs were folded into "
                     f"initializers ({', '.join(folded[:3])}{', ...' if len(folded) > 3 else ''})")
    read = _read_names(graph)  # after the fold: the inputs of the subgraphs it removed are unread now
    originals = {t.name: t for t in model.graph.initializer}
    unread = tuple(originals[i.name] for i in listed if i.name not in read)
    axes = find_sample_axes(work, parse_batch_axes(batch_axes))
    with_samples_first(work, axes)
    if axes:
        notes.append(axes.describe())
    return Prepared(work, tuple(model.graph.input), unread, tuple(notes), axes, tuple(model.graph.output))


def fold_layer_weights(model: onnx.ModelProto) -> list[str]:
    """Fold, in place, every layer weight/bias that a constant subgraph computes (not those of a
    quantized model); returns the folded tensor names."""
    graph = model.graph
    known, producer = _known_constants(graph), _producers(graph)
    cones = {name: cone for name, cone in _computed_weights(graph, known, producer).items() if not _quantizer(cone)}
    if not cones:
        return []
    values = _evaluate(model, cones)
    _replace_with_initializers(graph, values, producer, [n for name in values for n in cones[name]])
    return list(values)


def quantized_weights(graph: onnx.GraphProto) -> dict[str, str]:
    """{layer weight tensor: the quantization op it is computed through} (a quantized model's layers)."""
    known, producer = _known_constants(graph), _producers(graph)
    found = {name: _quantizer(cone) for name, cone in _computed_weights(graph, known, producer).items()}
    return {name: op for name, op in found.items() if op}


def _computed_weights(graph: onnx.GraphProto, known: set[str], producer: dict) -> dict[str, list]:
    """{weight or bias tensor of a layer: the constant nodes computing it}, for those not known yet."""
    found = {}
    for node in graph.node:
        for slot in _WEIGHT_SLOTS.get(node.op_type, ()):
            name = node.input[slot] if slot < len(node.input) else ""
            if name and name not in known and name not in found:
                cone = _constant_cone(name, producer, known)
                if cone is not None:
                    found[name] = cone
    return found


def _quantizer(cone: list) -> str | None:
    return next((n.op_type for n in cone if n.op_type in QUANTIZED_OPS), None)


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def _known_constants(graph: onnx.GraphProto) -> set[str]:
    """Tensors whose values are known: initializers that are not inputs, and Constant outputs."""
    inputs = {i.name for i in graph.input}
    known = {t.name for t in graph.initializer if t.name not in inputs}
    for node in graph.node:  # in topological order: an Identity's source is seen first
        if node.op_type == "Constant" or node.op_type == "Identity" and node.input[0] in known:
            known.add(node.output[0])  # find_layers reads both already: nothing to fold
    return known


def _constant_cone(name: str, producer: dict, known: set[str]) -> list[onnx.NodeProto] | None:
    """The nodes that compute ``name`` from constants only, or None when it depends on a graph
    input, a non-deterministic op, a custom domain or a subgraph."""
    cone, seen, stack = {}, set(), [name]
    while stack:
        tensor = stack.pop()
        if not tensor or tensor in known or tensor in seen:
            continue
        seen.add(tensor)
        node = producer.get(tensor)
        if node is None or node.op_type in _NOT_FOLDABLE or node.domain not in ("", "ai.onnx"):
            return None
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        cone[id(node)] = node
        stack.extend(node.input)
    return list(cone.values())


def _evaluate(model: onnx.ModelProto, cones: dict[str, list]) -> dict[str, np.ndarray]:
    """The values of the tensors ``cones`` computes (name -> its nodes), by onnxruntime; a weight
    onnxruntime cannot compute (an op or opset it refuses) is left out, and its layer stays dense."""
    try:
        return _run_cones(model, list(cones), [n for cone in cones.values() for n in cone])
    except Exception:
        values = {}
        for name, cone in cones.items():  # one by one: keep the weights that can be computed
            try:
                values.update(_run_cones(model, [name], cone))
            except Exception:
                pass
        return values


def _with_constants(graph: onnx.GraphProto, nodes: list) -> set[int]:
    """The ids of ``nodes`` and of the Constant nodes they read."""
    read = {t for n in nodes for t in n.input}
    return {id(n) for n in nodes} | {id(n) for n in graph.node if n.op_type == "Constant" and n.output[0] in read}


def _run_cones(model: onnx.ModelProto, names: list[str], nodes: list) -> dict[str, np.ndarray]:
    from ..runtime import make_session

    chosen = _with_constants(model.graph, nodes)
    order = [n for n in model.graph.node if id(n) in chosen]  # the graph's topological order
    needed = {t for n in order for t in n.input}
    graph = onnx.helper.make_graph(order, "fold", [], [], [t for t in model.graph.initializer if t.name in needed])
    # IR >= 4: initializers need not be inputs (IR 3 models are read with theirs taken as constants)
    sub = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=max(model.ir_version, 4))
    types = {v.name: v.type for v in onnx.shape_inference.infer_shapes(sub).graph.value_info}
    for name in names:  # onnxruntime needs each output's element type: shape inference gives it
        sub.graph.output.append(onnx.ValueInfoProto(name=name, type=types.get(name)))
    values = make_session(sub, threads=1, quiet=True).run(names, {})
    return dict(zip(names, values))


def _replace_with_initializers(graph: onnx.GraphProto, values: dict, producer: dict, nodes: list) -> None:
    """Each folded tensor becomes an initializer of its name; the ``nodes`` that computed them go where
    nothing reads them any more (a node with another output still read stays, that output unchanged)."""
    candidates = _with_constants(graph, nodes)
    weights = {t for n in nodes for t in n.input}
    for name, value in values.items():
        node = producer[name]
        node.output[list(node.output).index(name)] = f"{name}__folded"  # no longer its producer
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    _remove_unread(graph, candidates, weights)


def _remove_unread(graph: onnx.GraphProto, candidates: set[int], initializers: set[str]) -> None:
    """Remove the candidate nodes none of whose outputs is read (repeatedly), then those of
    ``initializers`` that nothing reads any more (the graph's other initializers stay as they are)."""
    outputs = {o.name for o in graph.output}
    changed = True
    while changed:
        changed = False
        read = {t for n in graph.node for t in n.input} | outputs
        for node in list(graph.node):
            if id(node) in candidates and not any(out in read for out in node.output):
                graph.node.remove(node)
                changed = True
    read = _read_names(graph)
    inputs = {i.name for i in graph.input}
    kept = [t for t in graph.initializer if t.name not in initializers or t.name in read or t.name in inputs]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _read_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node (or a subgraph's node) reads, and the graph's outputs."""
    return {t for _, g in walk_graphs(graph) for n in g.node for t in n.input} | {o.name for o in graph.output}


__all__ = ["INITIALIZER_INPUTS", "Prepared", "fold_layer_weights", "prepare_model", "quantized_weights"]
