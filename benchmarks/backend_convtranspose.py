"""The ConvTranspose models of the onnx wheel's backend test data, through `onnxcomp compress`.

Each model's initializers are taken off its graph inputs (IR 3 lists them there; the model is
stamped IR 4, the first that allows it), calibrated on its test input plus 15 perturbed copies,
compressed at --keep 1.0 and 0.5 by the command line, and checked with onnx.checker and
onnxruntime on the test input; then the layer's full-rank SVD and Tucker-2 chains are written
by the rewrite passes and compared with the original (what --keep 1.0 leaves untouched).

    python benchmarks/backend_convtranspose.py
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from onnxcomp.model import find_layers  # noqa: E402
from onnxcomp.passes import apply_decompositions  # noqa: E402
from test_convtranspose import _full_rank_svd, _full_rank_tucker2  # noqa: E402

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
CASES = ["pytorch-converted/test_ConvTranspose2d", "pytorch-converted/test_ConvTranspose2d_no_bias",
         "pytorch-operator/test_operator_convtranspose"]
CLI = [sys.executable, "-c", "import sys; from onnxcomp.cli import main; sys.exit(main())", "compress"]


def without_initializer_inputs(case: str) -> onnx.ModelProto:
    model = onnx.load(DATA / case / "model.onnx")
    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.ir_version = max(model.ir_version, 4)
    return model


def test_input(case: str) -> np.ndarray:
    tensor = onnx.TensorProto()
    tensor.ParseFromString((DATA / case / "test_data_set_0" / "input_0.pb").read_bytes())
    return numpy_helper.to_array(tensor)


def run(model_path, feed):
    return ort.InferenceSession(str(model_path)).run(None, feed)


def main(folder: Path) -> None:
    for case in CASES:
        name, model = case.split("/")[-1], without_initializer_inputs(case)
        path, data = folder / f"{name}.onnx", folder / f"{name}.npz"
        onnx.save(model, path)
        x, input_name = test_input(case), model.graph.input[0].name
        rng = np.random.default_rng(0)
        copies = [x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype) for _ in range(15)]
        np.savez(data, **{input_name: np.concatenate([x, *copies])})
        feed = {input_name: x}
        want = run(path, feed)
        for keep in ("1.0", "0.5"):
            out = folder / f"{name}_{keep}.onnx"
            done = subprocess.run([*CLI, str(path), str(out), "--data", str(data), "--keep", keep],
                                  capture_output=True, text=True)
            if done.returncode:
                print(f"{name} --keep {keep}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
                continue
            compressed = onnx.load(out)
            onnx.checker.check_model(compressed, full_check=True)
            got = run(out, feed)
            same = ([o.name for o in compressed.graph.output] == [o.name for o in model.graph.output]
                    and all(g.shape == w.shape for g, w in zip(got, want)))
            print(f"{name} --keep {keep}: {[n.op_type for n in compressed.graph.node]} "
                  f"max rel diff {_rel(got, want):.2e}, same outputs and shapes {same}, "
                  f"finite {all(np.isfinite(g).all() for g in got)}")
        layer = find_layers(model)[0][0]
        for make in (_full_rank_svd, _full_rank_tucker2):
            chain = apply_decompositions(model, [(layer, make(layer))])
            onnx.checker.check_model(chain, full_check=True)
            got = ort.InferenceSession(chain.SerializeToString()).run(None, feed)
            print(f"{name} {make.__name__.strip('_')}: {[n.op_type for n in chain.graph.node]} "
                  f"max rel diff {_rel(got, want):.2e}")


def _rel(got, want) -> float:
    return max(float(np.abs(g - w).max() / np.abs(w).max()) for g, w in zip(got, want))


if __name__ == "__main__":
    ort.set_default_logger_severity(3)  # the opset-6 models' legacy-support warnings
    with tempfile.TemporaryDirectory() as folder:
        main(Path(folder))
