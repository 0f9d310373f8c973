#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with the wheels the GPU machine lacks, for Python 3.12 manylinux x86-64.
#
#   bash benchmarks/gpu_wheels.sh            # then: the device tool's run with carry [".whl"]
#
# The device image has numpy, scipy, onnx 1.23, onnxruntime 1.30 (CPU build), cupy-cuda13x 14.2,
# ml-dtypes, tqdm and pytest, and no network. onnxcomp needs one more package there:
#   onnx-graphsurgeon 0.6.1 (pure Python, ~60 kB; needs ml-dtypes, numpy, onnx: all on the image).
# onnxruntime-gpu is not fetched: its wheel (1.31.1, CUDA 13) is 256 MB, the CUDA provider library in
# it 284 MB (186 MB even xz -6), far over the 64 MiB a device call can carry. So the CUDA EP steps
# of gpu_check.sh (calibration on the CUDA EP, `onnxcomp bench --provider cuda`) report "skipped".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
# One version of each package in .whl/: two stop the whole install on the device.
rm -f .whl/onnx_graphsurgeon-*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "onnx-graphsurgeon==0.6.1"
ls -l .whl
du -ch .whl/*.whl | tail -1
