"""The state store on PostgreSQL: the `StateStore` interface for many engines sharing one database.

Same tables and semantics as `SQLiteStateStore` (states, override/revocation records), kept in a
schema of their own (`memory` by default) so the log's tables and several memories can share one
database. What PostgreSQL adds for many writers:

- a state id can be stored once, whoever races for it (the primary key decides; the loser is told);
- states with the same content are written one writer at a time (an advisory lock per content
  digest), and a state whose label misses taint that another writer attached to the same content
  meanwhile is refused, so two engines cannot launder a copy between them;
- the schema is created and migrated under an advisory lock, so many engines may start at once;
  a store whose schema is newer than this code is refused rather than misread.

Every failure is a StateError naming the store (its URL without the password) and what was being
done; a dropped connection is re-opened on the next call, never retried silently inside a write.
Needs psycopg 3 (`pip install 'fieldprint[postgres]'`).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from fieldprint.errors import StateError
from fieldprint.memory.state import State
from fieldprint.memory.store import PolicyRecord, StateStore, _json_strings, row_to_state
from fieldprint.postgres import execute_simple, redact, require_psycopg

try:
    import psycopg
    from psycopg import sql
except ImportError:  # the "postgres" extra is optional
    psycopg = sql = None

DEFAULT_SCHEMA = "memory"
_SCHEMA_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z")

# Migrations of the state store, applied in order; the schema's `schema_versions` row says how many ran.
# Columns mirror the SQLite store (labels as JSON text), so row_to_state reads rows of both alike.
_STATE_MIGRATIONS = ("""
CREATE TABLE states (
    seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    state_id TEXT PRIMARY KEY, type TEXT NOT NULL, text TEXT, tensor_digest TEXT, tensor_profile TEXT,
    parents TEXT NOT NULL, session TEXT NOT NULL, creator TEXT NOT NULL, time_ns BIGINT NOT NULL,
    sources TEXT NOT NULL, taint TEXT NOT NULL, digest TEXT NOT NULL, leaf_index BIGINT
);
CREATE INDEX states_digest ON states (digest);
CREATE TABLE records (
    leaf_index BIGINT PRIMARY KEY, kind TEXT NOT NULL, state_id TEXT NOT NULL,
    target_index BIGINT, note TEXT NOT NULL
);
CREATE INDEX records_state ON records (state_id);
""",)
_STATE_COLUMNS = ("state_id, type, text, tensor_digest, tensor_profile, parents, session, creator, time_ns, sources, "
                  "taint, leaf_index")
_RECORD_COLUMNS = "leaf_index, kind, state_id, target_index, note"
_READ_ONLY = ("InsufficientPrivilege", "ReadOnlySqlTransaction")


def _cause(e: BaseException) -> str:
    # The server's one-line message, without psycopg's CONTEXT/HINT lines (they break one-line errors).
    diag = getattr(e, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    return primary or (str(e).strip().splitlines() or [type(e).__name__])[0]


def qmark_to_pyformat(query: str) -> str:
    """SQLite-style `?` placeholders as psycopg's `%s` (outside quoted strings), `%` escaped."""
    out, quote = [], None
    for ch in query:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "?":
            out.append("%s")
            continue
        out.append("%%" if ch == "%" else ch)
    return "".join(out)


class PgConnection:
    """One connection for a memory backend: schema on the search path, re-opened after a drop, errors as StateErrors."""

    # How long a transaction that waits on the log inside it (a state's leaf index, a rollback's entry)
    # may sit between statements, holding locks other writers wait for, before the server ends it
    # (idle_bound): longer than a log append's longest wait for the log's lease (60 s by default).
    log_wait_idle_s = 300.0

    def __init__(self, url: str, schema: str, what: str, on_connect: Callable | None = None) -> None:
        require_psycopg(StateError)
        if not isinstance(schema, str) or not _SCHEMA_RE.match(schema):
            raise StateError(f"schema {schema!r} must be 1-63 letters, digits and _, starting with a letter or _")
        self.schema = schema
        self.url, self.what, self.name = url, what, redact(url)
        self.on_connect = on_connect
        self.lock = threading.RLock()
        self._db = None
        self._closed = False
        with self.lock:
            self._connect()

    def _connect(self) -> psycopg.Connection:
        try:
            db = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        except psycopg.Error as e:
            raise StateError(f"cannot connect to the {self.what} at {self.name}: {_cause(e)}; check that PostgreSQL "
                             f"runs there and that the URL's user, password and database are right") from None
        try:
            db.execute(sql.SQL("SET search_path TO {}, public").format(sql.Identifier(self.schema)))
            if self.on_connect is not None:
                self.on_connect(db)
        except psycopg.Error as e:
            db.close()
            raise StateError(self.failure("set up its connection", e)) from e
        except BaseException:
            db.close()
            raise
        self._db = db
        return db

    @contextmanager
    def sql(self, what: str) -> Iterator[psycopg.Connection]:
        """The live connection (re-opened if it dropped); a psycopg failure leaves as a StateError."""
        with self.lock:
            if self._closed:
                raise StateError(f"the {self.what} at {self.name} is closed; open a new one")
            db = self._db if self._db is not None and not self._db.closed and not self._db.broken else self._connect()
            try:
                yield db
            except psycopg.Error as e:
                raise StateError(self.failure(what, e)) from e

    @staticmethod
    def idle_bound(seconds: float) -> str:
        """An SQL expression to put in the statement that takes a lock other writers wait for: it sets
        the transaction's idle_in_transaction_session_timeout, so that should this client stop for
        `seconds` between two statements (a stopped or hung process), the server ends the transaction,
        rolling it back and releasing the lock, and the others go on. Without it they would wait for as
        long as the stopped process lives. (The server arms this timeout only between statements; for a
        client stopped in the middle of sending one, see fieldprint.postgres.execute_simple.)"""
        return f"set_config('idle_in_transaction_session_timeout', '{int(seconds * 1000)}', true)"

    def failure(self, what: str, e: BaseException) -> str:
        """A message naming the store, what it could not do, and what to do about it."""
        if type(e).__name__ in _READ_ONLY:
            return (f"the {self.what} at {self.name} is read-only for this connection, so it cannot {what} "
                    f"({_cause(e)}); connect as a role that may write, to the primary server")
        if isinstance(e, psycopg.OperationalError):
            return (f"the {self.what} at {self.name} could not {what}: the connection failed ({_cause(e)}); the next "
                    f"call reconnects; check the server")
        return f"the {self.what} at {self.name} could not {what}: {_cause(e)}"

    def migrate(self, component: str, migrations: Sequence[str]) -> None:
        """Bring `component`'s tables in this schema to the latest migration (many openers may race)."""
        with self.sql(f"create its tables (schema {self.schema})") as db:
            if self._schema_version(db, component, len(migrations)) == len(migrations):
                return  # the common case, and the only one a read-only role can open
            with db.transaction():
                # One migrator at a time per schema; the others wait here and then find the work done.
                db.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"fieldprint:{self.schema}",))
                db.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
                db.execute("CREATE TABLE IF NOT EXISTS schema_versions (component TEXT PRIMARY KEY, version INT NOT NULL)")
                have = self._schema_version(db, component, len(migrations)) or 0
                for step in migrations[have:]:
                    db.execute(step)
                db.execute("INSERT INTO schema_versions VALUES (%s, %s) ON CONFLICT (component) DO UPDATE "
                           "SET version = excluded.version", (component, len(migrations)))

    def _schema_version(self, db: psycopg.Connection, component: str, known: int) -> int | None:
        if db.execute("SELECT to_regclass('schema_versions')").fetchone()[0] is None:
            return None
        row = db.execute("SELECT version FROM schema_versions WHERE component = %s", (component,)).fetchone()
        version = row[0] if row else None
        if version is not None and version > known:
            raise StateError(f"the {self.what} at {self.name} (schema {self.schema}) has {component} schema version "
                             f"{version}, newer than this Fieldprint knows ({known}); upgrade Fieldprint")
        return version

    def close(self) -> None:
        """Close the connection; further calls raise StateError."""
        with self.lock:
            self._closed = True
            if self._db is not None:
                self._db.close()


class PostgresStateStore(StateStore):
    """States and override/revocation records in PostgreSQL, shared by every engine that opens the same URL."""

    def __init__(self, url: str, schema: str = DEFAULT_SCHEMA) -> None:
        self._pg = PgConnection(url, schema, "state store")
        self.path = self._pg.name  # what messages and callers print, as for the SQLite store
        try:
            self._pg.migrate("states", _STATE_MIGRATIONS)
        except BaseException:
            self._pg.close()
            raise

    def _damaged(self, state_id: str, e: StateError) -> StateError:
        return StateError(f"the stored row of state {state_id} in {self.path} is damaged: {e}; it cannot be "
                          f"verified or used (restore the store from a backup, or delete the row)")

    def get(self, state_id: str) -> State | None:
        """The stored state with this id, or None; StateError if its stored row is damaged."""
        with self._pg.sql(f"read state {state_id}") as db:
            row = db.execute(f"SELECT {_STATE_COLUMNS} FROM states WHERE state_id = %s", (state_id,)).fetchone()
        if row is None:
            return None
        try:
            return row_to_state(row)
        except StateError as e:
            raise self._damaged(state_id, e) from None

    def taint_for_digest(self, digest: str) -> frozenset[str]:
        """Taint already attached to any stored state with this content digest (stops copy-laundering)."""
        with self._pg.sql("read taint by content digest") as db:
            return self._taint(db, digest)

    def _taint(self, db: psycopg.Connection, digest: str) -> frozenset[str]:
        out: set[str] = set()
        for sid, taint in db.execute("SELECT state_id, taint FROM states WHERE digest = %s", (digest,)):
            try:
                out |= set(_json_strings(taint, "taint"))
            except StateError as e:
                raise self._damaged(sid, e) from None
        return frozenset(out)

    def state_ids(self) -> list[str]:
        """All stored state ids, in insertion order."""
        with self._pg.sql("list states") as db:
            return [r[0] for r in db.execute("SELECT state_id FROM states ORDER BY seq")]

    def stored(self, state_ids: Sequence[str]) -> set[str]:
        """Which of `state_ids` are stored (one query; what PgVectorStore.sweep asks)."""
        with self._pg.sql("look up states") as db:
            return {r[0] for r in db.execute("SELECT state_id FROM states WHERE state_id = ANY(%s)", (list(state_ids),))}

    def __len__(self) -> int:
        with self._pg.sql("count states") as db:
            return db.execute("SELECT count(*) FROM states").fetchone()[0]

    def records_for(self, state_id: str) -> list[PolicyRecord]:
        """Override and revocation records concerning `state_id`, in ledger order."""
        with self._pg.sql(f"read the records of state {state_id}") as db:
            rows = db.execute(f"SELECT {_RECORD_COLUMNS} FROM records WHERE state_id = %s ORDER BY leaf_index",
                              (state_id,)).fetchall()
        return [PolicyRecord(*r) for r in rows]

    def record_at(self, leaf_index: int) -> PolicyRecord | None:
        """The stored override or revocation record at this ledger leaf, or None."""
        with self._pg.sql(f"read the record at leaf {leaf_index}") as db:
            row = db.execute(f"SELECT {_RECORD_COLUMNS} FROM records WHERE leaf_index = %s", (leaf_index,)).fetchone()
        return PolicyRecord(*row) if row else None

    def record_count(self) -> int:
        """How many override and revocation records are stored."""
        with self._pg.sql("count records") as db:
            return db.execute("SELECT count(*) FROM records").fetchone()[0]

    def insert_committed(self, states: Sequence[State], sequence: Callable[[], list[int]]) -> list[State]:
        """Insert `states`, call `sequence()` for their leaf indices, record them; one transaction."""
        for state in states:
            if state.text is not None and "\x00" in state.text:
                raise StateError(f"state {state.state_id}: PostgreSQL text cannot hold NUL characters; remove them "
                                 f"(or keep the content as a tensor reference); nothing was stored")
        with self._pg.sql("store states") as db:
            try:
                with db.transaction():
                    self._check_no_laundering(db, states)
                    self._insert_new(db, states)
                    indices = sequence()
                    if len(indices) != len(states):
                        raise StateError(f"the ledger returned {len(indices)} leaf indices for {len(states)} states; "
                                         f"nothing was stored")
                    execute_simple(db, "UPDATE states SET leaf_index = u.i FROM unnest({}::text[], {}::bigint[]) "
                                         "AS u(id, i) WHERE state_id = u.id", [st.state_id for st in states],
                                         [int(i) for i in indices])
            except psycopg.Error as e:
                lost = isinstance(e, psycopg.OperationalError) and db.broken
                raise StateError(self._pg.failure("store states", e) + (
                    "; the connection dropped during the write, so check with get() whether the states were stored"
                    if lost else "; nothing was stored")) from e
        return [st.committed(i) for st, i in zip(states, indices, strict=True)]

    def _check_no_laundering(self, db: psycopg.Connection, states: Sequence[State]) -> None:
        # The Pacemaker gave each state the taint stored for its content when it built the label; a
        # writer in another process may have stored the same content, tainted, since. Lock each digest
        # (sorted, so two writers never wait on each other crosswise) and re-read under the lock.
        digests = sorted({s.digest for s in states})
        # The first lock statement also bounds the transaction's idle time (idle_bound; it holds for the
        # rest of the transaction): the sequencing of the leaves happens inside it, and a stopped engine
        # would hold these locks that long at most.
        bound = f", {self._pg.idle_bound(self._pg.log_wait_idle_s)}"
        for i, digest in enumerate(digests):
            db.execute(f"SELECT pg_advisory_xact_lock(hashtextextended(%s, 1)){bound if i == 0 else ''}",
                       (f"fieldprint:digest:{digest}",))
        for state in states:
            missing = self._taint(db, state.digest) - state.label.taint
            if missing:
                raise StateError(f"state {state.state_id}: another writer stored the same content tainted by "
                                 f"{sorted(missing)} after this state's label was made; add it again (its label will "
                                 f"carry that taint); nothing was stored")

    def _insert_new(self, db: psycopg.Connection, states: Sequence[State]) -> None:
        cols = list(zip(*[(s.state_id, s.state_type, s.text, s.tensor.digest if s.tensor else None,
                           s.tensor.profile if s.tensor else None, json.dumps(list(s.parents)), s.session, s.creator,
                           s.time_ns, json.dumps(sorted(s.label.sources)), json.dumps(sorted(s.label.taint)), s.digest)
                          for s in states], strict=True))
        # One statement, the rows as array literals (and so the leaf indices' update above), run while
        # the content's lock is held: after psycopg's executemany the server did not arm the idle
        # timeout (idle_bound) until another statement ran, so a writer stopped there held the lock
        # for good (measured on PostgreSQL 16 with psycopg 3.3); and a large statement with parameters
        # can be cut off mid-send (execute_simple). ON CONFLICT keeps the transaction usable; a racing
        # writer's insert of the same id waits for that writer's commit here and then counts as
        # already stored.
        types = ["text"] * 8 + ["bigint"] + ["text"] * 3
        arrays = ", ".join(f"{{}}::{t}[]" for t in types)
        rows = execute_simple(
            db, f"INSERT INTO states ({_STATE_COLUMNS}, digest) SELECT c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, "
                f"NULL, c12 FROM unnest({arrays}) AS r(c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12) "
                f"ON CONFLICT (state_id) DO NOTHING RETURNING state_id", *[list(c) for c in cols]).fetchall()
        stored = {r[0] for r in rows}
        for state in states:
            if state.state_id not in stored:
                raise StateError(f"state {state.state_id} is already stored (same content, parents, session, "
                                 f"creator and time)")

    def insert_record(self, record: PolicyRecord) -> None:
        """Store an override or revocation record that the ledger has sequenced."""
        with self._pg.sql(f"store the {record.kind} at leaf {record.leaf_index}") as db:
            db.execute(f"INSERT INTO records ({_RECORD_COLUMNS}) VALUES (%s,%s,%s,%s,%s)",
                       (record.leaf_index, record.kind, record.state_id, record.target_index, record.note))

    def execute(self, query: str, params: tuple = ()) -> list[tuple]:
        """Run raw SQL (maintenance, tamper tests) with SQLite-style `?` placeholders; the gate re-verifies anyway."""
        with self._pg.sql("run SQL") as db:
            cur = db.execute(qmark_to_pyformat(query) if params else query, params or None)
            return cur.fetchall() if cur.description else []

    def close(self) -> None:
        """Close the connection; further calls raise StateError."""
        self._pg.close()


def create_memory(url: str, schema: str = DEFAULT_SCHEMA, dim: int = 384) -> dict[str, int]:
    """Create or migrate a memory's tables (state store, sessions, pgvector index) in `schema`; each schema version.

    What `fieldprint init --database URL` needs for the memory (and the engines' sessions); opening each
    store does the same for its part.
    """
    from fieldprint.engine.sessions import PostgresSessions
    from fieldprint.memory.pgvector import PgVectorStore

    PostgresStateStore(url, schema).close()
    PostgresSessions(url, schema).close()
    vectors = PgVectorStore(url, dim=dim, schema=schema)
    try:
        with vectors._pg.sql("read its schema versions") as db:
            return dict(db.execute("SELECT component, version FROM schema_versions ORDER BY component").fetchall())
    finally:
        vectors.close()
