"""The published checkpoint file: the log's latest checkpoint kept outside its database.

A tlog-tiles log serves its latest signed checkpoint as a file named `checkpoint`; this is the
same idea for the embedded log: after every checkpoint the database has committed, the signed note
is also written to `<database>.checkpoint` (under a temporary name, fsynced, then renamed, so the
file is always one whole note). On open the log checks its database against it: a database that
is missing, empty, shorter than the published size, or whose tree at that size has another root
(a damaged `-wal` silently rolls SQLite back to an earlier commit) is refused, because signing on
from it would contradict a checkpoint the log has already handed out.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from fieldprint.atomic import replace_file
from fieldprint.errors import LogError, NoteError
from fieldprint.ledger.note import Checkpoint

_MAX_NOTE_BYTES = 64 * 1024  # a checkpoint note is a few hundred bytes; never read a huge file whole


def published_path(db_path: str | os.PathLike) -> str:
    """Where the log stored at `db_path` publishes its latest checkpoint."""
    return os.fspath(db_path) + ".checkpoint"


def read_checkpoint_file(path: str, verifier_key: str, origin: str) -> Checkpoint | None:
    """The checkpoint in `path`, verified against the key and origin; None if the file does not exist."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_NOTE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LogError(f"cannot read the checkpoint file {path}: {exc.strerror or exc}") from None
    if len(raw) > _MAX_NOTE_BYTES:
        raise LogError(f"{path} is over {_MAX_NOTE_BYTES} bytes: it is not a checkpoint note")
    try:
        return Checkpoint.open(raw, [verifier_key], origin=origin)
    except NoteError as exc:
        raise LogError(f"the checkpoint file {path} does not verify ({exc}); restore it from a copy "
                       f"the log published, or pass the right key") from None


def write_checkpoint_file(path: str, note: str) -> None:
    """Replace `path` with `note` atomically and durably (temporary file, fsync, rename, fsync folder)."""
    replace_file(path, note, mode=0o644)  # a checkpoint is public: anyone may verify against it


def check_against(db_path: str, size: int, root_at: Callable[[int], bytes], cp: Checkpoint, where: str) -> None:
    """Refuse a database of `size` entries that does not extend the checkpoint `cp` read from `where`."""
    if size < cp.size:
        raise LogError(
            f"the log database {db_path} holds {size} entries but the log already published a checkpoint "
            f"for {cp.size} ({where}): the database was truncated, replaced or rolled back (an empty or "
            f"missing file, a damaged -wal). Restore it from a backup; nothing was written"
        )
    if root_at(cp.size) != cp.root_hash:
        raise LogError(
            f"the log database {db_path} contradicts the checkpoint it published for size {cp.size} ({where}): "
            f"its tree at that size has another root. Restore it from a backup; nothing was written"
        )
