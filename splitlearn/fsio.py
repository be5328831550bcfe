"""One way to write a file so that a crash leaves the old file or the new one, never half of one.

Every file splitlearn writes for a user (checkpoints and their manifest, exports, plans,
profiles, data, run records) goes through :func:`atomic_write`: the content goes to a
temporary file beside the target, which is flushed and fsynced, renamed over the target, and
the directory is fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_writable(path: str | Path) -> Path:
    """``path`` as a file to write: an :class:`OutputError` naming it when it is a directory
    or its directory is missing (checked before long work, so that it fails first)."""
    path = Path(path)
    if path.is_dir() or not path.parent.is_dir():
        from splitlearn.errors import OutputError

        what = "is a directory" if path.is_dir() else f"its directory {path.parent} does not exist"
        raise OutputError(f"cannot write {path}: {what}; give a file path in an existing directory")
    return path


def atomic_write(path: str | Path, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write ``data`` to ``path`` atomically and durably; return ``path``.

    ``data`` is text (UTF-8), bytes, or a function that writes the file at the path it is
    given (for writers that take a path, such as ``safetensors.torch.save_file`` or a
    matplotlib figure's ``savefig``). The parent directory must exist: a target that is a
    directory or whose directory is missing is an :class:`OutputError` naming the path.
    """
    path = check_writable(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if callable(data):
            data(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path
