"""Where states live: the state store interface and its embedded SQLite implementation.

The state store holds each state's content and labels, the leaf index the ledger gave it, and the
override and revocation records appended for it. It is not trusted: the promotion gate re-derives
every ledger entry from what is stored here and checks it against a signed checkpoint.

Every failure of a store is a StateError naming the store and the problem (a file that is not a
database, a missing folder, a read-only mount, a damaged row); callers never see a backend's own
exception types. A backend (SQLite embedded, PostgreSQL at scale) implements `StateStore`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from fieldprint.canon import is_int
from fieldprint.errors import StateError
from fieldprint.memory.state import Label, State, TensorRef

_SCHEMA = """
CREATE TABLE IF NOT EXISTS states (
    state_id TEXT PRIMARY KEY, type TEXT NOT NULL, text TEXT, tensor_digest TEXT, tensor_profile TEXT,
    parents TEXT NOT NULL, session TEXT NOT NULL, creator TEXT NOT NULL, time_ns INTEGER NOT NULL,
    sources TEXT NOT NULL, taint TEXT NOT NULL, digest TEXT NOT NULL, leaf_index INTEGER
);
CREATE INDEX IF NOT EXISTS states_digest ON states(digest);
CREATE TABLE IF NOT EXISTS records (
    leaf_index INTEGER PRIMARY KEY, kind TEXT NOT NULL, state_id TEXT NOT NULL,
    target_index INTEGER, note TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_state ON records(state_id);
"""
_TABLES = {"states", "records"}
_STATE_COLUMNS = ("state_id, type, text, tensor_digest, tensor_profile, parents, session, creator, time_ns, sources, taint, "
                  "leaf_index")
_RECORD_COLUMNS = "leaf_index, kind, state_id, target_index, note"


@dataclass(frozen=True, slots=True)
class PolicyRecord:
    """A stored override or revocation: its leaf index, kind, the state it concerns, its signed note."""

    leaf_index: int
    kind: str  # "override" | "revocation"
    state_id: str
    target_index: int | None  # for a revocation of an override: that override's leaf index
    note: str


class StateStore(ABC):
    """Storage for states (content, labels, leaf index) and override/revocation records."""

    @abstractmethod
    def get(self, state_id: str) -> State | None:
        """The stored state with this id, or None; StateError if its stored row is damaged."""

    @abstractmethod
    def taint_for_digest(self, digest: str) -> frozenset[str]:
        """Taint already attached to any stored state with this content digest (stops copy-laundering)."""

    @abstractmethod
    def state_ids(self) -> list[str]:
        """All stored state ids, in insertion order."""

    @abstractmethod
    def __len__(self) -> int:
        """How many states are stored."""

    @abstractmethod
    def records_for(self, state_id: str) -> list[PolicyRecord]:
        """Override and revocation records concerning `state_id`, in ledger order."""

    @abstractmethod
    def record_at(self, leaf_index: int) -> PolicyRecord | None:
        """The stored override or revocation record at this ledger leaf, or None."""

    @abstractmethod
    def record_count(self) -> int:
        """How many override and revocation records are stored."""

    @abstractmethod
    def insert_committed(self, states: Sequence[State], sequence: Callable[[], list[int]]) -> list[State]:
        """Insert `states`, call `sequence()` for their leaf indices, record them; all or nothing."""

    @abstractmethod
    def insert_record(self, record: PolicyRecord) -> None:
        """Store an override or revocation record that the ledger has sequenced."""

    @abstractmethod
    def close(self) -> None:
        """Release the store; further calls fail."""

    def require(self, state_ids: Sequence[str]) -> list[State]:
        """The stored states with these ids; StateError naming the first one that is missing."""
        out = []
        for sid in state_ids:
            state = self.get(sid)
            if state is None:
                raise StateError(f"parent state {sid!r} is not in the store; add it (and commit it) first")
            out.append(state)
        return out


def _json_strings(text: object, column: str) -> list[str]:
    # A damaged row must fail here, with its column named, not deep inside the gate.
    try:
        values = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        values = None
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise StateError(f"column {column} is not a JSON list of strings ({text!r:.60})")
    return values


def row_to_state(row: tuple) -> State:
    """Rebuild a State from a stored row; StateError naming the damaged column if the row is not one."""
    sid, stype, text, tdig, tprof, parents, session, creator, time_ns, sources, taint, leaf = row
    for value, column in ((sid, "state_id"), (stype, "type"), (session, "session"), (creator, "creator")):
        if not isinstance(value, str):
            raise StateError(f"column {column} is not text ({value!r:.60})")
    if text is not None and not isinstance(text, str):
        raise StateError(f"column text is not text ({type(text).__name__})")
    if not is_int(time_ns):
        raise StateError(f"column time_ns is not an integer ({time_ns!r:.60})")
    if leaf is not None and not is_int(leaf):
        raise StateError(f"column leaf_index is not an integer ({leaf!r:.60})")
    if (tdig is None) != (tprof is None):
        raise StateError("columns tensor_digest and tensor_profile must both be set or both be empty")
    tensor = TensorRef(tdig, tprof) if tdig is not None else None
    taint_set = frozenset(_json_strings(taint, "taint"))
    # A tampered row may break Label's invariant; keep the row readable so verification can say so.
    label = Label(frozenset(_json_strings(sources, "sources")) | taint_set, taint_set)
    return State(sid, stype, text, tensor, tuple(_json_strings(parents, "parents")), session, creator, time_ns,
                 label, leaf)


def _open_failure(path: str, e: sqlite3.Error) -> StateError:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return StateError(f"cannot open the state store at {path}: the folder {folder} does not exist; create it first")
    if os.path.isdir(path):
        return StateError(f"cannot open the state store at {path}: it is a folder; give the path of a file in it")
    name = getattr(e, "sqlite_errorname", "")
    if name == "SQLITE_NOTADB":
        return StateError(f"{path} is not a state store (not a SQLite database: {e}); give the path of the state "
                          f"store's file, or move this file away to start a new store")
    if name in ("SQLITE_READONLY", "SQLITE_CANTOPEN") or not os.access(folder, os.W_OK):
        return StateError(f"cannot open the state store at {path} ({e}): a new store needs a folder it can write "
                          f"to, and an existing one must already hold its tables to be opened on a read-only mount")
    return StateError(f"cannot open the state store at {path}: {e}")


class SQLiteStateStore(StateStore):
    """One SQLite file: a table of states and a table of override/revocation records."""

    def __init__(self, path: str | os.PathLike = ":memory:") -> None:
        self.path = os.fspath(path)
        self._lock = threading.RLock()
        self._db = None
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            have = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            # Only a store that lacks its tables is written at open, so one on a read-only mount opens for reading.
            if not _TABLES <= have:
                self._db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            if self._db is not None:
                self._db.close()
            raise _open_failure(self.path, e) from None

    @contextmanager
    def _sql(self, what: str) -> Iterator[sqlite3.Connection]:
        # Every SQLite failure leaves as a StateError that names the store and what was being done.
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as e:
                raise StateError(self._failure(what, e)) from e

    def _failure(self, what: str, e: sqlite3.Error) -> str:
        if getattr(e, "sqlite_errorname", "") == "SQLITE_READONLY":
            return f"the state store at {self.path} is read-only, so it cannot {what} ({e}); open it where it can be written"
        return f"the state store at {self.path} could not {what}: {e}"

    def get(self, state_id: str) -> State | None:
        """The stored state with this id, or None; StateError if its stored row is damaged."""
        with self._sql(f"read state {state_id}") as db:
            row = db.execute(f"SELECT {_STATE_COLUMNS} FROM states WHERE state_id = ?", (state_id,)).fetchone()
        if row is None:
            return None
        try:
            return row_to_state(row)
        except StateError as e:
            raise StateError(f"the stored row of state {state_id} in {self.path} is damaged: {e}; it cannot be "
                             f"verified or used (restore the store from a backup, or delete the row)") from None

    def taint_for_digest(self, digest: str) -> frozenset[str]:
        """Taint already attached to any stored state with this content digest (stops copy-laundering)."""
        with self._sql("read taint by content digest") as db:
            rows = db.execute("SELECT state_id, taint FROM states WHERE digest = ?", (digest,)).fetchall()
        out: set[str] = set()
        for sid, taint in rows:
            try:
                out |= set(_json_strings(taint, "taint"))
            except StateError as e:
                raise StateError(f"the stored row of state {sid} in {self.path} is damaged: {e}") from None
        return frozenset(out)

    def state_ids(self) -> list[str]:
        """All stored state ids, in insertion order."""
        with self._sql("list states") as db:
            return [r[0] for r in db.execute("SELECT state_id FROM states ORDER BY rowid")]

    def __len__(self) -> int:
        with self._sql("count states") as db:
            return db.execute("SELECT COUNT(*) FROM states").fetchone()[0]

    def records_for(self, state_id: str) -> list[PolicyRecord]:
        """Override and revocation records concerning `state_id`, in ledger order."""
        with self._sql(f"read the records of state {state_id}") as db:
            rows = db.execute(f"SELECT {_RECORD_COLUMNS} FROM records WHERE state_id = ? ORDER BY leaf_index",
                              (state_id,)).fetchall()
        return [PolicyRecord(*r) for r in rows]

    def record_at(self, leaf_index: int) -> PolicyRecord | None:
        """The stored override or revocation record at this ledger leaf, or None."""
        with self._sql(f"read the record at leaf {leaf_index}") as db:
            row = db.execute(f"SELECT {_RECORD_COLUMNS} FROM records WHERE leaf_index = ?", (leaf_index,)).fetchone()
        return PolicyRecord(*row) if row else None

    def record_count(self) -> int:
        """How many override and revocation records are stored."""
        with self._sql("count records") as db:
            return db.execute("SELECT COUNT(*) FROM records").fetchone()[0]

    def insert_committed(self, states: Sequence[State], sequence: Callable[[], list[int]]) -> list[State]:
        """Insert `states`, call `sequence()` for their leaf indices, record them; one transaction."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise StateError(self._failure("store states", e) + "; nothing was stored") from e
            try:
                for state in states:
                    try:
                        self._db.execute(
                            f"INSERT INTO states ({_STATE_COLUMNS}, digest) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                            (state.state_id, state.state_type, state.text,
                             state.tensor.digest if state.tensor else None, state.tensor.profile if state.tensor else None,
                             json.dumps(list(state.parents)), state.session, state.creator, state.time_ns,
                             json.dumps(sorted(state.label.sources)), json.dumps(sorted(state.label.taint)), None,
                             state.digest),
                        )
                    except sqlite3.IntegrityError:
                        raise StateError(f"state {state.state_id} is already stored (same content, parents, session, "
                                         f"creator and time)") from None
                indices = sequence()
                if len(indices) != len(states):
                    raise StateError(f"the ledger returned {len(indices)} leaf indices for {len(states)} states; "
                                     f"nothing was stored")
                self._db.executemany("UPDATE states SET leaf_index = ? WHERE state_id = ?",
                                     [(i, st.state_id) for i, st in zip(indices, states, strict=True)])
                self._db.execute("COMMIT")
            except BaseException as e:
                # SQLite rolls back by itself on some errors (SQLITE_FULL, SQLITE_IOERR, a failed COMMIT);
                # a second ROLLBACK would then fail and hide the real error.
                if self._db.in_transaction:
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error as rollback_error:
                        raise StateError(f"the state store refused the write ({e}) and then the rollback "
                                         f"({rollback_error}); check the database file, then retry") from e
                if isinstance(e, sqlite3.Error):
                    raise StateError(self._failure("store states", e) + "; nothing was stored") from e
                raise
        return [st.committed(i) for st, i in zip(states, indices, strict=True)]

    def insert_record(self, record: PolicyRecord) -> None:
        """Store an override or revocation record that the ledger has sequenced."""
        with self._sql(f"store the {record.kind} at leaf {record.leaf_index}") as db:
            db.execute(f"INSERT INTO records ({_RECORD_COLUMNS}) VALUES (?,?,?,?,?)",
                       (record.leaf_index, record.kind, record.state_id, record.target_index, record.note))

    def execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Run raw SQL on the store (maintenance and tamper tests); the gate re-verifies everything anyway."""
        with self._sql("run SQL") as db:
            return db.execute(sql, params).fetchall()

    def close(self) -> None:
        """Close the database."""
        self._db.close()
