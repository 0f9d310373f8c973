"""A ResNet-50- or ResNeXt-50 (32x4d)-shaped ONNX model with random weights, for benchmarks.

Same layer shapes as torchvision's ``resnet50`` with batch norm folded into the
convolutions (so every conv has a bias): 7x7/2 stem, 3x3/2 max pool, bottleneck
stages [3, 4, 6, 3] (1x1, 3x3 with the stage's stride, 1x1), projection
shortcuts, ReLU, Add, global average pool, Flatten, Gemm 2048 -> 1000.
``groups=32, width_per_group=4`` gives torchvision's ``resnext50_32x4d``: each bottleneck's 3x3 conv
grouped in 32, its width twice ResNet-50's. Weights are He-initialised; the values mean nothing,
the shapes and the work per sample are what the benchmarks need.

    python benchmarks/resnet50.py resnet50.onnx [--seed 0] [--batch-dim N] [--image-size 224] [--resnext]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride)
EXPANSION = 4
OPSET = 17


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def conv(self, name, x, c_in, c_out, kernel, stride=1, relu=True, group=1):
        fan_in = c_in // group * kernel * kernel
        weight = self.rng.standard_normal((c_out, c_in // group, kernel, kernel)) * np.sqrt(2.0 / fan_in)
        bias = self.rng.standard_normal(c_out) * 0.01
        self._add(f"{name}.weight", weight)
        self._add(f"{name}.bias", bias)
        pad = kernel // 2
        out = f"{name}.out"
        self.nodes.append(helper.make_node(
            "Conv", [x, f"{name}.weight", f"{name}.bias"], [out], name=name,
            kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4, group=group,
        ))
        return self.relu(f"{name}.relu", out) if relu else out

    def relu(self, name, x):
        self.nodes.append(helper.make_node("Relu", [x], [f"{name}.out"], name=name))
        return f"{name}.out"

    def bottleneck(self, name, x, c_in, planes, stride, groups=1, width_per_group=64):
        c_out = planes * EXPANSION
        width = planes * width_per_group // 64 * groups  # torchvision's Bottleneck
        y = self.conv(f"{name}.conv1", x, c_in, width, 1)
        y = self.conv(f"{name}.conv2", y, width, width, 3, stride, group=groups)
        y = self.conv(f"{name}.conv3", y, width, c_out, 1, relu=False)
        shortcut = x
        if stride != 1 or c_in != c_out:
            shortcut = self.conv(f"{name}.downsample", x, c_in, c_out, 1, stride, relu=False)
        self.nodes.append(helper.make_node("Add", [y, shortcut], [f"{name}.add"], name=f"{name}.add"))
        return self.relu(f"{name}.relu", f"{name}.add"), c_out

    def classifier(self, x, c_in, classes):
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], ["avgpool.out"], name="avgpool"))
        self.nodes.append(helper.make_node("Flatten", ["avgpool.out"], ["flatten.out"], name="flatten", axis=1))
        self._add("fc.weight", self.rng.standard_normal((classes, c_in)) * np.sqrt(2.0 / c_in))
        self._add("fc.bias", self.rng.standard_normal(classes) * 0.01)
        self.nodes.append(helper.make_node(
            "Gemm", ["flatten.out", "fc.weight", "fc.bias"], ["output"], name="fc", transB=1,
        ))

    def _add(self, name, value):
        self.initializers.append(numpy_helper.from_array(value.astype(np.float32), name))


def build_resnet50(path: str | Path | None, seed: int = 0, batch_dim: str | int = "N",
                   image_size: int = 224, groups: int = 1, width_per_group: int = 64) -> onnx.ModelProto:
    """Build the model, write it to ``path`` (unless None) and return it.

    ``image_size``: the input's height and width (224 is ResNet-50's; smaller ones make quick dry runs).
    ``groups``, ``width_per_group``: the bottlenecks' 3x3 convs (32, 4: ResNeXt-50 32x4d)."""
    b = _Builder(seed)
    x = b.conv("conv1", "input", 3, 64, 7, stride=2)
    b.nodes.append(helper.make_node(
        "MaxPool", [x], ["maxpool.out"], name="maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4,
    ))
    x, channels = "maxpool.out", 64
    for stage, (width, blocks, stride) in enumerate(STAGES, start=1):
        for block in range(blocks):
            x, channels = b.bottleneck(f"layer{stage}.{block}", x, channels, width, stride if block == 0 else 1,
                                       groups, width_per_group)
    b.classifier(x, channels, 1000)
    graph = helper.make_graph(
        b.nodes, "resnet50",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch_dim, 3, image_size, image_size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch_dim, 1000])],
        initializer=b.initializers,
    )
    # IR 8 goes with opset 17 and loads in any onnxruntime from 1.13 on.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model)
    if path is not None:
        onnx.save(model, str(path))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="output .onnx file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-dim", default="N", help="symbolic name or a fixed size for the batch dimension")
    parser.add_argument("--image-size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--resnext", action="store_true", help="ResNeXt-50 32x4d: grouped 3x3 convs")
    args = parser.parse_args()
    batch_dim = int(args.batch_dim) if args.batch_dim.isdigit() else args.batch_dim
    model = build_resnet50(args.path, args.seed, batch_dim, args.image_size,
                           *((32, 4) if args.resnext else (1, 64)))
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    print(f"wrote {args.path}: {len(model.graph.node)} nodes, {params / 1e6:.2f} M parameters")


if __name__ == "__main__":
    main()
