"""Checks that several test files make: one definition each.

- :func:`assert_cli_error`: the command line's contract for a user error.
- :func:`assert_same_outputs`: two models compute the same outputs through onnxruntime.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import numpy as np

from onnxcomp.cli import main
from onnxcomp.runtime import make_session


def assert_cli_error(capsys, args, message: str, no_files_in: Path | None = None) -> None:
    """``onnxcomp *args`` fails as every user error must: exit code 2, one line ``onnxcomp: error: ...``
    on stderr that contains ``message``, and (``no_files_in``) nothing written into that folder,
    not even a half-written or staged file, and every file there (the inputs) unchanged."""
    before = file_hashes(no_files_in) if no_files_in is not None else None
    code = main([str(a) for a in args])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert err.startswith("onnxcomp: error: ") and err.count("\n") == 1, err
    assert message in err, err
    if no_files_in is not None:
        assert file_hashes(no_files_in) == before, "the failed command left files behind or changed one"


def file_hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (by relative path, symlinks as their target's text) -> its SHA-256."""
    hashes = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            hashes[name] = "-> " + str(path.readlink())
        elif path.is_file():
            hashes[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            hashes[name] = "folder"
    return hashes


def cli_error(args) -> str:
    """The one-line message ``onnxcomp *args`` fails with (asserting exit code 2), without pytest's capsys."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in args])
    assert code == 2, err.getvalue()
    return err.getvalue()


def assert_same_outputs(model_a, model_b, feed: dict, rtol: float = 1e-5, atol: float = 0.0, *,
                        scale_atol: bool = False) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Both models through onnxruntime on ``feed`` give every output with the same shape and values
    within ``rtol`` and ``atol`` (``scale_atol``: ``atol`` times the largest magnitude of model_a's output,
    a tolerance for float32 rounding whatever the output's scale). Returns both models' outputs."""
    expected = make_session(model_a).run(None, feed)
    got = make_session(model_b).run(None, feed)
    assert len(got) == len(expected)
    for want, have in zip(expected, got):
        assert have.shape == want.shape
        tolerance = atol * np.abs(want).max() if scale_atol else atol
        np.testing.assert_allclose(have, want, rtol=rtol, atol=tolerance)
    return expected, got
