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


# ---------------------------------------------------------------- option strings


# Values each option is tried with: valid ones, boundaries and junk. Kept to what runs in well under a
# second on the tiny model (no --target-latency: it times chains; no large --threads).
OPTION_VALUES = {
    "--rank": ["0", "1", "3", "8,4", "2.5", "-1", "x", "100"],
    "--keep": ["0", "0.5", "1", "1.5", "-0.5", "nan", "inf", "x"],
    "--energy": ["0.9", "0", "1.01", "nan"],
    "--target-macs": ["0.5", "0", "2", "nan", "1e-9"],
    "--target-params": ["0.5", "1", "-1"],
    "--max-drop": ["0.1", "0", "-1", "nan", "inf"],
    "--rank-multiple": ["1", "8", "0", "-8", "100000", "2.0"],
    "--method": ["svd", "tucker2", "cp", "auto", "x"],
    "--cp-form": ["4way", "3way", "5way"],
    "--batch-size": ["1", "7", "0", "-3", "x"],
    "--threads": ["1", "2", "0", "-1", "x"],
    "--outputs": ["y", "y:1", "y:0", "y:1:1", "y:1:-1", "y:1:9", "y:-1", "z", "y:x", ":", "y:1:2:3"],
    "--input-shape": ["x:-1,6,11,11", "x:1,6,11,11", "x:0,6,11,11", "x:-2,6,11,11", "x:6,11", "z:1", "x:", "x"],
    "--skip": ["Conv", "Conv_0", "Gemm", "nothing", ""],
    "--sensitivity": ["auto", "on", "off", "measured", "x"],
    "--metric": ["fidelity", "top1", "cosine", "x"],
    "--norm": ["data", "frobenius", "x"],
    "--minimize": ["macs", "params", "latency", "x"],
    "--precision": ["float32", "float64", "float16"],
    "--row-mask": ["auto", "none", "x", ""],
    "--batch-axis": ["x:0", "x:1", "x:none", "x:-1", "y:0", "z:0", "x", "x:9"],
    "--initializer-inputs": ["constant", "refuse", "x"],
    "--rank-rule": ["energy", "entropy", "x"],
    "--spectrum": ["data", "weight", "x"],
    "--device": ["cpu", "auto", "x"],
    "--provider": ["cpu", "x"],
}
FLAGS = ["--evbmf", "--uncentered", "--flush-denormals", "--fail-if-unchanged", "--drop-padding-rows", "--bogus"]


def _options(rng) -> list[str]:
    words = []
    for _ in range(int(rng.integers(1, 5))):
        if rng.random() < 0.15:
            words.append(FLAGS[rng.integers(len(FLAGS))])
            continue
        option = list(OPTION_VALUES)[rng.integers(len(OPTION_VALUES))]
        values = OPTION_VALUES[option]
        words += [option, values[rng.integers(len(values))]]
    return words


@pytest.mark.parametrize("seed", [0, 1])
def test_random_option_strings(tmp_path, seed):
    model, data = tmp_path / "model.onnx", tmp_path / "data.npy"
    onnx.save(conv_model(), model)
    np.save(data, np.random.default_rng(0).standard_normal((20, 6, 11, 11)).astype(np.float32))

    def args(rng, out):
        return ["compress", model, out, "--data", data, "--quiet", "--no-latency-check", *_options(rng)]

    _fuzz(tmp_path, seed, args)


# ---------------------------------------------------------------- Python API arguments


API_VALUES = [None, True, False, 0, 1, 3, -1, 0.5, 1.5, float("nan"), float("inf"), "", "x", "svd", "y", "Conv",
              [], [1], ["y"], (2, 2), {}, {"x": [1]}, np.float32(0.5), np.int64(3), object()]


RULES = {"rank", "keep", "energy", "evbmf", "target_macs", "target_params", "max_drop"}


def _compress(model, data, **options):
    import onnxcomp

    if not options.keys() & RULES:  # a valid rule, so that the other values get as far as they can
        options["keep"] = 0.5
    return onnxcomp.compress(model, data, progress=False, check_latency=False, **options)


def _calibrate(model, data, **options):
    import onnxcomp

    return onnxcomp.calibrate(model, data, progress=False, **options)


def _bench(model, data, **options):
    from onnxcomp.bench import bench

    fast = {"repeats": 2, "warmup": 1, "floor": False, "batch_sizes": (1,)}
    return bench(model, model, data, **{**fast, **options})


# Each Python entry point, and the keyword arguments not fuzzed (what would only slow a run down:
# progress bars, latency timing, the CUDA provider that this machine may have).
API = {
    "compress": (_compress, ("progress", "check_latency", "target_latency", "latency_cache"), ("stats",
                                                                                               "validation_data")),
    "calibrate": (_calibrate, ("progress",), ()),
    "bench": (_bench, ("provider", "repeats", "warmup", "floor", "batch_sizes"), ()),
}


def _keywords(name: str) -> list[str]:
    import inspect

    import onnxcomp
    from onnxcomp.bench import bench
    from onnxcomp.config import CompressConfig

    function = {"compress": CompressConfig.from_options, "calibrate": onnxcomp.calibrate, "bench": bench}[name]
    _, skipped, extra = API[name]
    parameters = inspect.signature(function).parameters.values()
    return [p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name not in skipped] + list(extra)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("entry", API)
def test_random_python_arguments(entry, seed):
    """compress(), calibrate() and bench() with random keyword values: a result or an OnnxcompError,
    never another exception."""
    from onnxcomp.errors import OnnxcompError

    model = conv_model()
    data = np.random.default_rng(0).standard_normal((20, 6, 11, 11)).astype(np.float32)
    function, names = API[entry][0], _keywords(entry)
    rng = np.random.default_rng(seed)
    deadline, runs = time.monotonic() + SECONDS / 2, 0
    while time.monotonic() < deadline:
        options = {names[rng.integers(len(names))]: API_VALUES[rng.integers(len(API_VALUES))]
                   for _ in range(int(rng.integers(1, 4)))}
        try:
            function(model, data, **options)
        except OnnxcompError:
            pass
        except Exception as exc:  # noqa: BLE001 - the assertion names what broke
            raise AssertionError(f"run {runs}: {entry}(**{options!r}) raised {type(exc).__name__}: {exc}") from exc
        runs += 1
    assert runs >= 5
