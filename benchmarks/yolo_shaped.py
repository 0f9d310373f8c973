"""A YOLOv8n-shaped ONNX detector with random weights, for benchmarks.

Same layer shapes as Ultralytics' YOLOv8n (width 0.25, depth 0.33) with batch
norm folded into the convolutions: backbone (Conv 3->16 s2, Conv 16->32 s2,
C2f, Conv s2 to 64, 2x C2f, Conv s2 to 128, 2x C2f, Conv s2 to 256, C2f,
SPPF), the FPN/PAN neck (nearest Resize x2, Concat, C2f without shortcuts,
stride-2 Convs) and the decoupled Detect head at strides 8, 16, 32 (box branch
3x3(c,64), 3x3(64,64), 1x1(64,64); class branch 3x3(c,80), 3x3(80,80),
1x1(80,classes)). A C2f block is: 1x1 conv to 2c, Split in two halves, n
bottlenecks (two 3x3 convs, plus a residual Add in the backbone) on the second
half, Concat of all, 1x1 conv. SiLU is written ``x * Sigmoid(x)``. 63 Convs
(the DFL's fixed 1x1 conv and the box decoding are left out): the output is
the raw head maps, concatenated to one ``[N, 64 + classes, anchors]`` tensor
(anchors = 2100 at 320x320).

Weights are He-initialised, then every conv followed by SiLU gets a folded
"batch norm" measured on 4 smooth random images (:func:`smooth_images`; the
builder runs each node as it is added, so upstream is final when a conv is
measured): each output channel is shifted and scaled to mean ``beta`` and
standard deviation ``gamma`` (random, in [-0.5, 0.5] and [0.5, 1.5]), so
activations stay O(1) from the stem to the head (on other smooth images: conv
outputs std 0.97-2.3, the head's output 1.5). The values mean nothing; the
shapes, the work per sample and the scale of the activations are what the
benchmarks need. Building takes about a second at 320x320.

    python benchmarks/yolo_shaped.py yolo.onnx [--image-size 320] [--classes 80] [--seed 0] [--batch-dim N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
REG_MAX = 16  # DFL bins per box side: the box branch ends with 4 * REG_MAX channels
STRIDES = (8, 16, 32)


class _Builder:
    """Appends nodes and runs each one as it comes (onnxruntime, one node at a time) on a few smooth
    images, so that every conv followed by SiLU can get its "batch norm" folded in from the values
    it really sees: exact, upstream is final when a conv is measured."""

    def __init__(self, seed: int, image_size: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, np.ndarray] = {}
        self.values = {"images": smooth_images(4, image_size, seed + 1)}

    # ------------------------------------------------------------ ops

    def conv(self, name: str, x: str, c_in: int, c_out: int, kernel: int = 1, stride: int = 1,
             act: bool = True) -> str:
        fan_in = c_in * kernel * kernel
        weight = self.rng.standard_normal((c_out, c_in, kernel, kernel)) * np.sqrt(2.0 / fan_in)
        self.initializers[f"{name}.weight"] = weight
        self.initializers[f"{name}.bias"] = np.zeros(c_out) if act else self.rng.standard_normal(c_out) * 0.01
        pad = kernel // 2
        out = self._add(helper.make_node(
            "Conv", [x, f"{name}.weight", f"{name}.bias"], [f"{name}.out"], name=name,
            kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4,
        ))
        if not act:
            return out
        self._fold_norm(name)
        return self.silu(f"{name}.act", out)

    def silu(self, name: str, x: str) -> str:
        sigmoid = self._add(helper.make_node("Sigmoid", [x], [f"{name}.sigmoid"], name=f"{name}.sigmoid"))
        return self._add(helper.make_node("Mul", [x, sigmoid], [f"{name}.out"], name=f"{name}.mul"))

    def op(self, op_type: str, name: str, inputs: list[str], **attrs) -> str:
        return self._add(helper.make_node(op_type, inputs, [f"{name}.out"], name=name, **attrs))

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers[name] = value
        return name

    def _add(self, node: onnx.NodeProto) -> str:
        self.nodes.append(node)
        self.values.update(zip(node.output, _run_node(node, self.values, self.initializers)))
        return node.output[0]

    def _fold_norm(self, name: str) -> None:
        """Shift and scale the conv's output channels to mean ``beta`` and standard deviation
        ``gamma`` (random, like a trained batch norm's) on the images."""
        out = self.values[f"{name}.out"]
        mean = out.mean(axis=(0, 2, 3), dtype=np.float64)
        std = out.std(axis=(0, 2, 3), dtype=np.float64) + 1e-3
        scale = self.rng.uniform(0.5, 1.5, len(mean)) / std
        shift = self.rng.uniform(-0.5, 0.5, len(mean)) - mean * scale
        self.initializers[f"{name}.weight"] *= scale[:, None, None, None]
        self.initializers[f"{name}.bias"] = self.initializers[f"{name}.bias"] * scale + shift
        self.values[f"{name}.out"] = (out * scale[None, :, None, None] + shift[None, :, None, None]).astype(np.float32)

    # ------------------------------------------------------------ blocks

    def c2f(self, name: str, x: str, c_in: int, c_out: int, n: int, shortcut: bool) -> str:
        c = c_out // 2
        y = self.conv(f"{name}.cv1", x, c_in, 2 * c, 1)
        split = self.constant(f"{name}.split_sizes", np.array([c, c], dtype=np.int64))
        halves = [f"{name}.split.out0", f"{name}.split.out1"]
        self._add(helper.make_node("Split", [y, split], halves, name=f"{name}.split", axis=1))
        parts = list(halves)
        for i in range(n):
            h = self.conv(f"{name}.m.{i}.cv1", parts[-1], c, c, 3)
            h = self.conv(f"{name}.m.{i}.cv2", h, c, c, 3)
            if shortcut:
                h = self.op("Add", f"{name}.m.{i}.add", [parts[-1], h])
            parts.append(h)
        cat = self.op("Concat", f"{name}.cat", parts, axis=1)
        return self.conv(f"{name}.cv2", cat, (2 + n) * c, c_out, 1)

    def sppf(self, name: str, x: str, c_in: int, c_out: int) -> str:
        hidden = c_in // 2
        y = self.conv(f"{name}.cv1", x, c_in, hidden, 1)
        pools = [y]
        for i in range(3):
            pools.append(self.op("MaxPool", f"{name}.pool{i}", [pools[-1]],
                                 kernel_shape=[5, 5], strides=[1, 1], pads=[2] * 4))
        cat = self.op("Concat", f"{name}.cat", pools, axis=1)
        return self.conv(f"{name}.cv2", cat, 4 * hidden, c_out, 1)

    def upsample(self, name: str, x: str) -> str:
        scales = self.constant(f"{name}.scales", np.array([1, 1, 2, 2], dtype=np.float32))
        return self.op("Resize", name, [x, "", scales], mode="nearest")

    def head(self, name: str, x: str, c_in: int, classes: int) -> str:
        # Ultralytics sizes both branches from the first level's width (64): 64 and 80 for YOLOv8n.
        c_box, c_cls = max(16, 64 // 4, 4 * REG_MAX), max(64, min(classes, 100))
        box = self.conv(f"{name}.box.0", x, c_in, c_box, 3)
        box = self.conv(f"{name}.box.1", box, c_box, c_box, 3)
        box = self.conv(f"{name}.box.2", box, c_box, 4 * REG_MAX, 1, act=False)
        cls = self.conv(f"{name}.cls.0", x, c_in, c_cls, 3)
        cls = self.conv(f"{name}.cls.1", cls, c_cls, c_cls, 3)
        cls = self.conv(f"{name}.cls.2", cls, c_cls, classes, 1, act=False)
        both = self.op("Concat", f"{name}.cat", [box, cls], axis=1)
        shape = self.constant(f"{name}.shape", np.array([0, 4 * REG_MAX + classes, -1], dtype=np.int64))
        return self.op("Reshape", f"{name}.flat", [both, shape])


def build_yolo_shaped(image_size: int = 320, classes: int = 80, seed: int = 0,
                      batch_dim: str | int = "N") -> onnx.ModelProto:
    """The YOLOv8n-shaped model (not saved): input ``images`` ``[N, 3, S, S]`` (S a multiple of 32), output
    ``output`` ``[N, 64 + classes, anchors]``; random weights from ``seed``, activations O(1)."""
    if image_size % 32:
        raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
    b = _Builder(seed, image_size)
    # backbone
    x = b.conv("model.0", "images", 3, 16, 3, 2)
    x = b.conv("model.1", x, 16, 32, 3, 2)
    x = b.c2f("model.2", x, 32, 32, 1, True)
    x = b.conv("model.3", x, 32, 64, 3, 2)
    p3 = b.c2f("model.4", x, 64, 64, 2, True)
    x = b.conv("model.5", p3, 64, 128, 3, 2)
    p4 = b.c2f("model.6", x, 128, 128, 2, True)
    x = b.conv("model.7", p4, 128, 256, 3, 2)
    x = b.c2f("model.8", x, 256, 256, 1, True)
    p5 = b.sppf("model.9", x, 256, 256)
    # neck: top-down (FPN), then bottom-up (PAN)
    x = b.op("Concat", "model.11", [b.upsample("model.10", p5), p4], axis=1)
    n4 = b.c2f("model.12", x, 384, 128, 1, False)
    x = b.op("Concat", "model.14", [b.upsample("model.13", n4), p3], axis=1)
    out3 = b.c2f("model.15", x, 192, 64, 1, False)
    x = b.op("Concat", "model.17", [b.conv("model.16", out3, 64, 64, 3, 2), n4], axis=1)
    out4 = b.c2f("model.18", x, 192, 128, 1, False)
    x = b.op("Concat", "model.20", [b.conv("model.19", out4, 128, 128, 3, 2), p5], axis=1)
    out5 = b.c2f("model.21", x, 384, 256, 1, False)
    # decoupled head
    levels = ((out3, 64), (out4, 128), (out5, 256))
    maps = [b.head(f"model.22.{i}", out, c, classes) for i, (out, c) in enumerate(levels)]
    b._add(helper.make_node("Concat", maps, ["output"], name="model.22.cat", axis=2))

    anchors = sum((image_size // s) ** 2 for s in STRIDES)

    graph = helper.make_graph(
        b.nodes, "yolov8n_shaped",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch_dim, 3, image_size, image_size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch_dim, 4 * REG_MAX + classes, anchors])],
        initializer=_initializers(b),
    )
    # IR 8 goes with opset 17 and loads in any onnxruntime from 1.13 on.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def smooth_images(count: int, image_size: int = 320, seed: int = 0) -> np.ndarray:
    """``[count, 3, S, S]`` float32 images in [0, 1]: white noise low-passed (Gaussian, a few pixels
    wide) plus a random colour per image, so neighbouring pixels are correlated like in photos."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((count, 3, image_size, image_size))
    freq = np.fft.fftfreq(image_size)  # cycles per pixel
    sigma = 4.0 * image_size / 320  # the blur's width in pixels: 4 at 320x320
    low_pass = np.exp(-2 * (np.pi * sigma) ** 2 * (freq[:, None] ** 2 + freq[None, :] ** 2))
    smooth = np.fft.ifft2(np.fft.fft2(noise) * low_pass).real
    smooth /= smooth.std(axis=(2, 3), keepdims=True) + 1e-12
    images = 0.5 + 0.2 * smooth + 0.1 * rng.standard_normal((count, 3, 1, 1))
    return np.clip(images, 0.0, 1.0).astype(np.float32)


def _run_node(node: onnx.NodeProto, values: dict[str, np.ndarray], initializers: dict[str, np.ndarray]) -> list:
    """Run one node on ``values`` (and the weights) with onnxruntime."""
    import onnxruntime as ort

    names = [n for n in node.input if n]
    feed = {n: values[n] if n in values else _stored(initializers[n]) for n in names}
    graph = helper.make_graph(
        [node], node.name,
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for n, v in feed.items()],
        [onnx.ValueInfoProto(name=o) for o in node.output],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _stored(value: np.ndarray) -> np.ndarray:
    """A weight as the model stores it: float32 (index constants keep their integer type)."""
    return value.astype(np.float32) if value.dtype == np.float64 else value


def _initializers(b: _Builder) -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(_stored(v), k) for k, v in b.initializers.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="output .onnx file")
    parser.add_argument("--image-size", type=int, default=320, help="input height and width (default 320)")
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-dim", default="N", help="symbolic name or a fixed size for the batch dimension")
    args = parser.parse_args()
    batch_dim = int(args.batch_dim) if args.batch_dim.isdigit() else args.batch_dim
    model = build_yolo_shaped(args.image_size, args.classes, args.seed, batch_dim)
    onnx.save(model, str(Path(args.path)))
    convs = sum(node.op_type == "Conv" for node in model.graph.node)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    print(f"wrote {args.path}: {convs} convs, {len(model.graph.node)} nodes, {params / 1e6:.2f} M parameters")


if __name__ == "__main__":
    main()
