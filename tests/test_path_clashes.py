"""A property of every command: whatever path argument names a file that another argument reads or
writes (the same path spelled another way, a hard link, a symlink, the model's external data file),
the run is refused (exit 2) and no input file changes. Random pairs, seeded, a few seconds."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcomp import calibrate, compress
from onnxcomp.io import STAGING

from checks import file_hashes
from models import conv_model
from test_fuzz import _run

SECONDS = 4.0
INPUTS = ("m.onnx", "m.weights", "c.npz", "v.npz", "s.npz", "small.onnx")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, bytes]:
    """The bytes of every input file: a model with external data, data, validation data, statistics
    and a compressed model."""
    folder = tmp_path_factory.mktemp("inputs")
    model = conv_model()
    onnx.save_model(conv_model(), folder / "m.onnx", save_as_external_data=True, location="m.weights",
                    size_threshold=0)  # (saving moves the tensors of the model it is given out of it)
    images = np.random.default_rng(0).standard_normal((24, 6, 11, 11)).astype(np.float32)
    np.savez(folder / "c.npz", x=images)
    np.savez(folder / "v.npz", x=images[:8] + 1)
    calibrate(model, images, progress=False).save(folder / "s.npz")
    small, _ = compress(model, images, keep=0.5, progress=False, check_latency=False)
    onnx.save(small, folder / "small.onnx")
    return {name: (folder / name).read_bytes() for name in INPUTS}


# Each command with its path arguments: (option or None for a positional, the file it names); the
# last ones are what it writes.
COMMANDS = {
    "compress": ([(None, "m.onnx"), ("--data", "c.npz"), ("--validation-data", "v.npz")],
                 [(None, "out.onnx"), ("--report", "r.json")], ["--keep", "0.5", "--quiet", "--no-latency-check"]),
    "compress --stats": ([(None, "m.onnx"), ("--stats", "s.npz"), ("--data", "v.npz")],
                         [(None, "out.onnx"), ("--report", "r.json")], ["--keep", "0.5", "--quiet",
                                                                         "--no-latency-check"]),
    "calibrate": ([(None, "m.onnx"), ("--data", "c.npz"), ("--merge", "s.npz")], [(None, "stats.npz")], ["--quiet"]),
    "bench": ([(None, "m.onnx"), (None, "small.onnx"), ("--data", "v.npz")], [("--json", "b.json")],
              ["--batch-sizes", "1", "--repeats", "2", "--warmup", "1", "--no-floor"]),
}
ALIASES = ("same path", "spelled otherwise", "hard link", "symlink")


def _arguments(command: str, files: dict[str, Path]) -> list[str]:
    reads, writes, options = COMMANDS[command]
    words = [command.split()[0]]
    for option, name in [*reads, *writes]:
        words += ([option] if option else []) + [str(files[name])]
    return words + options


def _alias(kind: str, target: Path, folder: Path) -> Path:
    if kind == "same path":
        return target
    if kind == "spelled otherwise":
        return folder / "sub" / ".." / target.name
    alias = folder / f"alias-{target.name}"
    if kind == "hard link" and target.exists():
        os.link(target, alias)
    else:  # a symlink (also to a file that does not exist yet: another output)
        alias.symlink_to(target)
    return alias


def test_no_pair_of_path_arguments_changes_an_input(tmp_path, inputs):
    rng = np.random.default_rng(0)
    deadline, runs = time.monotonic() + SECONDS, 0
    while time.monotonic() < deadline or runs < 8:
        folder = tmp_path / str(runs)
        (folder / "sub").mkdir(parents=True)
        for name, data in inputs.items():
            (folder / name).write_bytes(data)
        command = list(COMMANDS)[rng.integers(len(COMMANDS))]
        reads, writes, _ = COMMANDS[command]
        written = writes[rng.integers(len(writes))][1]
        others = [name for _, name in reads] + ["m.weights"] + [name for _, name in writes if name != written]
        target = others[rng.integers(len(others))]
        kind = ALIASES[rng.integers(len(ALIASES))]
        files = {name: folder / name for name in [*INPUTS, "out.onnx", "r.json", "stats.npz", "b.json"]}
        files[written] = _alias(kind, folder / target, folder)
        before = file_hashes(folder)
        code = _run(_arguments(command, files))
        case = f"run {runs}: {command}, {written} as a {kind} of {target}"
        assert code == 2, f"{case}: exit {code}"
        assert file_hashes(folder) == before, f"{case}: a file changed or appeared"
        assert not [p for p in folder.iterdir() if p.name.startswith(STAGING)], case
        runs += 1
