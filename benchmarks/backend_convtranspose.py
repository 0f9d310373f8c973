"""Backend ConvTranspose models: initializers stripped from the inputs, compressed at keep 1.0 and 0.5."""
import subprocess, sys
import numpy as np, onnx, onnxruntime as ort
from onnx import numpy_helper
D = "/work/main/.venv/lib/python3.11/site-packages/onnx/backend/test/data/"
for case in ["pytorch-converted/test_ConvTranspose2d", "pytorch-converted/test_ConvTranspose2d_no_bias",
             "pytorch-operator/test_operator_convtranspose"]:
    m = onnx.load(D + case + "/model.onnx")
    inits = {t.name for t in m.graph.initializer}
    keep = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]; m.graph.input.extend(keep)
    m.ir_version = max(m.ir_version, 4)  # IR 4 is the first to allow initializers that are not inputs
    name = case.split("/")[-1]
    onnx.save(m, f"/tmp/ctb/{name}.onnx")
    t = onnx.TensorProto(); t.ParseFromString(open(D + case + "/test_data_set_0/input_0.pb", "rb").read())
    x = numpy_helper.to_array(t)
    rng = np.random.default_rng(0)
    data = np.concatenate([x] + [x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype) for _ in range(15)])
    np.savez(f"/tmp/ctb/{name}.npz", **{keep[0].name: data})
    ref = ort.InferenceSession(f"/tmp/ctb/{name}.onnx").run(None, {keep[0].name: x})
    for k in ["1.0", "0.5"]:
        out = f"/tmp/ctb/{name}_{k}.onnx"
        r = subprocess.run([sys.executable, "-c", "import sys; from onnxcomp.cli import main; sys.exit(main())", "compress", f"/tmp/ctb/{name}.onnx", out,
                            "--data", f"/tmp/ctb/{name}.npz", "--keep", k], capture_output=True, text=True)
        if r.returncode:
            print(name, k, "exit", r.returncode, r.stderr.strip()[-300:]); continue
        c = onnx.load(out); onnx.checker.check_model(c, full_check=True)
        got = ort.InferenceSession(out).run(None, {keep[0].name: x})
        rel = max(float(np.abs(g - w).max() / np.abs(w).max()) for g, w in zip(got, ref))
        same = [o.name for o in c.graph.output] == [o.name for o in m.graph.output] and all(g.shape == w.shape for g, w in zip(got, ref))
        print(f"{name} keep {k}: ops {[n.op_type for n in c.graph.node]} rel {rel:.2e} same-sig {same} "
              f"finite {all(np.isfinite(g).all() for g in got)}")
# Full-rank rewrites of the same layers (what --keep 1.0 leaves alone): exact against the original.
sys.path.insert(0, "tests")
from test_convtranspose import _full_rank_svd, _full_rank_tucker2
from onnxcomp.model import find_layers
from onnxcomp.passes import apply_decompositions
for name in ["test_ConvTranspose2d", "test_ConvTranspose2d_no_bias", "test_operator_convtranspose"]:
    m = onnx.load(f"/tmp/ctb/{name}.onnx"); x = np.load(f"/tmp/ctb/{name}.npz")
    feed = {k: x[k][: len(x[k]) // 16] for k in x.files}  # the test input itself
    ref = ort.InferenceSession(m.SerializeToString()).run(None, feed)[0]
    layer = find_layers(m)[0][0]
    for make in (_full_rank_svd, _full_rank_tucker2):
        c = apply_decompositions(m, [(layer, make(layer))]); onnx.checker.check_model(c, full_check=True)
        got = ort.InferenceSession(c.SerializeToString()).run(None, feed)[0]
        print(f"{name} full-rank {make.__name__}: ops {[n.op_type for n in c.graph.node]} rel {np.abs(got - ref).max() / np.abs(ref).max():.2e}")
