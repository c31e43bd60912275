"""Sessions (their turns and chat history), kept where the engine's memory is.

One engine on a data folder keeps them in `sessions.json` there (`FileSessions`: rewritten whole after
every change, so a crash leaves the old file or the new one). Engines sharing a PostgreSQL memory keep
them in its schema (`PostgresSessions`), so any engine can continue or roll back a session another
began: every change reads the session's row under a row lock, applies the change and writes it back
in one transaction, so two engines adding turns to one session both land, one after the other, and
a rollback never races a turn.

A change is a function of a copy of the session; if it raises, nothing is stored and the session is
as it was.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from fieldprint.canon import is_int
from fieldprint.errors import EngineError
from fieldprint.postgres import execute_simple

T = TypeVar("T")


@dataclass(slots=True)
class Turn:
    user_state: str
    output_state: str
    receipt_entry: str  # the generation entry (base64) of the turn's receipt
    kv_index: int | None = None  # the leaf index of the turn's K/V commit, once it has landed


@dataclass(slots=True)
class Session:
    name: str
    history: list[dict] = field(default_factory=list)  # chat messages of the kept turns
    turns: list[Turn] = field(default_factory=list)

    def copy(self) -> Session:
        return Session(self.name, list(self.history), [Turn(t.user_state, t.output_state, t.receipt_entry, t.kv_index)
                                                        for t in self.turns])


def session_record(s: Session) -> dict:
    """A session as stored (JSON)."""
    return {"history": s.history, "turns": [{"user_state": t.user_state, "output_state": t.output_state,
                                             "receipt_entry": t.receipt_entry, "kv_index": t.kv_index} for t in s.turns]}


def session_from_record(name: str, record: dict) -> Session:
    """A session from its stored record; TypeError or KeyError when a field has the wrong shape or type."""
    history, turns = record["history"], record["turns"]
    if not isinstance(history, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in history):
        raise TypeError(f"session {name!r}: history must be a list of chat messages")
    if not isinstance(turns, list) or not all(
            isinstance(t, dict) and isinstance(t["user_state"], str) and isinstance(t["output_state"], str)
            and isinstance(t["receipt_entry"], str) and (t["kv_index"] is None or is_int(t["kv_index"])) for t in turns):
        raise TypeError(f"session {name!r}: turns must be a list of turn records")
    return Session(name, list(history), [Turn(t["user_state"], t["output_state"], t["receipt_entry"], t["kv_index"])
                                         for t in turns])


def _missing(name: str) -> EngineError:
    return EngineError(f"session {name!r} does not exist; create it with new_session({name!r})")


class FileSessions:
    """The sessions of one engine: held in memory, saved whole through `save` after every change."""

    def __init__(self, records: dict, save: Callable[[dict], None]) -> None:
        self._sessions = {name: session_from_record(name, r) for name, r in records.items()}  # TypeError, KeyError
        self._save = save
        self._lock = threading.RLock()

    def get(self, name: str) -> Session | None:
        with self._lock:
            s = self._sessions.get(name)
            return None if s is None else s.copy()

    def create(self, name: str) -> None:
        with self._lock:
            if name in self._sessions:
                raise EngineError(f"session {name!r} already exists")
            self._sessions[name] = Session(name)
            try:
                self._flush()
            except BaseException:
                del self._sessions[name]  # not written: it does not exist
                raise

    def change(self, name: str, fn: Callable[[Session], T]) -> T:
        with self._lock:
            s = self._sessions.get(name)
            if s is None:
                raise _missing(name)
            work = s.copy()
            result = fn(work)
            self._sessions[name] = work
            try:
                self._flush()
            except BaseException:
                self._sessions[name] = s
                raise
            return result

    def _flush(self) -> None:
        self._save({n: session_record(s) for n, s in self._sessions.items()})

    def close(self) -> None:
        pass


_SESSION_MIGRATIONS = ("""
CREATE TABLE sessions (name TEXT PRIMARY KEY, record JSONB NOT NULL, changed_ns BIGINT NOT NULL);
""",)


def _jsonb(record: dict):
    from psycopg.types.json import Jsonb

    return Jsonb(record)


class PostgresSessions:
    """Sessions in a PostgreSQL memory's schema, shared by every engine that opens it."""

    def __init__(self, url: str, schema: str | None = None) -> None:
        from fieldprint.memory.pg_store import DEFAULT_SCHEMA, PgConnection

        self._pg = PgConnection(url, schema or DEFAULT_SCHEMA, "session store")
        self.path = self._pg.name
        try:
            self._pg.migrate("sessions", _SESSION_MIGRATIONS)
        except BaseException:
            self._pg.close()
            raise

    def _session(self, name: str, record) -> Session:
        try:
            return session_from_record(name, record)
        except (KeyError, TypeError) as e:
            raise EngineError(f"the stored record of session {name!r} in {self.path} is damaged ({e!r}); the log's "
                              "generation and rollback entries record what it held") from None

    def get(self, name: str) -> Session | None:
        with self._pg.sql(f"read session {name!r}") as db:
            row = db.execute("SELECT record FROM sessions WHERE name = %s", (name,)).fetchone()
        return None if row is None else self._session(name, row[0])

    def create(self, name: str) -> None:
        with self._pg.sql(f"create session {name!r}") as db:
            row = db.execute("INSERT INTO sessions VALUES (%s, %s, %s) ON CONFLICT (name) DO NOTHING RETURNING name",
                             (name, _jsonb(session_record(Session(name))), time.time_ns())).fetchone()
        if row is None:
            raise EngineError(f"session {name!r} already exists")

    def import_records(self, records: dict) -> list[str]:
        """Store the sessions of an earlier sessions.json that this database does not have yet; their names."""
        added = []
        for name, record in records.items():
            s = session_from_record(name, record)  # a damaged file is refused, not imported
            with self._pg.sql(f"import session {name!r}") as db:
                if db.execute("INSERT INTO sessions VALUES (%s, %s, %s) ON CONFLICT (name) DO NOTHING RETURNING name",
                              (name, _jsonb(session_record(s)), time.time_ns())).fetchone():
                    added.append(name)
        return added

    def change(self, name: str, fn: Callable[[Session], T]) -> T:
        # One transaction: the row stays locked from the read to the write, so changes to one session by
        # any number of engines apply one after another; other sessions are not held up.
        with self._pg.sql(f"change session {name!r}") as db, db.transaction():
            # A stopped engine holds the row this long at most (a rollback's change waits for its log
            # entry in between): the bound is set by the statement that takes the lock.
            row = db.execute(f"SELECT record, {self._pg.idle_bound(self._pg.log_wait_idle_s)} FROM sessions "
                             "WHERE name = %s FOR UPDATE", (name,)).fetchone()
            if row is None:
                raise _missing(name)
            work = self._session(name, row[0])
            result = fn(work)
            # As literals: a long session's record is a large statement, run under the row's lock.
            execute_simple(db, "UPDATE sessions SET record = {}, changed_ns = {} WHERE name = {}",
                                 _jsonb(session_record(work)), time.time_ns(), name)
            return result

    def close(self) -> None:
        self._pg.close()

