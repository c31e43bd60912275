"""PostgreSQL storage: one transparency log shared by many processes (engines, hosts).

Every process that opens the log for writing may add entries, and each one sequences its own
entries, one process at a time, under the sequencer lease. The lease lives in the `head` row
(holder, lease_until) beside the tree head it guards (size, root). One integrating transaction:

    BEGIN
    SELECT size, root, holder, lease_until ... FROM head FOR UPDATE     -- the row lock serializes turns
      refuse the turn if another holder's lease is still running         -- wait (bounded) and retry
      the log adopts the head if another process grew the tree meanwhile
    INSERT leaves; INSERT nodes                                          -- the batch and its complete nodes
    UPDATE head SET size, root, holder, lease_until                      -- compare-and-swap: WHERE size AND root
    COMMIT                                                               -- durable: synchronous_commit = on

so two sequencers can never fork the log: a batch is numbered from the head it committed against,
and the head only moves by a committed batch. A process killed mid-batch loses its connection, and
PostgreSQL rolls its transaction back: nothing of the batch remains. The lease it held stays
recorded until `lease_until`, so another process takes over at the latest one lease time later. A
sequencer that hangs inside a transaction (stopped, partitioned) is cut off by the server after one
lease time (idle_in_transaction_session_timeout), which releases the row lock, wherever it stopped:
every statement that runs while it holds the head row goes out as one simple-protocol message
(`fieldprint.postgres.execute_simple`).

A holder keeps the lease while it has work (no hand-over per batch) and releases it when its queue
runs empty, or in its next commit once another process has asked for it (`wanted_at`), so busy
processes take turns batch by batch.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from itertools import accumulate, count

from fieldprint.errors import LogError
from fieldprint.ledger.merkle import EMPTY_ROOT
from fieldprint.ledger.storage.base import LogStorage, NodeRow, TreeHead
from fieldprint.postgres import execute_simple, redact, require_psycopg

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg import sql
except ImportError:  # the optional dependency group "postgres"
    psycopg = None

__all__ = ["DEFAULT_LEASE_S", "DEFAULT_LEASE_WAIT_S", "DEFAULT_SCHEMA", "SCHEMA_VERSION", "PostgresStorage", "open_log", "open_reader"]

SCHEMA_VERSION = 1
DEFAULT_SCHEMA = "fieldprint_ledger"
DEFAULT_LEASE_S = 5.0
DEFAULT_LEASE_WAIT_S = 60.0
DURABILITY = {"full": "on", "normal": "off"}
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,47}")
_LEAF_CHUNK = 65536
_QUIET_WAIT_S = 0.25  # a wait for the lease longer than this is logged (with its holder)
_logger = logging.getLogger("fieldprint.ledger.postgres")

# Migrations, applied in order under an advisory lock; schema_version in meta says how far a database got.
_MIGRATIONS = {
    1: """
CREATE TABLE {s}.leaves (idx bigint PRIMARY KEY, hash bytea NOT NULL, data bytea NOT NULL);
CREATE TABLE {s}.nodes (level smallint NOT NULL, idx bigint NOT NULL, hash bytea NOT NULL, PRIMARY KEY (level, idx));
CREATE TABLE {s}.checkpoints (size bigint PRIMARY KEY, note text NOT NULL);
CREATE TABLE {s}.head (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    size bigint NOT NULL,
    root bytea,                 -- NULL only after a bare storage append (no log computed the root)
    holder text,                -- the sequencer lease: who may integrate ...
    lease_until timestamptz,    -- ... until when (the server's clock)
    wanted_at timestamptz       -- another process asked for the lease
);
INSERT INTO {s}.head (size, root) VALUES (0, {empty_root});
""",
}


def _hex(data: bytes | None) -> str:
    return "NULL" if data is None else f"'\\x{bytes(data).hex()}'::bytea"


def _ints(values) -> str:
    return "'{" + ",".join(str(int(v)) for v in values) + "}'"


class PostgresStorage(LogStorage):
    """A transparency log in one PostgreSQL schema, shared by every process that opens it."""

    shared = True

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        lease_s: float = DEFAULT_LEASE_S,
        lease_wait_s: float = DEFAULT_LEASE_WAIT_S,
        durability: str = "full",
        readonly: bool = False,
    ) -> None:
        require_psycopg(LogError)
        if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
            raise LogError(f"schema must be a lower-case SQL name ([a-z_][a-z0-9_]*, at most 48 characters), got {schema!r}")
        if not lease_s >= 0.1:
            raise LogError(f"lease_s must be at least 0.1 seconds, got {lease_s!r}")
        if not lease_wait_s >= 0:
            raise LogError(f"lease_wait_s must be >= 0 (0: refuse at once when another process holds the lease), got {lease_wait_s!r}")
        if durability not in DURABILITY:
            raise LogError(f"durability must be one of {sorted(DURABILITY)}, got {durability!r}")
        self._dsn, self.schema, self.readonly = dsn, schema, readonly
        self.path = f"{redact(dsn)} (schema {schema})"  # what messages call this log
        self.lease_s, self.lease_wait_s = float(lease_s), float(lease_wait_s)
        self._sync = DURABILITY[durability]
        # Who this process is in the lease row; the random part tells apart two logs opened by one process.
        self.holder = f"{socket.gethostname()} pid {os.getpid()} ({secrets.token_hex(3)})"
        self._t = {name: f"{schema}.{name}" for name in ("meta", "leaves", "nodes", "checkpoints", "head")}
        self._lock = threading.Lock()  # guards the writer connection
        self._local = threading.local()
        self._readers: dict[int, psycopg.Connection] = {}
        self._closed = False
        self._writer: psycopg.Connection | None = None
        self._turn: TreeHead | None = None  # set while this process's sequencer is inside a turn
        self._holding = False  # this process may hold the lease (released when idle)
        if readonly:
            self._check_schema(self._reader())
            return
        with self._lock:
            self._migrate(self._writer_conn())

    # --- connections -----------------------------------------------------------------------------

    def _connect(self, *, writer: bool) -> psycopg.Connection:
        try:
            conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise LogError(f"cannot connect to the log database {self.path}: {_reason(exc)}") from None
        try:
            # Every query here touches a few rows by primary key; a range join's row estimate can still
            # cross jit_above_cost, and compiling it (~7 ms) would cost 20x the proof itself.
            conn.execute("SET jit = off")
            if writer:
                # A session stuck inside a transaction for a whole lease is cut off, which frees the head row.
                conn.execute(f"SET idle_in_transaction_session_timeout = {int(self.lease_s * 1000)}")
                # For a runaway statement; a stopped client is the idle timeout's (see above).
                conn.execute(f"SET statement_timeout = {int(max(10 * self.lease_s, 30.0) * 1000)}")
                conn.execute(f"SET synchronous_commit = {self._sync}")
            else:
                conn.execute("SET default_transaction_read_only = on")
        except psycopg.Error as exc:
            conn.close()
            raise LogError(f"cannot set up a session on the log database {self.path}: {_reason(exc)}") from None
        return conn

    def _writer_conn(self) -> psycopg.Connection:
        if self._closed:
            raise LogError("the log storage is closed; open the log again")
        if self.readonly:
            raise LogError(f"the log {self.path} is open read-only; open it with its signing key to write")
        if self._writer is None or self._writer.closed or self._writer.broken:
            if self._writer is not None:
                self._writer.close()
            self._writer = None
            self._writer = self._connect(writer=True)
        return self._writer

    def _reader(self) -> psycopg.Connection:
        if self._closed:
            raise LogError("the log storage is closed; open the log again")
        holder = getattr(self._local, "holder", None)
        if holder is None or holder.conn.closed or holder.conn.broken:
            conn = self._connect(writer=False)
            holder = _ReaderHolder(conn)
            key = next(_reader_keys)
            self._readers[key] = conn
            weakref.finalize(holder, _close_reader, self._readers, key, conn)  # closed when its thread ends
            self._local.holder = holder
        return holder.conn

    def _migrate(self, conn: psycopg.Connection) -> None:
        """Create the schema or bring it up to SCHEMA_VERSION, once, whoever else is opening it."""
        s = self.schema
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"fieldprint.ledger.schema.{s}",))
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
                conn.execute(f"CREATE TABLE IF NOT EXISTS {s}.meta (key text PRIMARY KEY, value text NOT NULL)")
                row = conn.execute(f"SELECT value FROM {s}.meta WHERE key = 'schema_version'").fetchone()
                version = int(row[0]) if row else 0
                if version > SCHEMA_VERSION:
                    raise LogError(f"the log database {self.path} has schema version {version}, newer than this "
                                   f"Fieldprint knows ({SCHEMA_VERSION}); upgrade Fieldprint")
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    conn.execute(_MIGRATIONS[v].format(s=s, empty_root="'\\x" + EMPTY_ROOT.hex() + "'::bytea"))
                conn.execute(
                    f"INSERT INTO {s}.meta (key, value) VALUES ('schema_version', %s) "
                    f"ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", (str(SCHEMA_VERSION),))
        except psycopg.Error as exc:
            raise LogError(f"cannot create the log's tables in {self.path}: {_reason(exc)}") from None

    def _check_schema(self, conn: psycopg.Connection) -> None:
        """A read-only open fails at once, and clearly, on a database that holds no log."""
        with self._reading("the schema"):
            row = conn.execute("SELECT to_regclass(%s), to_regclass(%s)", (self._t["meta"], self._t["head"])).fetchone()
            version = None
            if row[0] is not None and row[1] is not None:
                found = conn.execute(f"SELECT value FROM {self._t['meta']} WHERE key = 'schema_version'").fetchone()
                version = int(found[0]) if found else None
        if version is None:
            self.close()
            raise LogError(f"{self.path} holds no Fieldprint log (no log tables in schema {self.schema})")
        if version > SCHEMA_VERSION:
            self.close()
            raise LogError(f"the log database {self.path} has schema version {version}, newer than this Fieldprint "
                           f"knows ({SCHEMA_VERSION}); upgrade Fieldprint")

    @contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Turn a PostgreSQL failure while reading into a LogError naming the database."""
        try:
            yield
        except psycopg.Error as exc:
            raise LogError(f"reading {what} from the log database {self.path} failed: {_reason(exc)}") from None

    def _query(self, what: str, query: str, params: Sequence = ()) -> list[tuple]:
        with self._reading(what):
            conn = self._reader()
            try:
                return conn.execute(query, params).fetchall()
            except psycopg.OperationalError:
                if not conn.broken or getattr(self._local, "snapshot", False):
                    raise
            # A connection lost while idle between reads (never inside a snapshot): reconnect once.
            return self._reader().execute(query, params).fetchall()

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads on this thread inside the block see one committed state (a REPEATABLE READ transaction)."""
        conn = self._reader()
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:  # already inside one
            yield
            return
        with self._reading("a snapshot"):
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        self._local.snapshot = True
        try:
            yield
        finally:
            self._local.snapshot = False
            if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                try:
                    conn.execute("ROLLBACK")  # a read-only transaction: ends the snapshot, writes nothing
                except psycopg.Error:
                    pass  # a broken connection is replaced on the next read

    # --- writing ---------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection]:
        """One write transaction on the writer connection; any failure rolls it back and says so."""
        with self._lock:
            conn = self._writer_conn()
            try:
                with conn.transaction():
                    yield conn
            except psycopg.Error as exc:
                raise LogError(f"writing to {self.path} failed, nothing was written: {_reason(exc)}") from None

    def get_meta(self, key: str) -> str | None:
        """A metadata value, or None."""
        rows = self._query("metadata", f"SELECT value FROM {self._t['meta']} WHERE key = %s", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        """Durably set a metadata value; a value already set stays (a shared log's identity never flips)."""
        with self._transaction() as conn:
            conn.execute(f"INSERT INTO {self._t['meta']} (key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING",
                         (key, value))
            stored = conn.execute(f"SELECT value FROM {self._t['meta']} WHERE key = %s", (key,)).fetchone()[0]
        if stored != value:
            raise LogError(f"the log {self.path} already has {key} = {stored!r} (another process created it "
                           f"meanwhile); open it with the matching key")

    def size(self) -> int:
        """Number of integrated leaves (the committed tree head's size)."""
        return self._query("the size", f"SELECT size FROM {self._t['head']}")[0][0]

    def append(self, start: int, entries: Sequence[bytes], leaf_hashes: Sequence[bytes], nodes: Sequence[NodeRow]) -> None:
        """Store entries, their leaf hashes and the nodes they complete in one durable transaction.

        Inside this thread's sequencer turn it joins the turn's transaction (the head moves when the
        turn commits); alone, it is its own transaction and moves the head's size (root unknown).
        """
        if len(entries) != len(leaf_hashes):
            raise LogError(f"append got {len(entries)} entries but {len(leaf_hashes)} leaf hashes; nothing was written")
        if any(len(h) != 32 for h in leaf_hashes) or any(len(n[2]) != 32 for n in nodes):
            # the rows are cut out of one literal at 32-byte steps (_copy_rows): one odd hash shifts the rest
            raise LogError("leaf and node hashes must be 32 bytes; nothing was written")
        if self._turn is not None and self._turn.thread == threading.get_ident():
            if start != self._turn.size:
                raise LogError(f"append at {start} but the tree head is at {self._turn.size}; nothing was written")
            self._copy_rows(self._writer, start, entries, leaf_hashes, nodes)
            return
        with self._transaction() as conn:
            moved = execute_simple(conn, f"UPDATE {self._t['head']} SET size = {int(start + len(entries))}, root = NULL "
                                  f"WHERE size = {int(start)}").rowcount
            if moved != 1:
                raise LogError(f"append at {start} but the log holds {self.size()} entries; nothing was written")
            self._copy_rows(conn, start, entries, leaf_hashes, nodes)

    def _copy_rows(self, conn, start: int, entries, leaf_hashes, nodes) -> None:
        # One statement per table, the batch as one hex literal that the server cuts into rows (see
        # execute_simple); a stopped COPY could not be cut off at all.
        lens = [len(e) for e in entries]
        starts = [0, *accumulate(lens)][:-1]
        execute_simple(conn, f"INSERT INTO {self._t['leaves']} (idx, hash, data) "
                      f"SELECT {int(start)} + i - 1, substring(b.h FROM i::int4 * 32 - 31 FOR 32), substring(b.d FROM o + 1 FOR n) "
                      f"FROM (SELECT {_hex(b''.join(leaf_hashes))} AS h, {_hex(b''.join(entries))} AS d) AS b, "
                      f"unnest({_ints(starts)}::int4[], {_ints(lens)}::int4[]) WITH ORDINALITY AS t(o, n, i)")
        if nodes:
            levels, idxs, hashes = zip(*nodes)
            execute_simple(conn, f"INSERT INTO {self._t['nodes']} (level, idx, hash) "
                          f"SELECT l, x, substring(b.h FROM i::int4 * 32 - 31 FOR 32) FROM (SELECT {_hex(b''.join(hashes))} AS h) AS b, "
                          f"unnest({_ints(levels)}::int2[], {_ints(idxs)}::int8[]) WITH ORDINALITY AS t(l, x, i)")

    def add_checkpoint(self, size: int, note: str) -> None:
        """Durably store a checkpoint note (one per size: Ed25519 makes re-signing identical)."""
        with self._transaction() as conn:
            conn.execute(f"INSERT INTO {self._t['checkpoints']} (size, note) VALUES (%s, %s) "
                         f"ON CONFLICT (size) DO UPDATE SET note = EXCLUDED.note", (size, note))

    # --- the sequencer lease ---------------------------------------------------------------------

    @contextmanager
    def sequencer_turn(self, size: int, root: bytes) -> Iterator[TreeHead]:
        """Take the lease, yield the committed tree head, commit the turn's appends with the new head.

        Waits up to lease_wait_s for a lease another process holds, then refuses the batch with a
        LogError naming the holder. The commit is a compare-and-swap: the head must still be the one
        yielded (the row lock makes that so; the WHERE clause makes it checked).
        """
        with self._lock:
            for attempt in range(2):
                conn = self._writer_conn()
                try:
                    head, release = self._take_lease(conn)
                    break
                except psycopg.Error as exc:
                    if attempt == 0 and conn.broken:  # lost while idle (server restart, timeout): reconnect once
                        continue
                    self._rollback(conn)
                    raise LogError(f"cannot take the sequencer lease of {self.path}, nothing was written: "
                                   f"{_reason(exc)}") from None
            began = (head.size, head.root)
            self._turn = head
            try:
                yield head
                t = self._t["head"]
                holder = "NULL" if release else sql.Literal(self.holder).as_string(conn)
                swapped = execute_simple(
                    conn,
                    f"UPDATE {t} SET size = {int(head.size)}, root = {_hex(head.root)}, holder = {holder}, "
                    f"wanted_at = NULL, lease_until = clock_timestamp() + make_interval(secs => {float(self.lease_s)!r}) "
                    f"WHERE size = {int(began[0])} AND root IS NOT DISTINCT FROM {_hex(began[1])}",
                ).rowcount
                if swapped != 1:
                    raise LogError(f"the tree head of {self.path} moved during this turn (another sequencer?); "
                                   f"nothing was written")
                try:
                    conn.execute("COMMIT")
                except psycopg.OperationalError as exc:  # the connection went away during COMMIT
                    raise LogError(f"the commit of this batch to {self.path} was interrupted ({_reason(exc)}): it may or "
                                   f"may not be in the log; its entries were not acknowledged. The next turn continues "
                                   f"from whatever head was committed") from None
                self._holding = not release
            except BaseException as exc:
                self._rollback(conn)
                if isinstance(exc, psycopg.Error):
                    raise LogError(f"writing to {self.path} failed, nothing was written: {_reason(exc)}") from None
                raise
            finally:
                self._turn = None

    def _take_lease(self, conn) -> tuple[TreeHead, bool]:
        """BEGIN and lock the head row once no other live lease holds it; (head, release at commit)."""
        began = time.monotonic()
        deadline, delay, told = began + self.lease_wait_s, 0.001, False
        head_table = self._t["head"]
        while True:
            # A turn holds the row for milliseconds; wait for it at most as long as we may still wait.
            wait_ms = int(min(max(deadline - time.monotonic(), 0.05), 2 * self.lease_s) * 1000)
            conn.execute(f"BEGIN; SET LOCAL lock_timeout = {wait_ms}")
            try:
                size, root, holder, until, live, wanted = conn.execute(
                    f"SELECT size, root, holder, lease_until, lease_until > clock_timestamp(), wanted_at IS NOT NULL "
                    f"FROM {head_table} FOR UPDATE").fetchone()
            except pg_errors.LockNotAvailable:  # someone is inside a turn: name the last committed holder
                self._rollback(conn)
                holder, until = conn.execute(f"SELECT holder, lease_until FROM {head_table}").fetchone()
                holder, live = f"{holder or 'another process'} (inside a transaction)", True
            if holder is None or holder == self.holder or not live:
                if holder not in (None, self.holder):
                    _logger.warning("%s: took over the sequencer lease from %s (it expired at %s)", self.path, holder, until)
                return _Turn(size, None if root is None else bytes(root)), bool(wanted) and holder == self.holder
            self._rollback(conn)
            when = f" until {_clock(until)}" if until is not None else ""
            if time.monotonic() >= deadline:
                action = "refuses to sequence" if self.lease_wait_s == 0 else f"waited {self.lease_wait_s:g} s and refused"
                raise LogError(f"another sequencer holds the lease of {self.path}: {holder}{when}; this process "
                               f"({self.holder}) {action} this batch, nothing was written. The lease passes on "
                               f"when its holder goes idle or closes, or at the latest {self.lease_s:g} s after it stops")
            if not told and time.monotonic() - began > _QUIET_WAIT_S:  # turns taken batch by batch are not news
                _logger.warning("%s: waiting for the sequencer lease held by %s%s", self.path, holder, when)
                told = True
            self._ask_for_lease(conn)
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.02)

    def _ask_for_lease(self, conn) -> None:
        """Tell the holder another process waits (a hint: not durable, skipped while a turn runs)."""
        t = self._t["head"]
        conn.execute(sql.SQL(
            "BEGIN; SET LOCAL synchronous_commit = off; "
            "UPDATE {t} SET wanted_at = clock_timestamp() WHERE one IN (SELECT one FROM {t} FOR UPDATE SKIP LOCKED); COMMIT"
        ).format(t=sql.SQL(t)))

    def release_lease(self) -> None:
        """Hand the lease back now (this process has nothing queued); the next turn takes it again."""
        if not self._holding or self._closed:
            return
        with self._lock:
            self._holding = False
            try:
                conn = self._writer_conn()
                conn.execute(sql.SQL(
                    "BEGIN; SET LOCAL synchronous_commit = off; "
                    "UPDATE {t} SET holder = NULL, lease_until = NULL WHERE holder = {me}; COMMIT"
                ).format(t=sql.SQL(self._t["head"]), me=sql.Literal(self.holder)))
            except (psycopg.Error, LogError) as exc:  # the lease then simply runs out
                self._rollback(self._writer)
                _logger.warning("%s: could not release the sequencer lease (it expires by itself): %s", self.path, exc)

    def lease(self) -> tuple[str | None, float]:
        """(holder, seconds the lease still runs) as the database sees it now; (None, 0.0) when free."""
        rows = self._query("the sequencer lease", f"SELECT holder, GREATEST(EXTRACT(EPOCH FROM lease_until - "
                                                  f"clock_timestamp()), 0) FROM {self._t['head']}")
        holder, left = rows[0]
        return (holder, float(left)) if holder is not None and left else (None, 0.0)

    @staticmethod
    def _rollback(conn) -> None:
        if conn is None or conn.closed or conn.broken:
            return
        try:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.execute("ROLLBACK")
        except psycopg.Error:
            pass  # a dead connection is replaced by the next write

    # --- reading ---------------------------------------------------------------------------------

    def entry(self, index: int) -> bytes | None:
        """The entry at `index`, or None."""
        rows = self._query(f"entry {index}", f"SELECT data FROM {self._t['leaves']} WHERE idx = %s", (index,))
        return rows[0][0] if rows else None

    def leaves(self, start: int, end: int) -> Iterator[tuple[int, bytes, bytes]]:
        """(index, entry, leaf hash) for start <= index < end, fetched in chunks."""
        for lo in range(start, end, _LEAF_CHUNK):
            hi = min(lo + _LEAF_CHUNK, end)
            yield from self._query(f"leaves {lo}..{hi - 1}", f"SELECT idx, data, hash FROM {self._t['leaves']} "
                                   f"WHERE idx >= %s AND idx < %s ORDER BY idx", (lo, hi))

    def leaf_hashes(self, ranges: Sequence[tuple[int, int]]) -> dict[int, bytes]:
        """{index: leaf hash} for the half-open index ranges given, in one query."""
        if not ranges:
            return {}
        los, his = zip(*ranges)
        return dict(self._query("leaf hashes", f"SELECT l.idx, l.hash FROM unnest(%s::int8[], %s::int8[]) AS r(lo, hi) "
                                f"JOIN {self._t['leaves']} l ON l.idx >= r.lo AND l.idx < r.hi", (list(los), list(his))))

    def nodes(self, ids: Sequence[tuple[int, int]]) -> list[bytes]:
        """Hashes of the stored nodes asked for, in order, with one query."""
        if not ids:
            return []
        levels, idxs = zip(*ids)
        found = {(lvl, i): h for lvl, i, h in self._query(
            "tree nodes", f"SELECT n.level, n.idx, n.hash FROM unnest(%s::int2[], %s::int8[]) AS q(level, idx) "
            f"JOIN {self._t['nodes']} n USING (level, idx)", (list(levels), list(idxs)))}
        try:
            return [found[tuple(nid)] for nid in ids]
        except KeyError as exc:
            raise LogError(f"stored tree node (level, index) {exc.args[0]} is missing; run audit()") from None

    def node_range(self, level: int, start: int, end: int) -> dict[int, bytes]:
        """{index: hash} of stored nodes at `level` with start <= index < end."""
        return dict(self._query(f"tree nodes at level {level}", f"SELECT idx, hash FROM {self._t['nodes']} "
                                f"WHERE level = %s AND idx >= %s AND idx < %s", (level, start, end)))

    def node_count(self) -> dict[int, int]:
        """{level: number of stored nodes}."""
        return dict(self._query("node counts", f"SELECT level, COUNT(*) FROM {self._t['nodes']} GROUP BY level"))

    def checkpoints(self) -> list[tuple[int, str]]:
        """Every stored (size, note), by increasing size."""
        return self._query("checkpoints", f"SELECT size, note FROM {self._t['checkpoints']} ORDER BY size")

    def latest_checkpoint(self) -> tuple[int, str] | None:
        """The (size, note) of largest size, or None."""
        rows = self._query("the latest checkpoint", f"SELECT size, note FROM {self._t['checkpoints']} ORDER BY size DESC LIMIT 1")
        return rows[0] if rows else None

    def close(self) -> None:
        """Hand back the lease and close every connection."""
        if self._closed:
            return
        self.release_lease()
        with self._lock:
            self._closed = True
            for key in list(self._readers):
                conn = self._readers.pop(key, None)
                if conn is not None:
                    conn.close()
            if self._writer is not None:
                self._writer.close()


def open_log(dsn: str, signer_key: str, *, schema: str = DEFAULT_SCHEMA, lease_s: float = DEFAULT_LEASE_S,
             lease_wait_s: float = DEFAULT_LEASE_WAIT_S, durability: str = "full", **log_options):
    """Open (or create) the shared log in `schema` of the PostgreSQL database at `dsn` for writing."""
    from fieldprint.ledger.log import TransparencyLog
    from fieldprint.ledger.note import Signer

    Signer.parse(signer_key)  # NoteError on a malformed key, before touching the database
    storage = PostgresStorage(dsn, schema=schema, lease_s=lease_s, lease_wait_s=lease_wait_s, durability=durability)
    try:
        return TransparencyLog(storage, signer_key, **log_options)
    except BaseException:
        storage.close()
        raise


def open_reader(dsn: str, verifier_key: str, *, schema: str = DEFAULT_SCHEMA):
    """Open the shared log in `schema` at `dsn` read-only, checking it with its verifier key."""
    from fieldprint.ledger.note import Verifier
    from fieldprint.ledger.reader import LogReader

    Verifier.parse(verifier_key)
    storage = PostgresStorage(dsn, schema=schema, readonly=True)
    try:
        return LogReader(storage, verifier_key)
    except BaseException:
        storage.close()
        raise


def _reason(exc: BaseException) -> str:
    """The first line of a driver error (the rest repeats the query)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _clock(when: datetime) -> str:
    return when.strftime("%H:%M:%S.%f")[:-3] + " " + (when.tzname() or "")


_reader_keys = count()


class _Turn(TreeHead):
    """A tree head being advanced inside one thread's sequencer turn."""

    def __init__(self, size: int, root: bytes | None) -> None:
        super().__init__(size, root)
        self.thread = threading.get_ident()


class _ReaderHolder:
    """Owns one thread's reader connection; lives in the storage's thread-local until the thread ends."""

    __slots__ = ("__weakref__", "conn")

    def __init__(self, conn) -> None:
        self.conn = conn


def _close_reader(readers: dict, key: int, conn) -> None:
    readers.pop(key, None)
    conn.close()
