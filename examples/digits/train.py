"""Train the small digits CNN that serves as onnxcomp's embedded example model.

Development tool only: torch is NOT a runtime dependency of onnxcomp. Run it in a separate venv:

    python3 -m venv /work/trainvenv
    /work/trainvenv/bin/pip install torch==2.13.0 scikit-learn onnx onnxruntime numpy
    /work/trainvenv/bin/python examples/digits/train.py

(Pin torch exactly: that pin resolves to a CPU build; an unpinned torch pulls the CUDA wheels.)

Data: scikit-learn's load_digits() (1797 8x8 grey images), scaled to [0,1], upsampled to 32x32
(bilinear), a stratified held-out split of 500, the rest for training; 256 of the training
images (stratified) form the calibration set. Writes, next to this file: digits_cnn.onnx,
calib.npz (key "input") and heldout.npz (keys "input", "labels").
"""
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

OUT = Path(__file__).resolve().parent
SEED, EPOCHS, BATCH, LR = 0, 20, 64, 2e-3

torch.manual_seed(SEED)
torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)


def load_data():
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]  # (N,1,8,8) in [0,1]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).numpy()
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=500, stratify=y, random_state=SEED)
    calib, _ = train_test_split(x_tr, train_size=256, stratify=y_tr, random_state=SEED)
    return x_tr, y_tr, x_te, y_te, np.ascontiguousarray(calib)


def make_model():
    layers = [
        ("conv1", nn.Conv2d(1, 32, 3, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(32, 32, 3, padding=1)), ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),                                          # 32x32 -> 16x16
        ("conv3", nn.Conv2d(32, 64, 3, padding=1)), ("relu3", nn.ReLU()),
        ("pool3", nn.MaxPool2d(2)),                                          # -> 8x8
        ("conv4", nn.Conv2d(64, 64, 3, padding=1)), ("relu4", nn.ReLU()),
        ("pool4", nn.MaxPool2d(2)),                                          # -> 4x4
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(64 * 4 * 4, 64)), ("relu5", nn.ReLU()),
        ("fc2", nn.Linear(64, 10)),
    ]
    return nn.Sequential(OrderedDict(layers))


def random_shift(x, gen, max_shift=2):
    """Shift each image by an independent integer offset in [-max_shift, max_shift] (zero fill)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    off = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    return torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(off.tolist())])


@torch.no_grad()
def accuracy(model, x, y):
    return (model(torch.from_numpy(x)).argmax(1).numpy() == y).mean()


def train(model, x_tr, y_tr):
    gen = torch.Generator().manual_seed(SEED)
    xs, ys = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    steps = EPOCHS * ((len(xs) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
    for epoch in range(EPOCHS):
        model.train()
        perm, total = torch.randperm(len(xs), generator=gen), 0.0
        for i in range(0, len(xs), BATCH):
            idx = perm[i:i + BATCH]
            loss = F.cross_entropy(model(random_shift(xs[idx], gen)), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1:2d}  loss {total / len(xs):.4f}")
    return model.eval()


def export(model, path):
    # The TorchScript exporter (dynamo=False) gives a plain opset-17 Conv/Gemm graph with no
    # onnxscript dependency; silence its deprecation notice.
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
    torch.onnx.export(
        model, (torch.zeros(1, 1, 32, 32),), str(path), dynamo=False, opset_version=17,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in m.graph.initializer)
    shapes = {t.name: list(t.dims) for t in m.graph.initializer}
    for n in m.graph.node:
        print(f"  {n.op_type:8s} {n.name:16s}", *(f"{i}{shapes[i]}" for i in n.input if i in shapes))


def main():
    x_tr, y_tr, x_te, y_te, calib = load_data()
    print(f"train {x_tr.shape}  heldout {x_te.shape}  calib {calib.shape}")
    model = train(make_model(), x_tr, y_tr)
    acc = accuracy(model, x_te, y_te)
    print(f"torch held-out accuracy: {acc:.4f}")
    assert acc >= 0.97, acc

    path = OUT / "digits_cnn.onnx"
    export(model, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ort_logits = sess.run(["logits"], {"input": x_te})[0]
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_te)).numpy()
    err = np.abs(ort_logits - torch_logits).max()
    ort_acc = (ort_logits.argmax(1) == y_te).mean()
    print(f"onnxruntime held-out accuracy: {ort_acc:.4f}  max |ort - torch| = {err:.2e}")
    assert err <= 1e-4 and ort_acc == acc

    np.savez_compressed(OUT / "calib.npz", input=calib.astype(np.float32))
    np.savez_compressed(OUT / "heldout.npz", input=x_te.astype(np.float32), labels=y_te)
    print("wrote", ", ".join(p.name for p in (path, OUT / "calib.npz", OUT / "heldout.npz")))


if __name__ == "__main__":
    main()
