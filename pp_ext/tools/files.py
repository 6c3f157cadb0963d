"""Output files: checked before anything is written, then written whole (a temporary file
renamed into place), so a reader or an interrupted run never sees half a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def check_output_path(path: str | os.PathLike) -> Path:
    """The path to write, after checking its directory exists and is writable."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {target}: it is a directory, give a file name")
    if not directory.is_dir():
        raise FileNotFoundError(
            f"cannot write {target}: directory {directory} does not exist (create it first)"
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {target}: directory {directory} is not writable")
    return target


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file in the target's directory, then rename it
    into place: readers see the old file or the whole new one, never a part."""
    target = check_output_path(path)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if target.exists():
            mode = target.stat().st_mode & 0o777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(temp, mode)
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    return target
