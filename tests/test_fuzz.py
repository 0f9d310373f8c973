"""Randomly corrupted model and data files: a one-line error (exit 2) or a good run, never an internal
error (exit 1) and never a file left behind. Seeded; each test stops after a few seconds."""

from __future__ import annotations

import contextlib
import io
import time

import numpy as np
import onnx
import pytest

from onnxcomp.cli import main

from models import conv_model

SECONDS = 4.0


def _corrupt(data: bytes, rng) -> bytes:
    """One of: flipped bytes, a truncation, a spliced-in run of random bytes."""
    data = bytearray(data)
    kind = rng.integers(3)
    if kind == 0:
        for position in rng.integers(0, len(data), size=rng.integers(1, 8)):
            data[position] ^= int(rng.integers(1, 256))
    elif kind == 1:
        data = data[: rng.integers(0, len(data))]
    else:
        at = int(rng.integers(0, len(data)))
        data[at:at] = rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    return bytes(data)


def _run(args) -> int:
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return main([str(a) for a in args])


def _fuzz(tmp_path, seed, make_args):
    rng = np.random.default_rng(seed)
    deadline, runs = time.monotonic() + SECONDS, 0
    while time.monotonic() < deadline:
        out = tmp_path / "out.onnx"
        code = _run(make_args(rng, out))
        assert code in (0, 2), f"run {runs}: exit {code}"
        if code == 2:
            assert not out.exists(), f"run {runs}: a refused run left {out}"
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
        assert not leftovers, f"run {runs}: staged files left: {leftovers}"
        out.unlink(missing_ok=True)
        runs += 1
    assert runs >= 5


@pytest.mark.parametrize("seed", [0, 1])
def test_corrupted_models(tmp_path, seed):
    good = conv_model().SerializeToString()
    data = tmp_path / "data.npy"
    np.save(data, np.random.default_rng(0).standard_normal((20, 6, 11, 11)).astype(np.float32))

    def args(rng, out):
        model = tmp_path / "model.onnx"
        model.write_bytes(_corrupt(good, rng))
        return ["compress", model, out, "--data", data, "--keep", "0.5", "--quiet"]

    _fuzz(tmp_path, seed, args)


@pytest.mark.parametrize("seed", [0, 1])
def test_corrupted_npz_data(tmp_path, seed):
    model = tmp_path / "model.onnx"
    onnx.save(conv_model(), model)
    good = io.BytesIO()
    np.savez(good, x=np.random.default_rng(0).standard_normal((20, 6, 11, 11)).astype(np.float32))

    def args(rng, out):
        data = tmp_path / "data.npz"
        data.write_bytes(_corrupt(good.getvalue(), rng))
        return ["compress", model, out, "--data", data, "--keep", "0.5", "--quiet"]

    _fuzz(tmp_path, seed, args)
