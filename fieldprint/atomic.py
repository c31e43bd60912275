"""Files replaced whole: written under a temporary name beside the target, synced, renamed into place.

A crash leaves the old file or the new one, never a mix. A process killed while writing leaves its
temporary behind, so temporaries are named `.<final name>.<writer's pid>.<random>.tmp` and
`sweep_temporaries(folder)`, called when a folder's owner opens it, removes those whose writer no
longer runs (and never one that a live process may still be writing: its own, or another's).
Pids are this host's: where one folder is shared across hosts or containers with their own pid
namespaces, a sweep may remove another's temporary mid-write, whose rename then fails with an
error (nothing half-written is ever renamed into place).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import BinaryIO


def temporary(folder: str | os.PathLike, final_name: str) -> tuple[int, str]:
    """(fd, path) of a new temporary file in `folder` for `final_name`, mode 0600, named for the sweep."""
    return tempfile.mkstemp(prefix=f".{final_name}.{os.getpid()}.", suffix=".tmp", dir=folder)


def temporary_dir(folder: str | os.PathLike, final_name: str) -> str:
    """A new temporary folder in `folder` for `final_name`, named for the sweep."""
    return tempfile.mkdtemp(prefix=f".{final_name}.{os.getpid()}.", suffix=".tmp", dir=folder)


def replace_file(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], None], *,
                 mode: int | None = None, durable: bool = True) -> None:
    """Replace `path` with `data` (bytes, text as UTF-8, or a function writing to a binary file).

    mode: the file's permissions (default 0600); durable: fsync the file and its folder, so the new
    content survives a power loss once this returns. On any error the temporary is removed and the
    old file, if any, is left as it was.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = temporary(folder, os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    if durable:
        sync_dir(folder)


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def sync_dir(folder: str | os.PathLike) -> None:
    """Make renames in `folder` durable (best effort: not every platform can fsync a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _writer_pid(name: str) -> int | None:
    """The writer's pid in a temporary's name, `.<final>.<pid>.<8 random characters>.tmp`, else None."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    parts = name[1:-4].split(".")
    if len(parts) < 3 or not parts[-2].isdigit() or len(parts[-1]) != 8:
        return None
    return int(parts[-2])


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_temporaries(folder: str | os.PathLike) -> list[str]:
    """Remove the temporaries in `folder` left by writers that no longer run; returns their paths."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    removed = []
    for name in names:
        pid = _writer_pid(name)
        if pid is None or pid == os.getpid() or _running(pid):
            continue
        path = os.path.join(os.fspath(folder), name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except FileNotFoundError:  # another process swept it first
            continue
        removed.append(path)
    return removed
