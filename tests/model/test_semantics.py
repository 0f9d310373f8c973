"""What each output means, read from small graphs of the layouts real models have."""

from __future__ import annotations

from onnxcomp.model.semantics import output_semantics

from models import build

# YOLOv8: each level's Conv [N, C, h, w] reshaped to [N, C, h*w], the levels joined on the anchors
# axis, box values and sigmoid class scores joined on the channel axis: [N, 4 + classes, anchors].
YOLOV8 = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 8, 8, 8] a, float[N, 8, 4, 4] b) => (float[N, 7, 80] output0) {
    box_a = Conv (a, wb)
    cls_a = Conv (a, wc)
    box_b = Conv (b, wb)
    cls_b = Conv (b, wc)
    shape = Constant <value = int64[3] {0, 4, -1}> ()
    shape_c = Constant <value = int64[3] {0, 3, -1}> ()
    ra = Reshape (box_a, shape)
    rb = Reshape (box_b, shape)
    ca = Reshape (cls_a, shape_c)
    cb = Reshape (cls_b, shape_c)
    boxes = Concat <axis = 2> (ra, rb)
    logits = Concat <axis = 2> (ca, cb)
    scores = Sigmoid (logits)
    output0 = Concat <axis = 1> (boxes, scores)
}
"""

# PicoDet / YOLOX: Conv [1, C, h, w] -> Reshape [1, C, h*w] -> Transpose [1, h*w, C], sigmoid scores.
PICODET = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[1, 8, 6, 6] x) => (float[1, 36, 5] scores, float[1, 36, 5] raw) {
    h = Conv (x, w)
    shape = Constant <value = int64[3] {1, 5, 36}> ()
    r = Reshape (h, shape)
    raw = Transpose <perm = [0, 2, 1]> (r)
    scores = Sigmoid (raw)
}
"""

BERT = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 9, 12] x) => (float[N, 9, 12] hidden) {
    h = MatMul (x, w)
    b = Add (h, bias)
    hidden = Relu (b)
}
"""

# A CTC recogniser: Conv features [N, C, 1, T] squeezed and transposed to [N, T, C], a MatMul to the
# classes and a softmax over them.
CTC = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 4, 1, 10] x) => (float[N, 10, 6] probs) {
    h = Conv (x, wc)
    axes = Constant <value = int64[1] {2}> ()
    s = Squeeze (h, axes)
    t = Transpose <perm = [0, 2, 1]> (s)
    logits = MatMul (t, w)
    probs = Softmax <axis = 2> (logits)
}
"""

MULTILABEL = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 12] x) => (float[N, 5] labels_p) {
    h = Gemm (x, w)
    labels_p = Sigmoid (h)
}
"""

EMBEDDING = """
<ir_version: 8, opset_import: ["" : 18]>
net (float[N, 9, 12] x) => (float[N, 8] unit, float[N, 8] lp) {
    h = MatMul (x, w)
    mean_axes = Constant <value = int64[1] {1}> ()
    pooled = ReduceMean <keepdims = 0> (h, mean_axes)
    axes = Constant <value = int64[1] {1}> ()
    norm = ReduceL2 <keepdims = 1> (pooled, axes)
    eps = Constant <value = float {1e-12}> ()
    safe = Max (norm, eps)
    unit = Div (pooled, safe)
    lp = LpNormalization <axis = 1, p = 2> (pooled)
}
"""

ARGMAX = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 12] x) => (int64[N, 1] label, float[N, 5] logits) {
    logits = Gemm (x, w)
    label = ArgMax <axis = 1> (logits)
}
"""


def test_yolov8_head_has_its_channels_on_axis_1():
    model = build(YOLOV8, wb=(4, 8, 1, 1), wc=(3, 8, 1, 1))
    meaning = output_semantics(model)["output0"]
    assert (meaning.axis, meaning.kind) == (1, "values")  # box values joined with scores: plain values
    assert any("Concat" in e for e in meaning.evidence)


def test_picodet_head_has_its_channels_last():
    model = build(PICODET, w=(5, 8, 1, 1))
    semantics = output_semantics(model)
    assert (semantics["raw"].axis, semantics["raw"].kind) == (2, "values")
    assert (semantics["scores"].axis, semantics["scores"].kind) == (2, "scores")
    assert semantics["scores"].evidence[0].endswith("(Conv)")


def test_encoder_features_are_the_last_axis():
    meaning = output_semantics(build(BERT, w=(12, 12), bias=(12,)))["hidden"]
    assert (meaning.axis, meaning.kind) == (2, "values")


def test_ctc_softmax_is_a_distribution_over_the_classes():
    meaning = output_semantics(build(CTC, wc=(8, 4, 1, 1), w=(8, 6)))["probs"]
    assert (meaning.axis, meaning.kind, meaning.log) == (2, "distribution", False)
    assert [e.split(" (")[1] for e in meaning.evidence] == ["MatMul)", "Softmax)"]


def test_log_softmax_before_opset_13_defaults_to_axis_1():
    text = """
    <ir_version: 7, opset_import: ["" : 12]>
    net (float[N, 12] x) => (float[N, 5] y) {
        h = Gemm (x, w)
        y = LogSoftmax (h)
    }
    """
    meaning = output_semantics(build(text, w=(12, 5)))["y"]
    assert (meaning.axis, meaning.kind, meaning.log) == (1, "distribution", True)


def test_sigmoid_multilabel_scores():
    meaning = output_semantics(build(MULTILABEL, w=(12, 5)))["labels_p"]
    assert (meaning.axis, meaning.kind) == (1, "scores")


def test_l2_normalised_embeddings():
    semantics = output_semantics(build(EMBEDDING, w=(12, 8)))
    assert (semantics["unit"].axis, semantics["unit"].kind) == (1, "embedding")
    assert (semantics["lp"].axis, semantics["lp"].kind) == (1, "embedding")


def test_argmax_is_labels():
    semantics = output_semantics(build(ARGMAX, w=(12, 5)))
    assert semantics["label"].kind == "labels" and semantics["label"].axis is None
    assert semantics["logits"].kind == "values" and semantics["logits"].axis == 1
