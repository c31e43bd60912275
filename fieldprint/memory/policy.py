"""The promotion gate: which memory states become anchors, and why.

A state is an anchor only when
  (1) its ledger entry verifies: the entry rebuilt from the stored state is included, by a Merkle
      proof, in a checkpoint signed by a configured log key, and the stored fields still hash to
      the state id; and
  (2) its type is promotable and (3) it is untainted -- or (4) an override allows it: a signed,
      logged, unexpired record by a configured override key.
A state its owner withdrew (`why_withdrawn`: the turns a session rollback dropped) and a state with
a valid revocation are never anchors, whatever else the records say; a revoked override no longer
counts; among active overrides the latest issued wins (ties: the later leaf). Overrides never
excuse (1): provenance is mandatory.

Each record carries a random `record_id` inside its signed body, and a record counts once: apply()
refuses a record already stored, and a copy logged again (a replay, which needs no key) is listed as
rejected. Precedence comes from the signed `issued_ns`, not from where a copy sits in the ledger, so
no replay, in any order, changes a decision.

The gate only reads: it verifies against the log's latest stored checkpoint and never asks the log
to sign one (the log signs on its own schedule or on an explicit log.checkpoint()). States and
records not yet covered by that checkpoint are simply not verified yet.

Overrides and revocations are signed records (records.py); which of them decides is a pure rule
(decision.py). Nothing here trusts the state store: every decision re-verifies signatures,
inclusion and time windows from scratch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fieldprint.canon import is_int, parse_digest
from fieldprint.errors import EntryError, FieldprintError, NoteError, PolicyError, StateError
from fieldprint.ledger.entry import decode_entry
from fieldprint.ledger.merkle import leaf_hash, verify_inclusion
from fieldprint.ledger.note import Checkpoint, Verifier
from fieldprint.memory.decision import Check, Decision, ValidRecord, decide, sentence
from fieldprint.memory.records import Override, Revocation, open_record, record_entry, utc_text
from fieldprint.memory.state import STATE_TYPES, State
from fieldprint.memory.store import PolicyRecord, StateStore

if TYPE_CHECKING:
    from fieldprint.ledger.log import TransparencyLog

DEFAULT_MAX_OVERRIDE_NS = 30 * 24 * 3600 * 10**9  # an override is a temporary exception, not a new rule
DEFAULT_PROMOTABLE = frozenset(t for t, rule in STATE_TYPES.items() if rule.promotable)


@dataclass(slots=True)
class GateConfig:
    """Who the gate believes: checkpoint keys, override keys (C2SP verifier key texts), and the rules.

    `log_origin` is the origin line the log's checkpoints must carry (a key may sign for several
    logs); None takes the origin of the log the gate is given.
    """

    log_keys: list[str]
    override_keys: list[str]
    promotable_types: frozenset[str] = DEFAULT_PROMOTABLE
    max_override_ns: int = DEFAULT_MAX_OVERRIDE_NS
    log_origin: str | None = None

    def __post_init__(self) -> None:
        for what, keys in (("log key", self.log_keys), ("override key", self.override_keys)):
            if isinstance(keys, str):
                raise PolicyError(f"{what}s must be a list of verifier key texts, not one string")
            for k in keys:
                try:
                    Verifier.parse(k)
                except NoteError as e:
                    raise PolicyError(f"{what} {k!r}: {e}") from None
        if not self.log_keys:
            raise PolicyError("at least one log key is needed to verify checkpoints")
        unknown = set(self.promotable_types) - set(STATE_TYPES)
        if unknown:
            raise PolicyError(f"promotable_types names unknown state types {sorted(unknown)}")
        if not is_int(self.max_override_ns) or self.max_override_ns <= 0:
            raise PolicyError("max_override_ns must be a positive integer")
        if self.log_origin is not None and (not isinstance(self.log_origin, str) or not self.log_origin
                                            or "\n" in self.log_origin):
            raise PolicyError(f"log_origin must be a non-empty line of text or None, got {self.log_origin!r}")


_SIGNS = "the log signs one on its schedule or on log.checkpoint()"


def _never_withdrawn(state_id: str) -> None:
    return None


class PromotionGate:
    """Decides, explains and records promotion: verify -> withdrawal -> revocations -> overrides -> type and taint.

    `why_withdrawn(state_id)` says why a state was withdrawn, or None: the gate asks it on every
    decision and keeps no copy, so the owner of the withdrawals (the engine's memory) stays their
    one record.
    """

    def __init__(self, store: StateStore, log: TransparencyLog, config: GateConfig,
                 clock: Callable[[], int] = time.time_ns,
                 why_withdrawn: Callable[[str], str | None] = _never_withdrawn) -> None:
        if config.log_origin is not None and config.log_origin != log.origin:
            raise PolicyError(f"the gate is configured for the log {config.log_origin!r} but was given the log "
                              f"{log.origin!r}; give it that log or change GateConfig.log_origin")
        self.store, self.log, self.config, self.clock = store, log, config, clock
        self.why_withdrawn = why_withdrawn
        self._verified: tuple[tuple, Checkpoint] | None = None  # the last checkpoint note verified, and under what

    @property
    def origin(self) -> str:
        """The origin line the log's checkpoints must carry."""
        return self.config.log_origin or self.log.origin

    def open_checkpoint(self, checkpoint: Checkpoint | str) -> Checkpoint:
        """Verify a checkpoint (or its note) under the configured log keys and the log's origin; PolicyError if not."""
        note = checkpoint.note if isinstance(checkpoint, Checkpoint) else checkpoint
        if not isinstance(note, str):
            raise PolicyError(f"a checkpoint is a Checkpoint or its signed note (str), got {type(checkpoint).__name__}")
        key = (note, tuple(self.config.log_keys), self.origin)
        verified = self._verified
        if verified is not None and verified[0] == key:
            return verified[1]  # the same note under the same keys: its signature was checked already
        try:
            cp = Checkpoint.open(note, list(self.config.log_keys), origin=self.origin)
        except NoteError as e:
            raise PolicyError(f"checkpoint refused ({e}); the gate accepts only checkpoints of {self.origin!r} "
                              f"signed by a configured log key") from None
        self._verified = (key, cp)
        return cp

    def checkpoint(self) -> Checkpoint:
        """The log's latest stored checkpoint, verified under the configured keys and origin; never signs one."""
        latest = self.latest_checkpoint_or_none()
        if latest is None:
            raise PolicyError(f"the log has no signed checkpoint yet, so nothing is verified; {_SIGNS}")
        return latest

    def latest_checkpoint_or_none(self) -> Checkpoint | None:
        """The log's latest stored checkpoint, verified; None when the log has none; PolicyError if refused."""
        try:
            latest = self.log.latest_checkpoint()
        except FieldprintError as e:
            raise PolicyError(f"cannot read the log's latest checkpoint: {e}") from None
        return None if latest is None else self.open_checkpoint(latest.note)

    def eligible_by_default(self, state: State) -> bool:
        """Rules (2) and (3) alone: a promotable type with no untrusted source."""
        return state.state_type in self.config.promotable_types and not state.label.tainted

    def _included(self, entry: bytes, index: int, cp: Checkpoint) -> str | None:
        # None when the entry is leaf `index` of the checkpointed tree, else why not.
        if index >= cp.size:
            return (f"leaf {index} is not yet covered by a signed checkpoint (the latest covers {cp.size} leaves); "
                    f"{_SIGNS}")
        try:
            proof = self.log.inclusion_proof(index, cp.size)
            verify_inclusion(leaf_hash(entry), index, cp.size, proof, cp.root_hash)
        except FieldprintError as e:
            return f"inclusion proof for leaf {index} in checkpoint size {cp.size} fails: {e}"
        return None

    @staticmethod
    def _entry_or_why(state: State) -> tuple[bytes | None, str | None]:
        if state.leaf_index is None:
            return None, "the state has no leaf index: it was never committed to the ledger"
        try:
            return state.entry().encode(), None
        except (EntryError, StateError) as e:
            return None, f"the stored state does not form a valid ledger entry: {e}"

    def _verify_state(self, state: State, cp: Checkpoint | None, cp_error: str | None) -> Check:
        entry, bad = self._entry_or_why(state)
        if entry is None:
            return Check("ledger", False, bad)
        if cp is None:
            return Check("ledger", False, cp_error or "no signed checkpoint")
        why = self._included(entry, state.leaf_index, cp)
        if why is not None:
            return Check("ledger", False, self._diagnose(state, entry, why))
        # The id also covers what the entry does not carry (creator, trusted sources).
        if state.compute_id() != state.state_id:
            return Check("ledger", False, "the stored fields no longer hash to the state id: the stored state was altered")
        return Check("ledger", True,
                     f"leaf {state.leaf_index} included in the checkpoint of size {cp.size} signed by the log key")

    def verify_for_writer(self, state: State, checkpoint: Checkpoint | None) -> Check:
        """Check (1) before deriving from `state`: by `checkpoint` if it covers the leaf, else by the log's own leaf.

        For the writer only: a leaf the latest checkpoint does not cover yet is compared with the log it
        appended to, which is what a checkpoint signed now would attest. Decisions never use this.
        """
        if checkpoint is not None and state.leaf_index is not None and state.leaf_index < checkpoint.size:
            return self.verify(state, checkpoint)
        entry, bad = self._entry_or_why(state)
        if entry is None:
            return Check("ledger", False, bad)
        why = self._in_log(entry, state.leaf_index)
        if why is not None:
            return Check("ledger", False, self._diagnose(state, entry, why))
        if state.compute_id() != state.state_id:
            return Check("ledger", False, "the stored fields no longer hash to the state id: the stored state was altered")
        return Check("ledger", True, f"leaf {state.leaf_index} of the log holds this state's entry")

    def _diagnose(self, state: State, entry: bytes, why: str) -> str:
        # Say what differs between the stored state and the ledger, when the ledger can tell us.
        try:
            logged = decode_entry(self.log.entry(state.leaf_index))
        except FieldprintError:
            return why
        mine = decode_entry(entry)
        if logged.get("state_id") != state.state_id:
            return f"leaf {state.leaf_index} holds another record, not this state; {why}"
        if logged.get("digest") != mine["digest"]:
            return (f"stored content digest {mine['digest']} differs from the ledger's {logged.get('digest')}: "
                    f"the stored content was altered")
        if logged != mine:
            diff = sorted(k for k in mine if logged.get(k) != mine[k])
            return f"stored fields {diff} differ from the ledger entry: the stored state was altered"
        return why

    def _checkpoint_or_why(self, checkpoint: Checkpoint | None) -> tuple[Checkpoint | None, str | None]:
        # A checkpoint handed in is verified like the log's own: the gate trusts keys, not callers.
        try:
            return (self.checkpoint() if checkpoint is None else self.open_checkpoint(checkpoint)), None
        except PolicyError as e:
            return None, str(e)

    def verify(self, state: State, checkpoint: Checkpoint | None = None) -> Check:
        """Check (1) alone: does this stored state match its ledger entry under a signed checkpoint?"""
        return self._verify_state(state, *self._checkpoint_or_why(checkpoint))

    def _in_log(self, entry: bytes, index: int) -> str | None:
        # The writer's view: None when leaf `index` of the log holds exactly `entry`, else why not.
        try:
            logged = bytes(self.log.entry(index))
        except FieldprintError as e:
            return f"cannot read leaf {index} from the log: {e}"
        return None if logged == entry else f"leaf {index} holds another entry"

    def _records(self, state_id: str, included: Callable[[bytes, int], str | None],
                 now: int) -> tuple[list[ValidRecord], dict[int, str], list[Check]]:
        # Returns the records that count, the record id at each verified leaf (copies too), and the rejected.
        valid: list[ValidRecord] = []
        ids_at: dict[int, str] = {}
        first_leaf: dict[str, int] = {}
        rejected: list[Check] = []
        for rec in self.store.records_for(state_id):
            where = f"{rec.kind} at leaf {rec.leaf_index}"
            try:
                record = open_record(rec.note, list(self.config.override_keys))
            except PolicyError as e:
                rejected.append(Check(rec.kind, False, f"{where}: {e}"))
                continue
            if record.state_id != state_id:
                rejected.append(Check(rec.kind, False, f"{where} is about {record.state_id}, not this state"))
                continue
            why = included(record_entry(rec.note, record), rec.leaf_index)
            if why is not None:
                rejected.append(Check(rec.kind, False, f"{where} is not verifiably in the ledger: {why}"))
                continue
            ids_at[rec.leaf_index] = record.record_id
            if record.record_id in first_leaf:
                # Re-logging a signed note needs no key: a copy must never count a second time.
                rejected.append(Check(rec.kind, False, f"{where} is a copy of the record at leaf "
                                      f"{first_leaf[record.record_id]} (record_id {record.record_id}); a record counts once"))
                continue
            first_leaf[record.record_id] = rec.leaf_index
            if isinstance(record, Override):
                if record.expires_ns - record.issued_ns > self.config.max_override_ns:
                    rejected.append(Check("override", False,
                                          f"{where} lasts longer than the allowed {self.config.max_override_ns} ns"))
                    continue
                if not record.issued_ns <= now < record.expires_ns:
                    state = "expired" if now >= record.expires_ns else "not yet valid"
                    window = f"valid {utc_text(record.issued_ns)} to {utc_text(record.expires_ns)}, now {utc_text(now)}"
                    rejected.append(Check("override", False, f"{where} by {record.who} is {state} ({window})"))
                    continue
            valid.append(ValidRecord(rec.leaf_index, record))
        return valid, ids_at, rejected

    def explain(self, state_id: str, *, checkpoint: Checkpoint | None = None, now_ns: int | None = None) -> Decision:
        """Decide whether `state_id` is an anchor now, with every check and a one-line reason; never writes."""
        try:
            parse_digest(state_id)
        except EntryError as e:
            raise StateError(f"state id: {e}") from None
        now = self.clock() if now_ns is None else now_ns
        state = self.store.get(state_id)
        if state is None:
            check = Check("ledger", False, "no such state in the store")
            return Decision(state_id, False, False, False, "unknown", None, (check,), (),
                            f"not an anchor: {state_id} is not a stored state")
        cp, cp_error = self._checkpoint_or_why(checkpoint)
        ledger = self._verify_state(state, cp, cp_error)
        type_ok = state.state_type in self.config.promotable_types
        checks = [
            ledger,
            Check("type", type_ok, f"a {state.state_type} is {'' if type_ok else 'not '}promotable"),
            Check("taint", not state.label.tainted,
                  f"tainted by {', '.join(sorted(state.label.taint))}" if state.label.tainted
                  else f"trusted sources: {', '.join(sorted(state.label.sources)) or 'none'}"),
        ]

        def included(entry: bytes, index: int) -> str | None:
            return self._included(entry, index, cp) if cp else (cp_error or "no signed checkpoint")

        records = self._records(state_id, included, now)
        eligible, basis, deciding, check, rejected = decide(state, self.config.promotable_types, *records,
                                                            withdrawal=self.why_withdrawn(state_id))
        if check is not None:
            checks.append(check)
        anchor = ledger.ok and eligible
        return Decision(state_id, anchor, ledger.ok, eligible, basis, deciding.index if deciding else None,
                        tuple(checks), tuple(rejected), sentence(state, anchor, ledger, checks, basis))

    def eligible_as_writer(self, state_id: str, now_ns: int | None = None) -> bool:
        """The policy part of a decision with records checked against the log's own leaves (for the index hint).

        Right after apply() a record is in the log but usually not yet under a signed checkpoint; the
        vector index's `promotable` flag should already reflect it. Anchor decisions never use this.
        """
        state = self.store.get(state_id)
        if state is None:
            return False
        now = self.clock() if now_ns is None else now_ns
        records = self._records(state_id, self._in_log, now)
        return decide(state, self.config.promotable_types, *records, withdrawal=self.why_withdrawn(state_id))[0]

    def is_anchor(self, state_id: str) -> bool:
        """True when `state_id` is an anchor now (see explain for why); never writes."""
        return self.explain(state_id).anchor

    def _stored_copy(self, record: Override | Revocation) -> int | None:
        # The leaf of a stored record with the same record id (signed by a configured key), if any.
        for rec in self.store.records_for(record.state_id):
            try:
                if open_record(rec.note, list(self.config.override_keys)).record_id == record.record_id:
                    return rec.leaf_index
            except PolicyError:
                continue
        return None

    def apply(self, note: str, *, now_ns: int | None = None) -> PolicyRecord:
        """Check a signed override/revocation, append it to the ledger, store it; PolicyError if refused."""
        if not isinstance(note, str):
            raise PolicyError(f"an override or revocation is a signed note (str), got {type(note).__name__}")
        record = open_record(note, list(self.config.override_keys))
        now = self.clock() if now_ns is None else now_ns
        kind = type(record).__name__.lower()
        if self.store.get(record.state_id) is None:
            raise PolicyError(f"{kind} names state {record.state_id}, which is not in the store")
        copy = self._stored_copy(record)
        if copy is not None:
            raise PolicyError(f"this {kind} (record_id {record.record_id}) is already logged at leaf {copy}; a signed "
                              f"record counts once, so applying it again would change nothing; sign a new record instead")
        target = None
        if isinstance(record, Override):
            if record.expires_ns - record.issued_ns > self.config.max_override_ns:
                raise PolicyError(f"override lasts {record.expires_ns - record.issued_ns} ns, over the allowed "
                                  f"{self.config.max_override_ns} ns; issue a shorter one")
            if now >= record.expires_ns:
                raise PolicyError(f"override expired at {record.expires_ns} (now {now}); issue a new one")
        elif record.override_index is not None:
            target = record.override_index
            hits = [r for r in self.store.records_for(record.state_id) if r.leaf_index == target and r.kind == "override"]
            if not hits:
                raise PolicyError(f"revocation names override leaf {target}, which is not an override of state {record.state_id}")
        entry = record_entry(note, record)
        index = self.log.add(entry).result()
        return self._store_record(index, record, note)

    def _store_record(self, index: int, record: Override | Revocation, note: str) -> PolicyRecord:
        # The leaf is already in the ledger, which cannot take it back; the gate reads records only from
        # the store, so a failed insert must say where the record is and how to store it from the log.
        kind = "override" if isinstance(record, Override) else "revocation"
        stored = PolicyRecord(index, kind, record.state_id, getattr(record, "override_index", None), note)
        try:
            self.store.insert_record(stored)
        except StateError as e:
            raise PolicyError(f"the {kind} was appended to the ledger at leaf {index}, but the state store refused "
                              f"to store it ({e}), so it does not count yet; once the store accepts writes again, "
                              f"call Pacemaker.recover_record({index}) (or PromotionGate.recover_record) to store it "
                              f"from the ledger (do not apply the note again: that would log it twice)") from e
        return stored

    def recover_record(self, leaf_index: int) -> PolicyRecord:
        """Store the override/revocation logged at `leaf_index` (after a failed apply); PolicyError if it is not one."""
        if not is_int(leaf_index) or leaf_index < 0:
            raise PolicyError(f"a leaf index is a non-negative integer, got {leaf_index!r}")
        try:
            data = self.log.entry(leaf_index)
        except FieldprintError as e:
            raise PolicyError(f"cannot read leaf {leaf_index} from the ledger: {e}") from None
        try:
            logged = decode_entry(data)
        except EntryError as e:
            raise PolicyError(f"leaf {leaf_index} is not a valid ledger entry: {e}") from None
        kind, note = logged.get("kind"), logged.get("note")
        if kind not in ("override", "revocation") or not isinstance(note, str):
            raise PolicyError(f"leaf {leaf_index} is a {kind!r} entry, not an override or revocation; "
                              f"check the leaf index that the failed apply reported")
        try:
            record = open_record(note, list(self.config.override_keys))
        except PolicyError as e:
            raise PolicyError(f"the {kind} at leaf {leaf_index} is not signed by a configured override key: {e}") from None
        if record_entry(note, record) != bytes(data):
            raise PolicyError(f"leaf {leaf_index} has entry kind {kind!r} but holds a {type(record).__name__.lower()} "
                              f"note; refusing a record whose entry kind and note disagree")
        if self.store.get(record.state_id) is None:
            raise PolicyError(f"the {kind} at leaf {leaf_index} names state {record.state_id}, which is not in the store")
        existing = self.store.record_at(leaf_index)
        if existing is not None:
            if existing.note == note and existing.kind == kind:
                return existing  # already stored: recovering twice is harmless
            raise PolicyError(f"the store already holds a different record at leaf {leaf_index}; it does not match "
                              f"the ledger and never counts (the gate re-verifies), delete it and recover again")
        return self._store_record(leaf_index, record, note)
