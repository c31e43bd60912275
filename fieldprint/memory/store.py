"""Where states live: an embedded SQLite state store, and the Pacemaker that commits and retrieves.

The state store holds each state's content and labels, the leaf index the ledger gave it, and the
override and revocation records appended for it. It is not trusted: the promotion gate re-derives
every ledger entry from what is stored here and checks it against a signed checkpoint.

`Pacemaker.add` is the one write path: validate -> embed -> store + ledger + vectors, all or
nothing (a ledger append cannot be undone; a leaf with no stored state is inert, see docs/memory.md).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fieldprint.errors import StateError
from fieldprint.memory.embed import Embedder
from fieldprint.memory.state import Label, State, TensorRef, content_digest, new_state
from fieldprint.memory.vectors import VectorStore

if TYPE_CHECKING:
    from fieldprint.ledger.log import TransparencyLog
    from fieldprint.memory.policy import Decision, PromotionGate

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
_STATE_COLUMNS = "state_id, type, text, tensor_digest, tensor_profile, parents, session, creator, time_ns, sources, taint, leaf_index"


@dataclass(frozen=True, slots=True)
class PolicyRecord:
    """A stored override or revocation: its leaf index, kind, the state it concerns, its signed note."""

    leaf_index: int
    kind: str  # "override" | "revocation"
    state_id: str
    target_index: int | None  # for a revocation of an override: that override's leaf index
    note: str


class StateStore:
    """SQLite table of states (content, labels, leaf index) and of override/revocation records."""

    def __init__(self, path: str | os.PathLike = ":memory:") -> None:
        self.path = os.fspath(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        self._db.executescript(_SCHEMA)

    def _row_to_state(self, row: tuple) -> State:
        sid, stype, text, tdig, tprof, parents, session, creator, time_ns, sources, taint, leaf = row
        tensor = TensorRef(tdig, tprof) if tdig is not None else None
        sources, taint = frozenset(json.loads(sources)), frozenset(json.loads(taint))
        # A tampered row may break Label's invariant; keep the row readable so verification can say so.
        label = Label(sources | taint, taint)
        return State(sid, stype, text, tensor, tuple(json.loads(parents)), session, creator, time_ns, label, leaf)

    def get(self, state_id: str) -> State | None:
        """The stored state with this id, or None."""
        with self._lock:
            row = self._db.execute(f"SELECT {_STATE_COLUMNS} FROM states WHERE state_id = ?", (state_id,)).fetchone()
        return self._row_to_state(row) if row else None

    def require(self, state_ids: Sequence[str]) -> list[State]:
        """The stored states with these ids; StateError naming the first one that is missing."""
        out = []
        for sid in state_ids:
            state = self.get(sid)
            if state is None:
                raise StateError(f"parent state {sid!r} is not in the store; add it (and commit it) first")
            out.append(state)
        return out

    def taint_for_digest(self, digest: str) -> frozenset[str]:
        """Taint already attached to any stored state with this content digest (stops copy-laundering)."""
        with self._lock:
            rows = self._db.execute("SELECT taint FROM states WHERE digest = ?", (digest,)).fetchall()
        return frozenset(s for (t,) in rows for s in json.loads(t))

    def state_ids(self) -> list[str]:
        """All stored state ids, in insertion order."""
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT state_id FROM states ORDER BY rowid")]

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM states").fetchone()[0]

    def records_for(self, state_id: str) -> list[PolicyRecord]:
        """Override and revocation records concerning `state_id`, in ledger order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT leaf_index, kind, state_id, target_index, note FROM records WHERE state_id = ? ORDER BY leaf_index",
                (state_id,),
            ).fetchall()
        return [PolicyRecord(*r) for r in rows]

    def record_at(self, leaf_index: int) -> PolicyRecord | None:
        """The stored override or revocation record at this ledger leaf, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT leaf_index, kind, state_id, target_index, note FROM records WHERE leaf_index = ?", (leaf_index,),
            ).fetchone()
        return PolicyRecord(*row) if row else None

    def record_count(self) -> int:
        """How many override and revocation records are stored."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]

    def insert_committed(self, states: Sequence[State], sequence: Callable[[], list[int]]) -> list[State]:
        """Insert `states`, call `sequence()` for their leaf indices, record them; one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
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
                assert len(indices) == len(states)
                self._db.executemany("UPDATE states SET leaf_index = ? WHERE state_id = ?",
                                     [(i, st.state_id) for i, st in zip(indices, states)])
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
                    raise StateError(f"the state store refused the write ({e}); nothing was stored") from e
                raise
        return [st.committed(i) for st, i in zip(states, indices)]

    def insert_record(self, record: PolicyRecord) -> None:
        """Store an override or revocation record that the ledger has sequenced."""
        with self._lock:
            self._db.execute(
                "INSERT INTO records (leaf_index, kind, state_id, target_index, note) VALUES (?,?,?,?,?)",
                (record.leaf_index, record.kind, record.state_id, record.target_index, record.note),
            )

    def execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Run raw SQL on the store (maintenance and tamper tests); the gate re-verifies everything anyway."""
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def close(self) -> None:
        """Close the database."""
        self._db.close()


@dataclass(frozen=True, slots=True)
class Retrieved:
    """A search result: the stored state (labels unchanged by retrieval) and its similarity."""

    state: State
    score: float


@dataclass(frozen=True, slots=True)
class StateSpec:
    """What a caller asks to remember; `Pacemaker.add_many` turns specs into committed states."""

    state_type: str
    session: str
    creator: str
    text: str | None = None
    tensor: TensorRef | None = None
    parents: Sequence[str] = ()
    sources: Sequence[str] = ()
    taint: Sequence[str] = ()
    time_ns: int | None = None


class Pacemaker:
    """The semantic path: commit states (store + ledger + vectors) and retrieve them per session."""

    def __init__(self, store: StateStore, log: TransparencyLog, vectors: VectorStore, embedder: Embedder, gate: PromotionGate,
                 compact_every: int = 256) -> None:
        if embedder.dim != vectors.dim:
            raise StateError(f"embedder {embedder.name} makes {embedder.dim}-d vectors, the vector store holds {vectors.dim}-d")
        self.store, self.log, self.vectors, self.embedder, self.gate = store, log, vectors, embedder, gate
        # Every commit appends a small batch to the vector store; searches slow down as those pile up.
        self.compact_every = compact_every
        self._since_compact = 0
        self._lock = threading.Lock()

    def add(self, state_type: str, *, session: str, creator: str, text: str | None = None, tensor: TensorRef | None = None,
            parents: Sequence[str] = (), sources: Sequence[str] = (), taint: Sequence[str] = (),
            time_ns: int | None = None) -> State:
        """Validate, label, commit and index one state; on any error nothing is stored or indexed."""
        return self.add_many([StateSpec(state_type, session, creator, text, tensor, parents, sources, taint, time_ns)])[0]

    def _build(self, specs: Sequence[StateSpec]) -> list[State]:
        # Parents come from the store, never from the same batch: a parent must be committed and verified.
        parent_states = {p.state_id: p for spec in specs for p in self.store.require(spec.parents)}
        if parent_states:
            # Labels are read from the store, so a parent must match its ledger entry before anything
            # inherits from it: otherwise erasing a parent's taint in the store would launder its children.
            checkpoint = self.gate.checkpoint()
            for parent in parent_states.values():
                check = self.gate.verify(parent, checkpoint)
                if not check.ok:
                    raise StateError(f"parent {parent.state_id} does not verify against the ledger ({check.detail}); "
                                     f"refusing to derive from it")
        digests = []
        for spec in specs:
            if spec.text is None and spec.tensor is None:
                raise StateError("a state needs content: give text, a tensor reference, or both")
            digests.append(content_digest(spec.text, spec.tensor))
        # Content already seen tainted stays tainted, whoever stores it again (in this batch too, so a
        # second pass gives every state the taint of any other state in the batch with the same content).
        def build(spec: StateSpec, digest: str, extra: frozenset[str]) -> State:
            return new_state(
                spec.state_type, session=spec.session, creator=spec.creator, text=spec.text, tensor=spec.tensor,
                parents=[parent_states[p] for p in spec.parents], sources=spec.sources,
                taint=set(spec.taint) | self.store.taint_for_digest(digest) | extra, time_ns=spec.time_ns,
            )

        states = [build(spec, d, frozenset()) for spec, d in zip(specs, digests)]
        batch_taint: dict[str, frozenset[str]] = {}
        for state, digest in zip(states, digests):
            batch_taint[digest] = batch_taint.get(digest, frozenset()) | state.label.taint
        states = [st if batch_taint[d] <= st.label.taint else build(spec, d, batch_taint[d])
                  for st, spec, d in zip(states, specs, digests)]
        if len({s.state_id for s in states}) != len(states):
            raise StateError("the batch holds the same state twice (same content, parents, session, creator and time)")
        return states

    def add_many(self, specs: Sequence[StateSpec]) -> list[State]:
        """Commit a batch: one embedding call, one store transaction, one vector append; all or nothing."""
        with self._lock:
            states = self._build(list(specs))
            if not states:
                return []
            # Embed before writing anything: an embedder failure must leave no trace.
            vectors = self.embedder.embed([s.text if s.text is not None else s.digest for s in states])
            eligible = [self.gate.eligible_by_default(s) for s in states]
            version = self.vectors.version()
            indexed = False

            def sequence() -> list[int]:
                nonlocal indexed
                futures = [self.log.add(s.entry().encode()) for s in states]
                indices = [f.result() for f in futures]
                self.vectors.add([s.state_id for s in states], vectors, [s.session for s in states],
                                 [s.state_type for s in states], eligible)
                indexed = True
                return indices

            try:
                committed = self.store.insert_committed(states, sequence)
            except BaseException:
                if indexed:
                    self.vectors.rollback(version)
                raise
            self._since_compact += 1
            if self.compact_every and self._since_compact >= self.compact_every:
                self.vectors.compact()
                self._since_compact = 0
            return committed

    def search(self, text: str, k: int, *, session: str | None = None, state_type: str | None = None,
               anchors_only: bool = False) -> list[Retrieved]:
        """Top-k states similar to `text`; with anchors_only, only states the gate promotes right now."""
        query = self.embedder.embed([text])[0]
        # The index's promotable flag narrows the search; the gate then decides each hit afresh.
        hits = self.vectors.search(query, k, session=session, state_type=state_type, promotable_only=anchors_only)
        out = []
        checkpoint = self.gate.checkpoint() if anchors_only else None
        for hit in hits:
            state = self.store.get(hit.state_id)
            if state is None:
                continue
            if anchors_only and not self.gate.explain(state.state_id, checkpoint=checkpoint).anchor:
                continue
            out.append(Retrieved(state, hit.score))
        return out

    def apply(self, note: str) -> Decision:
        """Apply a signed override or revocation note; refresh the index flag; return the new decision."""
        with self._lock:
            record = self.gate.apply(note)
            return self._refresh_flag(record.state_id)

    def recover_record(self, leaf_index: int) -> Decision:
        """Store the override/revocation logged at `leaf_index` after a failed apply; refresh the index flag."""
        with self._lock:
            record = self.gate.recover_record(leaf_index)
            return self._refresh_flag(record.state_id)

    def _refresh_flag(self, state_id: str) -> Decision:
        decision = self.gate.explain(state_id)
        self.vectors.set_promotable([state_id], decision.eligible)
        return decision
