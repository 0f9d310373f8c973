"""What onnxcomp writes: every file atomically, and column tables for people.

A file appears complete or not at all: it is written into a fresh folder beside
its destination and renamed into place (the main file last, after any external
data), and the folder is removed whatever happens. Problems the user can fix
(a missing folder, a path that is a folder, a full disk) are one-line errors.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import OnnxcompError


def check_writable(path: str | os.PathLike, what: str = "output", extra_names: tuple[str, ...] = ()) -> Path:
    """``path`` as a Path, or a one-line error when it cannot be written, checked before any work:
    not a folder, in a folder that exists, a name (and ``extra_names``, files written beside it such
    as external data) the file system takes, and a folder where this process can create and remove
    a file (a real probe: permissions, a read-only mount, ``/proc`` all say no only when tried)."""
    path = Path(path)
    try:
        if path.is_dir():
            raise OnnxcompError(f"{what} path {path} is a folder: give a file name")
        directory = path.parent if str(path.parent) else Path(".")
        if not directory.is_dir():
            raise OnnxcompError(f"{what} folder does not exist: {directory}")
        _check_name_lengths(directory, (path.name, *extra_names))
    except OSError as exc:  # a path past PATH_MAX, a name past NAME_MAX
        raise OnnxcompError(f"cannot write {what} {_shown(path)}: {exc.strerror or exc}") from None
    try:
        _probe(directory)
    except OSError as exc:  # no permission, a read-only mount, /proc
        raise OnnxcompError(f"cannot write {what} {_shown(path)}: its folder takes no new file "
                            f"({exc.strerror or exc})") from None
    return path


def _check_name_lengths(directory: Path, names) -> None:
    """Each name within the folder's NAME_MAX (the staged copy has the same name, in a short folder)."""
    try:
        most = os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows), or the file system will not say
        most = 255
    for name in names:
        if len(os.fsencode(name)) > most:
            raise OSError(errno.ENAMETOOLONG, f"File name too long ({name[:20]}...: over {most} bytes)")


def _probe(directory: Path) -> None:
    """Create and remove a file in ``directory``: an OSError if that cannot be done."""
    descriptor, probe = tempfile.mkstemp(prefix=_staging_prefix(), dir=directory)
    os.close(descriptor)
    os.unlink(probe)


def _shown(path: Path, most: int = 60) -> str:
    """A path short enough for a one-line message (its end, which tells most)."""
    text = str(path)
    return text if len(text) <= most else "..." + text[-(most - 3):]


def check_readable(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path, or a one-line error unless it is a regular file (symlinks followed): a
    FIFO would block the read forever, a device or socket never ends (``what``: "model", "data", ...)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise OnnxcompError(f"{what} file not found: {path}") from None
    except OSError as exc:
        raise OnnxcompError(f"cannot read {what} file {_shown(path)}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise OnnxcompError(f"{what} file {path} is a folder: give a file")
    if not stat.S_ISREG(mode):
        raise OnnxcompError(f"{what} file {path} is not a regular file (a FIFO, a device or a socket): give a file")
    return path


def refuse_clashes(reads, writes) -> None:
    """A one-line error when a file to write is a file to read or another file to write.

    ``reads``, ``writes``: ``(role, path)`` pairs (``path`` None: not given). Checked before any
    work: an output over an input would destroy the user's file (a model, its external data, the
    calibration data), two outputs over each other would lose one. Paths are compared resolved
    (symlinks followed), and as files where both exist (hard links are the same file too)."""
    given_reads = [(role, Path(path)) for role, path in reads if path is not None]
    given_writes = [(role, Path(path)) for role, path in writes if path is not None]
    for i, (role, path) in enumerate(given_writes):
        for other_role, other in given_reads + given_writes[:i]:
            if _same_file(path, other):
                raise OnnxcompError(f"the {role} {path} is the {other_role} {other}: write the {role} "
                                    "to another file")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # a symlink loop, a name too long: not the same file as far as we can tell
        return False


# Staging folders (and writability probes) are named ``.onnxcomp-staging.<pid>.<host>.<random>``: a
# run killed while writing (SIGKILL, a power cut) leaves one behind, and the next run that writes into
# the same folder removes those whose process is gone, on this host, owned by this user; nobody else's.
STAGING = ".onnxcomp-staging."


@contextmanager
def staged(path: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """A fresh folder beside ``path``; the files written into it are moved into place when the
    block ends without an error, ``path``'s own name last. Nothing is left behind otherwise (an
    exception, Ctrl-C, SIGTERM: see :mod:`onnxcomp.cli`)."""
    path = check_writable(path, what)
    directory = path.parent if str(path.parent) else Path(".")
    remove_stale_staging(directory)
    try:
        folder = Path(tempfile.mkdtemp(prefix=_staging_prefix(), dir=directory))
    except OSError as exc:
        raise OnnxcompError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    try:
        yield folder
        files = sorted(folder.iterdir(), key=lambda f: f.name == path.name)
        for staged_file in files:
            os.replace(staged_file, directory / staged_file.name)
    except OSError as exc:  # a full disk, a read-only folder: the user's to fix
        raise OnnxcompError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _staging_prefix() -> str:
    return f"{STAGING}{os.getpid()}.{socket.gethostname()}."


def remove_stale_staging(directory: Path) -> list[Path]:
    """Remove the staging folders in ``directory`` that runs of this user on this host left behind
    when they were killed (their process no longer exists); returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if entry.name.startswith(STAGING) and _stale(entry):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:  # a writability probe
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _stale(entry: os.DirEntry) -> bool:
    pid_text, _, rest = entry.name[len(STAGING):].partition(".")
    host, _, _ = rest.rpartition(".")
    if not pid_text.isdigit() or host != socket.gethostname():
        return False
    try:
        if entry.is_symlink() or entry.stat(follow_symlinks=False).st_uid != os.getuid():
            return False
    except OSError:
        return False
    return not _alive(int(pid_text))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process has that id now
        return True
    return True


def write_json(path: str | os.PathLike, data, what: str = "output") -> None:
    """``data`` as indented JSON (NaN and infinities become null), atomically."""
    path = Path(path)
    with staged(path, what) as folder:
        text = json.dumps(json_safe(data), indent=2, allow_nan=False)
        (folder / path.name).write_text(text + "\n")


def json_safe(value):
    """Plain JSON data: NumPy scalars as Python numbers, non-finite floats as None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def columns(rows, right=(), rule: bool = False) -> list[str]:
    """Rows of cells as aligned text columns (``right``: indices of right-aligned columns);
    ``rule``: a line of dashes under the first row."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [str(v).rjust(w) if i in right else str(v).ljust(w) for i, (v, w) in enumerate(zip(row, widths))]
        out.append("  ".join(cells).rstrip())
    if rule:
        out.insert(1, "  ".join("-" * w for w in widths))
    return out
