"""The Pacemaker: the one write path into memory (validate -> embed -> store + ledger + vectors) and retrieval.

`Pacemaker.add` is all or nothing: on any error nothing is stored or indexed (a ledger append cannot
be undone; a leaf with no stored state is inert, see docs/memory.md). Retrieval returns stored states
with their stored labels; with `anchors_only`, each hit is re-decided by the promotion gate.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fieldprint.errors import PolicyError, StateError
from fieldprint.memory.decision import Decision
from fieldprint.memory.embed import Embedder
from fieldprint.memory.policy import PromotionGate
from fieldprint.memory.state import (
    State,
    TensorRef,
    check_collection,
    content_digest,
    new_state,
)
from fieldprint.memory.store import StateStore
from fieldprint.memory.vectors import VectorStore

if TYPE_CHECKING:
    from fieldprint.ledger.log import TransparencyLog


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

    def __init__(self, store: StateStore, log: TransparencyLog, vectors: VectorStore, embedder: Embedder,
                 gate: PromotionGate, compact_every: int = 256) -> None:
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
        for spec in specs:
            for value, what in ((spec.parents, "parents"), (spec.sources, "sources"), (spec.taint, "taint")):
                check_collection(value, what)
        # Parents come from the store, never from the same batch: a parent must be committed and verified.
        parent_states = {p.state_id: p for spec in specs for p in self.store.require(spec.parents)}
        if parent_states:
            # Labels are read from the store, so a parent must match its ledger entry before anything
            # inherits from it: otherwise erasing a parent's taint in the store would launder its children.
            checkpoint = self.gate.latest_checkpoint_or_none()
            for parent in parent_states.values():
                check = self.gate.verify_for_writer(parent, checkpoint)
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

        states = [build(spec, d, frozenset()) for spec, d in zip(specs, digests, strict=True)]
        batch_taint: dict[str, frozenset[str]] = {}
        for state, digest in zip(states, digests, strict=True):
            batch_taint[digest] = batch_taint.get(digest, frozenset()) | state.label.taint
        states = [st if batch_taint[d] <= st.label.taint else build(spec, d, batch_taint[d])
                  for st, spec, d in zip(states, specs, digests, strict=True)]
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
            indexed = None

            def sequence() -> list[int]:
                nonlocal indexed
                futures = [self.log.add(s.entry().encode()) for s in states]
                indices = [f.result() for f in futures]
                indexed = self.vectors.add([s.state_id for s in states], vectors, [s.session for s in states],
                                           [s.state_type for s in states], eligible)
                return indices

            try:
                committed = self.store.insert_committed(states, sequence)
            except BaseException:
                if indexed is not None:
                    # A store shared by several engines undoes only this add (others may have written since).
                    revert = getattr(self.vectors, "revert", None)
                    if revert is not None:
                        revert(indexed)
                    else:
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
        checkpoint = None
        if anchors_only:
            try:
                checkpoint = self.gate.checkpoint()
            except PolicyError:
                return []  # no usable signed checkpoint: nothing verifies, so nothing is an anchor
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
        # The flag counts records the log holds even before a checkpoint covers them: it is only a hint.
        self.vectors.set_promotable([state_id], self.gate.eligible_as_writer(state_id))
        return self.gate.explain(state_id)
