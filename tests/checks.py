"""Checks that several test files make: one definition each.

- :func:`assert_cli_error`: the command line's contract for a user error.
"""

from __future__ import annotations

from pathlib import Path

from onnxcomp.cli import main


def assert_cli_error(capsys, args, message: str, no_files_in: Path | None = None) -> None:
    """``onnxcomp *args`` fails as every user error must: exit code 2, one line ``onnxcomp: error: ...``
    on stderr that contains ``message``, and (``no_files_in``) nothing written into that folder,
    not even a half-written or staged file."""
    before = sorted(no_files_in.iterdir()) if no_files_in is not None else None
    code = main([str(a) for a in args])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert err.startswith("onnxcomp: error: ") and err.count("\n") == 1, err
    assert message in err, err
    if no_files_in is not None:
        assert sorted(no_files_in.iterdir()) == before, "the failed command left files behind"

