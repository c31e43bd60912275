"""SQLite storage (the embedded default): one file, WAL journal, one writer, many readers.

Durability: the log promises that a resolved add() survives a crash, and a promise that held only
against process crashes would be half a promise. So the default is `synchronous=FULL`: in WAL mode
every COMMIT fsyncs the write-ahead log before it returns, which makes a committed batch durable
against power loss and OS crashes too. `synchronous=NORMAL` fsyncs only at checkpoints of the WAL:
it survives a killed process (the WAL is in the OS page cache) but may lose the last commits on
power loss, so it is offered only as an explicit opt-in (`durability="normal"`). The fsync cost is
paid once per batch, not once per entry, which is what batching is for.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import urllib.parse
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import count

from fieldprint.errors import LogError
from fieldprint.ledger.storage.base import LogStorage, NodeRow

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leaves (idx INTEGER PRIMARY KEY, hash BLOB NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    level INTEGER NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL, PRIMARY KEY (level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (size INTEGER PRIMARY KEY, note TEXT NOT NULL);
"""
DURABILITY = {"full": "FULL", "normal": "NORMAL"}
_NODE_SQL = "SELECT level, idx, hash FROM nodes WHERE level = ? AND idx = ?"
_LEAF_HASH_SQL = "SELECT idx, hash FROM leaves WHERE idx >= ? AND idx < ?"
_MAX_COMPOUND = 400  # SQLite allows at most 500 terms in a compound SELECT


class SQLiteStorage(LogStorage):
    """A transparency log in one SQLite file."""

    def __init__(self, path: str | os.PathLike, *, durability: str = "full", readonly: bool = False) -> None:
        if durability not in DURABILITY:
            raise LogError(f"durability must be one of {sorted(DURABILITY)}, got {durability!r}")
        self.path = os.fspath(path)
        self.readonly = readonly
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise LogError(f"cannot open the log at {self.path}: directory {parent} does not exist")
        if readonly and not os.path.isfile(self.path):
            raise LogError(f"no log database at {self.path}")
        self._sync = DURABILITY[durability]
        self._immutable = False  # set when a read-only folder leaves SQLite no -shm to share (see _connect)
        self._lock = threading.Lock()  # guards the writer connection
        self._local = threading.local()
        # Open reader connections, one per live reading thread: each is closed when its thread ends
        # (see _reader), so a thread pool that comes and goes does not accumulate connections.
        self._readers: dict[int, sqlite3.Connection] = {}
        self._closed = False
        self._writer: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        if readonly:
            self._probe_readonly()
            return
        self._lock_fd = take_writer_lock(self.path)
        try:
            self._writer = self._connect()
            self._writer.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            if self._writer is not None:
                self._writer.close()
            os.close(self._lock_fd)
            raise LogError(f"cannot open the log database {self.path}: {exc}; is it a Fieldprint log?") from None

    def _probe_readonly(self) -> None:
        """Read the schema now, so a file that is not a log fails at open with a clear error."""
        try:
            with self._reading("the schema"):
                tables = {row[0] for row in self._reader().execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except LogError:
            self.close()
            raise
        if not {"meta", "leaves", "nodes", "checkpoints"} <= tables:
            self.close()
            raise LogError(f"{self.path} is not a Fieldprint log database (it is empty or lacks the log's tables)")

    def _connect(self) -> sqlite3.Connection:
        if not self.readonly:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA synchronous={self._sync}")
            except BaseException:
                conn.close()
                raise
            return conn
        # Read-only: SQLite never writes the database; WAL readers still need the -shm index, which
        # a read-only folder cannot hold. With no -wal content to read, the file alone is the whole
        # log, and `immutable` reads it without the -shm (no writer can add to a folder nobody can write).
        if not self._immutable:
            conn = self._connect_uri("mode=ro")
            try:
                conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
                return conn
            except sqlite3.OperationalError:
                conn.close()
                wal = self.path + "-wal"
                if os.path.exists(wal) and os.path.getsize(wal) > 0:
                    raise LogError(f"{wal} holds commits that SQLite cannot read from this read-only folder; open "
                                   f"the log once for writing where it is writable (that folds them into the database)") from None
                self._immutable = True
        conn = self._connect_uri("immutable=1")
        try:
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect_uri(self, options: str) -> sqlite3.Connection:
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?" + options
        return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30.0)

    def _reader(self) -> sqlite3.Connection:
        if self._closed:
            raise LogError("the log storage is closed; open the log again")
        holder = getattr(self._local, "holder", None)
        if holder is None:
            try:
                conn = self._connect()
            except sqlite3.Error as exc:
                raise LogError(f"cannot open a reader on the log database {self.path}: {exc}") from None
            holder = _ReaderHolder(conn)
            key = next(_reader_keys)
            self._readers[key] = conn
            # The thread-local drops the holder when its thread ends: close the connection then.
            weakref.finalize(holder, _close_reader, self._readers, key, conn)
            self._local.holder = holder
        return holder.conn

    @contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Turn an SQLite failure while reading into a LogError naming the file."""
        try:
            yield
        except sqlite3.Error as exc:
            raise LogError(f"reading {what} from the log database {self.path} failed: {exc}; run audit() or restore the file") from None

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads on this thread inside the block see one committed state (one SQLite read transaction)."""
        conn = self._reader()
        if conn.in_transaction:  # already inside a snapshot on this thread
            yield
            return
        with self._reading("a snapshot"):
            conn.execute("BEGIN")
        try:
            yield
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")  # a read transaction: ends the snapshot, writes nothing

    def _write(self, statements: list[tuple[str, Sequence]], many: set[int] = frozenset()) -> None:
        if self._closed:
            raise LogError("the log storage is closed; open the log again")
        if self._writer is None:
            raise LogError(f"the log {self.path} is open read-only; open it with its signing key to write")
        with self._lock:
            cur = self._writer.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")
                for i, (sql, params) in enumerate(statements):
                    (cur.executemany if i in many else cur.execute)(sql, params)
                cur.execute("COMMIT")
            except BaseException as exc:
                if self._writer.in_transaction:
                    self._writer.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise LogError(f"writing to {self.path} failed, nothing was written: {exc}") from None
                raise

    def get_meta(self, key: str) -> str | None:
        """A metadata value, or None."""
        with self._reading("metadata"):
            row = self._reader().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        """Durably set a metadata value."""
        self._write([("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))])

    def size(self) -> int:
        """Number of stored leaves."""
        with self._reading("the size"):
            row = self._reader().execute("SELECT MAX(idx) FROM leaves").fetchone()
        return 0 if row[0] is None else row[0] + 1

    def append(self, start: int, entries: Sequence[bytes], leaf_hashes: Sequence[bytes], nodes: Sequence[NodeRow]) -> None:
        """Store entries, their leaf hashes and the nodes they complete in one durable transaction."""
        if len(entries) != len(leaf_hashes):
            raise LogError(f"append got {len(entries)} entries but {len(leaf_hashes)} leaf hashes; nothing was written")
        self._write(
            [
                ("INSERT INTO leaves (idx, hash, data) VALUES (?, ?, ?)", zip(range(start, start + len(entries)), leaf_hashes, entries)),
                ("INSERT INTO nodes (level, idx, hash) VALUES (?, ?, ?)", nodes),
            ],
            many={0, 1},
        )

    def add_checkpoint(self, size: int, note: str) -> None:
        """Durably store a checkpoint note (one per size: Ed25519 makes re-signing identical)."""
        self._write([("INSERT OR REPLACE INTO checkpoints (size, note) VALUES (?, ?)", (size, note))])

    def entry(self, index: int) -> bytes | None:
        """The entry at `index`, or None."""
        with self._reading(f"entry {index}"):
            row = self._reader().execute("SELECT data FROM leaves WHERE idx = ?", (index,)).fetchone()
        return row[0] if row else None

    def leaves(self, start: int, end: int) -> Iterator[tuple[int, bytes, bytes]]:
        """(index, entry, leaf hash) for start <= index < end, fetched in chunks."""
        conn, chunk = self._reader(), 65536
        for lo in range(start, end, chunk):
            with self._reading(f"leaves {lo}..{min(lo + chunk, end) - 1}"):
                yield from conn.execute(
                    "SELECT idx, data, hash FROM leaves WHERE idx >= ? AND idx < ? ORDER BY idx", (lo, min(lo + chunk, end))
                )

    def leaf_hashes(self, ranges: Sequence[tuple[int, int]]) -> dict[int, bytes]:
        """{index: leaf hash} for the half-open index ranges given, one query per 400 ranges."""
        conn, found = self._reader(), {}
        for lo in range(0, len(ranges), _MAX_COMPOUND):
            part = ranges[lo : lo + _MAX_COMPOUND]
            sql = " UNION ALL ".join([_LEAF_HASH_SQL] * len(part))
            with self._reading("leaf hashes"):
                found.update(conn.execute(sql, [x for r in part for x in r]))
        return found

    def nodes(self, ids: Sequence[tuple[int, int]]) -> list[bytes]:
        """Hashes of the stored nodes asked for, in order, with one query per 400 nodes."""
        conn, found = self._reader(), {}
        # UNION ALL of primary-key point lookups: SQLite plans `(level, idx) IN (VALUES ...)` as a
        # full scan, while each arm here is one B-tree search (~40 us for a 25-node proof).
        for lo in range(0, len(ids), _MAX_COMPOUND):
            part = ids[lo : lo + _MAX_COMPOUND]
            sql = " UNION ALL ".join([_NODE_SQL] * len(part))
            with self._reading("tree nodes"):
                found.update(((lvl, idx), h) for lvl, idx, h in conn.execute(sql, [x for nid in part for x in nid]))
        try:
            return [found[tuple(nid)] for nid in ids]
        except KeyError as exc:
            raise LogError(f"stored tree node (level, index) {exc.args[0]} is missing; run audit()") from None

    def node_range(self, level: int, start: int, end: int) -> dict[int, bytes]:
        """{index: hash} of stored nodes at `level` with start <= index < end."""
        with self._reading(f"tree nodes at level {level}"):
            return dict(self._reader().execute(
                "SELECT idx, hash FROM nodes WHERE level = ? AND idx >= ? AND idx < ?", (level, start, end)
            ))

    def node_count(self) -> dict[int, int]:
        """{level: number of stored nodes}."""
        with self._reading("node counts"):
            return dict(self._reader().execute("SELECT level, COUNT(*) FROM nodes GROUP BY level"))

    def checkpoints(self) -> list[tuple[int, str]]:
        """Every stored (size, note), by increasing size."""
        with self._reading("checkpoints"):
            return list(self._reader().execute("SELECT size, note FROM checkpoints ORDER BY size"))

    def latest_checkpoint(self) -> tuple[int, str] | None:
        """The (size, note) of largest size, or None."""
        with self._reading("the latest checkpoint"):
            return self._reader().execute("SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT 1").fetchone()

    def close(self) -> None:
        """Close every connection."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for key in list(self._readers):
                conn = self._readers.pop(key, None)
                if conn is not None:
                    conn.close()
            if self._writer is not None:
                self._writer.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the writer lock


_reader_keys = count()


def take_writer_lock(db_path: str) -> int:
    """Lock `<db_path>.lock` for writing (flock, held until the returned fd is closed); LogError if taken.

    SQLite serializes transactions but not sequencers: two processes appending to one log would each
    number entries from their own view of the tree. One writer per log, enforced by the OS: the lock
    goes away with its process, however that process ends, so a crash never leaves a stale lock.
    """
    lock_path = db_path + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise LogError(f"cannot open the log {db_path} for writing: cannot create {lock_path} ({exc.strerror or exc}); "
                       f"a read-only log can still be read with its public key") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        mine = " (this process)" if holder == str(os.getpid()) else ""
        raise LogError(f"another process is writing this log (pid {holder}{mine}): {db_path}; close it first, "
                       f"or open the log read-only to read, prove and audit beside it") from None
    except OSError as exc:
        os.close(fd)
        raise LogError(f"cannot lock {lock_path}: {exc.strerror or exc}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


class _ReaderHolder:
    """Owns one thread's reader connection; lives in the storage's thread-local until the thread ends."""

    __slots__ = ("__weakref__", "conn")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn


def _close_reader(readers: dict[int, sqlite3.Connection], key: int, conn: sqlite3.Connection) -> None:
    readers.pop(key, None)
    conn.close()
