"""onnxruntime latency of one conv against its SVD / Tucker-2 / CP chains at the same MACs.

Low-rank chains are not faster in proportion to their MACs: each is several nodes, and CP's
are depthwise convolutions, which run far below a dense conv's arithmetic rate on a CPU. This
times one Conv (batch 1) against the chain each method rewrites it into at ``--keep`` of its
MACs, with ``onnxcomp.bench`` (interleaved pairs, median of per-pair ratios). Weights are
random and the chains fitted under the Frobenius norm: the time does not depend on the values.

    python benchmarks/chain_latency.py [--keep 0.5] [--threads 1]
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import numpy_helper

import onnxcomp
from onnxcomp.bench import bench
from onnxcomp.model import count_macs

# (name, C_out, C_in, k, H, W): the 3x3 convs of PP-OCRv4 det's neck at a 640x480 page, the digits
# CNN's conv2, and a ResNet-50 stage-3 conv at 224x224.
LAYERS = [
    ("PP-OCRv4 det neck", 24, 96, 3, 120, 160),
    ("PP-OCRv4 det neck", 24, 96, 3, 30, 40),
    ("digits conv2", 32, 32, 3, 32, 32),
    ("ResNet-50 stage 3", 256, 256, 3, 14, 14),
]
CHAINS = [("svd", "4way"), ("tucker2", "4way"), ("cp", "4way"), ("cp", "3way")]


def one_conv(c_out: int, c_in: int, k: int, height: int, width: int, seed: int = 0) -> onnx.ModelProto:
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, {c_in}, {height}, {width}] x) => (float[1, {c_out}, {height}, {width}] y) {{
        y = Conv <pads = [{k // 2}, {k // 2}, {k // 2}, {k // 2}]> (x, w, b)
    }}
    """
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((c_out, c_in, k, k)) / np.sqrt(c_in * k * k)
    model.graph.initializer.extend([numpy_helper.from_array(weight.astype(np.float32), "w"),
                                    numpy_helper.from_array(np.zeros(c_out, np.float32), "b")])
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(f"batch 1, {args.threads} intra-op thread(s), each chain at --keep {args.keep}; ratio = chain / dense conv "
          "time (median of interleaved pairs) [p10, p90]\n")
    print("| layer | input | dense ms | method | nodes | MACs kept | chain ms | latency ratio [p10, p90] |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, c_out, c_in, k, height, width in LAYERS:
        dense = one_conv(c_out, c_in, k, height, width)
        data = {"x": np.random.default_rng(1).standard_normal((4, c_in, height, width)).astype(np.float32)}
        shapes = {"x": [1, c_in, height, width]}
        dense_macs = count_macs(dense, shapes)
        for method, form in CHAINS:
            chain, _ = onnxcomp.compress(dense, method=method, cp_form=form, keep=args.keep, norm="frobenius",
                                         input_shapes=shapes, progress=False)
            timed = bench(dense, chain, data, batch_sizes=(1,), threads=args.threads).latency[0]
            label = method if method != "cp" else f"cp {form}"
            print(f"| {name} {c_out}x{c_in}x{k}x{k} | {height}x{width} | {timed.original.median_ms:.3f} | {label} | "
                  f"{len(chain.graph.node)} | {count_macs(chain, shapes) / dense_macs:.1%} | "
                  f"{timed.compressed.median_ms:.3f} | {timed.ratio:.2f} [{timed.pair_ratio_p10:.2f}, "
                  f"{timed.pair_ratio_p90:.2f}] |", flush=True)


if __name__ == "__main__":
    main()
