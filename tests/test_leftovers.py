"""No leftovers, no late refusals: SIGTERM cleans up as Ctrl-C does, a killed run's staging folder is
removed by the next run, long names that fit are written, names that do not are refused first."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxcomp.cli
from onnxcomp.cli import main
from onnxcomp.io import STAGING, remove_stale_staging

from checks import assert_cli_error, file_hashes
from models import conv_model

ROOT = Path(__file__).resolve().parent.parent

# A compress whose model writer stops after writing the staged file: it then sends itself SIGTERM,
# or (SLEEP) waits to be killed.
WRITER = textwrap.dedent("""
    import os, signal, sys, time
    import onnx
    real = onnx.save_model

    def save_model(*args, **kwargs):
        real(*args, **kwargs)
        if sys.argv[1] == "TERM":
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)

    onnx.save_model = save_model
    from onnxcomp.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _inputs(folder: Path) -> list[str]:
    onnx.save(conv_model(), folder / "m.onnx")
    np.savez(folder / "c.npz", x=np.random.default_rng(0).standard_normal((20, 6, 11, 11)).astype(np.float32))
    return ["compress", str(folder / "m.onnx"), str(folder / "o.onnx"), "--data", str(folder / "c.npz"),
            "--keep", "0.5", "--quiet", "--no-latency-check"]


def _writer(how: str, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, how, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _staging(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(STAGING)]


def test_sigterm_while_writing_removes_the_staging_folder(tmp_path):
    """Was: the hidden staging folder left with a full model in it."""
    process = _writer("TERM", _inputs(tmp_path))
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err.decode()
    assert err.decode() == "onnxcomp: terminated\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "m.onnx"]


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(tmp_path, capsys):
    args = _inputs(tmp_path)
    process = _writer("SLEEP", args)
    deadline = time.monotonic() + 120
    while not any(any(folder.iterdir()) for folder in _staging(tmp_path)):  # the model is staged
        assert time.monotonic() < deadline and process.poll() is None, process.stderr.read().decode()
        time.sleep(0.05)
    process.kill()  # SIGKILL: nothing of onnxcomp runs
    process.wait()
    left = _staging(tmp_path)
    assert len(left) == 1 and (left[0] / "o.onnx").is_file()
    assert main(args) == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "m.onnx", "o.onnx"]


def test_only_stale_staging_of_this_user_on_this_host_is_removed(tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    host = socket.gethostname()
    names = {"dead here": f"{STAGING}{finished.pid}.{host}.abc", "alive here": f"{STAGING}{os.getpid()}.{host}.def",
             "dead elsewhere": f"{STAGING}{finished.pid}.another-host.ghi", "not ours": ".onnxcomp-other.1.x",
             "dead probe here": f"{STAGING}{finished.pid}.{host}.jkl"}
    for what, name in names.items():
        if "probe" in what:
            (tmp_path / name).write_bytes(b"")
        else:
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.onnx").write_bytes(b"partial")
    removed = remove_stale_staging(tmp_path)
    assert sorted(p.name for p in removed) == sorted([names["dead here"], names["dead probe here"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        names[what] for what in ("alive here", "dead elsewhere", "not ours"))


def test_the_sigterm_handler_is_put_back_after_main(tmp_path, capsys):
    before = signal.getsignal(signal.SIGTERM)
    main(["inspect", str(tmp_path / "none.onnx")])
    capsys.readouterr()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_name_of_up_to_255_bytes_is_written_and_leaves_nothing(tmp_path, capsys):
    """Was: names of 246-255 bytes failed at the end, the staging folder's name (".<name>.<random>")
    passing 255; staging folders have short names now."""
    args = _inputs(tmp_path)
    long = tmp_path / ("m" * 250 + ".onnx")
    args[2] = str(long)
    assert main(args) == 0, capsys.readouterr().err
    assert long.is_file() and not _staging(tmp_path)


def test_an_external_data_name_too_long_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """A model that will be written with external data (here: any, the threshold lowered) needs room for
    the data file's name (<name>.data) too."""
    monkeypatch.setattr(onnxcomp.cli, "EXTERNAL_DATA_BYTES", 10)
    args = _inputs(tmp_path)
    args[2] = str(tmp_path / ("m" * 250 + ".onnx"))
    assert_cli_error(capsys, args, "File name too long", no_files_in=tmp_path)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_bench_json_into_a_folder_that_takes_no_file_is_refused_before_the_run(tmp_path, capsys):
    onnx.save(conv_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 6, 11, 11), np.float32))
    hashes = file_hashes(tmp_path)
    assert_cli_error(capsys, ["bench", tmp_path / "m.onnx", tmp_path / "m.onnx", "--data", tmp_path / "c.npz",
                              "--json", "/proc/b.json"], "cannot write output /proc/b.json: its folder takes no new")
    assert file_hashes(tmp_path) == hashes
