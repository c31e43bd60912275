"""The promotion gate: which memory states become anchors, and why.

A state is an anchor only when
  (1) its ledger entry verifies: the entry rebuilt from the stored state is included, by a Merkle
      proof, in a checkpoint signed by a configured log key, and the stored fields still hash to
      the state id; and
  (2) its type is promotable and (3) it is untainted -- or (4) an override allows it: a signed,
      logged, unexpired record by a configured override key.
A valid revocation of the state overrides everything; a revoked override no longer counts; among
active overrides the latest in the ledger wins. Overrides never excuse (1): provenance is mandatory.

Overrides and revocations are C2SP signed notes (so any note verifier can check them) whose text is
a header line and one canonical JSON line; the ledger leaf is that note wrapped in an entry of kind
`override` or `revocation` (docs/formats.md, "Overrides and revocations"). Nothing here trusts the
state store: every decision re-verifies signatures, inclusion and time windows from scratch.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from fieldprint.canon import canonical_json, check_label, is_int, parse_digest
from fieldprint.errors import (
    EntryError,
    FieldprintError,
    NoteError,
    PolicyError,
    StateError,
)
from fieldprint.ledger.entry import decode_entry, encode_entry
from fieldprint.ledger.merkle import leaf_hash, verify_inclusion
from fieldprint.ledger.note import Checkpoint, Verifier, open_note, sign_note
from fieldprint.memory.state import STATE_TYPES, State
from fieldprint.memory.store import PolicyRecord, StateStore

if TYPE_CHECKING:
    from fieldprint.ledger.log import TransparencyLog

OVERRIDE_HEADER = "fieldprint/override/v1"
REVOCATION_HEADER = "fieldprint/revocation/v1"
ACTIONS = ("promote", "demote")
MAX_REASON_CHARS = 1000
DEFAULT_MAX_OVERRIDE_NS = 30 * 24 * 3600 * 10**9  # an override is a temporary exception, not a new rule
DEFAULT_PROMOTABLE = frozenset(t for t, rule in STATE_TYPES.items() if rule.promotable)


def _utc(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns // 10**9))


def _check_common(state_id: object, who: object, reason: object, issued_ns: object) -> None:
    try:
        parse_digest(state_id)
        check_label(who, "who")
    except EntryError as e:
        raise PolicyError(str(e)) from None
    if not isinstance(reason, str) or not 1 <= len(reason) <= MAX_REASON_CHARS:
        raise PolicyError(f"reason must be a non-empty string of at most {MAX_REASON_CHARS} characters")
    try:
        reason.encode("utf-8")
    except UnicodeEncodeError:
        raise PolicyError("reason is not valid Unicode text (lone surrogates)") from None
    if not is_int(issued_ns) or not 0 <= issued_ns < 2**63:
        raise PolicyError(f"issued_ns must be a non-negative 64-bit integer, got {issued_ns!r}")


@dataclass(frozen=True, slots=True)
class Override:
    """A signed exception to the default rule: promote or demote one state until `expires_ns`."""

    state_id: str
    action: str  # "promote" | "demote"
    who: str
    reason: str
    issued_ns: int
    expires_ns: int

    def __post_init__(self) -> None:
        _check_common(self.state_id, self.who, self.reason, self.issued_ns)
        if self.action not in ACTIONS:
            raise PolicyError(f"override action {self.action!r} is not one of {ACTIONS}")
        if not is_int(self.expires_ns) or not self.issued_ns < self.expires_ns < 2**63:
            raise PolicyError(f"expires_ns must be an integer after issued_ns ({self.issued_ns}), got {self.expires_ns!r}")

    def text(self) -> str:
        """The note text that gets signed: header line, canonical JSON line."""
        return f"{OVERRIDE_HEADER}\n{canonical_json(asdict(self)).decode()}\n"


@dataclass(frozen=True, slots=True)
class Revocation:
    """A signed, permanent withdrawal: of a state's eligibility (override_index None) or of one override."""

    state_id: str
    who: str
    reason: str
    issued_ns: int
    override_index: int | None  # leaf index of the override it withdraws; None revokes the state itself

    def __post_init__(self) -> None:
        _check_common(self.state_id, self.who, self.reason, self.issued_ns)
        oi = self.override_index
        if oi is not None and (not is_int(oi) or not 0 <= oi < 2**63):
            raise PolicyError(f"override_index must be a leaf index or null, got {oi!r}")

    def text(self) -> str:
        """The note text that gets signed: header line, canonical JSON line."""
        return f"{REVOCATION_HEADER}\n{canonical_json(asdict(self)).decode()}\n"


def sign_record(record: Override | Revocation, signer_key: str) -> str:
    """Sign an override or revocation with an Ed25519 signer key text; return the signed note."""
    try:
        return sign_note(record.text(), signer_key)
    except NoteError as e:
        raise PolicyError(f"cannot sign: {e}") from None


def parse_record_text(text: str) -> Override | Revocation:
    """Parse verified note text into an Override or Revocation; PolicyError if it is not exactly one."""
    lines = text.split("\n")
    if len(lines) != 3 or lines[2] != "" or lines[0] not in (OVERRIDE_HEADER, REVOCATION_HEADER):
        raise PolicyError(f"note text is not a '{OVERRIDE_HEADER}' or '{REVOCATION_HEADER}' record (header line + one JSON line)")
    try:
        fields = json.loads(lines[1])
    except json.JSONDecodeError as e:
        raise PolicyError(f"record body is not JSON: {e}") from None
    cls = Override if lines[0] == OVERRIDE_HEADER else Revocation
    names = set(cls.__dataclass_fields__)
    if not isinstance(fields, dict) or set(fields) != names:
        raise PolicyError(f"{lines[0]} record must have exactly the fields {sorted(names)}")
    record = cls(**fields)
    if record.text() != text:
        raise PolicyError("record body is not in canonical form (key order, spacing or escaping differs)")
    return record


def open_record(note: str, verifier_keys: list[str]) -> Override | Revocation:
    """Verify a signed override/revocation note against `verifier_keys`, then parse it."""
    try:
        text = open_note(note, verifier_keys)
    except NoteError as e:
        raise PolicyError(f"override/revocation signature rejected: {e}") from None
    return parse_record_text(text)


def record_entry(note: str, record: Override | Revocation) -> bytes:
    """The ledger leaf for a signed record: an `override` or `revocation` entry holding the note."""
    kind = "override" if isinstance(record, Override) else "revocation"
    try:
        return encode_entry(kind, {"note": note})
    except EntryError as e:
        raise PolicyError(f"cannot log this record: {e}") from None


@dataclass(slots=True)
class GateConfig:
    """Who the gate believes: checkpoint keys, override keys (C2SP verifier key texts), and the rules."""

    log_keys: list[str]
    override_keys: list[str]
    promotable_types: frozenset[str] = DEFAULT_PROMOTABLE
    max_override_ns: int = DEFAULT_MAX_OVERRIDE_NS

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
        if not isinstance(self.max_override_ns, int) or self.max_override_ns <= 0:
            raise PolicyError("max_override_ns must be a positive integer")


@dataclass(frozen=True, slots=True)
class Check:
    """One step of a decision: its name (ledger, type, taint, override, revocation), outcome, detail."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Decision:
    """Why a state is or is not an anchor; `sentence` says it in one line for people."""

    state_id: str
    anchor: bool
    verified: bool  # check (1): the ledger entry verifies against a signed checkpoint
    eligible: bool  # the policy part, (2)+(3) or (4), ignoring verification
    basis: str  # "default" (type + taint), "override", "revocation" or "unknown"
    record_index: int | None  # leaf index of the override or revocation that decided, if any
    checks: tuple[Check, ...]
    rejected: tuple[Check, ...] = field(default=())  # override/revocation records that did not count, and why
    sentence: str = ""

    def to_dict(self) -> dict:
        """A JSON-ready form of the decision."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class _Valid:
    index: int
    record: Override | Revocation


class PromotionGate:
    """Decides, explains and records promotion: verify -> revocations -> overrides -> type and taint."""

    def __init__(self, store: StateStore, log: TransparencyLog, config: GateConfig, clock: Callable[[], int] = time.time_ns) -> None:
        self.store, self.log, self.config, self.clock = store, log, config, clock

    def checkpoint(self) -> Checkpoint:
        """A checkpoint covering the whole log, its signature verified against the configured log keys."""
        try:
            latest = self.log.latest_checkpoint()
            if latest is None or latest.size < self.log.size:
                latest = self.log.checkpoint()  # the stored one is stale: have the log sign a fresh one
            return Checkpoint.open(latest.note, list(self.config.log_keys))
        except NoteError as e:
            raise PolicyError(f"the log's checkpoint is not signed by a configured log key: {e}") from None

    def eligible_by_default(self, state: State) -> bool:
        """Rules (2) and (3) alone: a promotable type with no untrusted source."""
        return state.state_type in self.config.promotable_types and not state.label.tainted

    def _included(self, entry: bytes, index: int, cp: Checkpoint) -> str | None:
        # None when the entry is leaf `index` of the checkpointed tree, else why not.
        if index >= cp.size:
            return f"leaf {index} is not yet covered by the signed checkpoint (size {cp.size}); wait for the next checkpoint"
        try:
            proof = self.log.inclusion_proof(index, cp.size)
            verify_inclusion(leaf_hash(entry), index, cp.size, proof, cp.root_hash)
        except FieldprintError as e:
            return f"inclusion proof for leaf {index} in checkpoint size {cp.size} fails: {e}"
        return None

    def _verify_state(self, state: State, cp: Checkpoint | None, cp_error: str | None) -> Check:
        if state.leaf_index is None:
            return Check("ledger", False, "the state has no leaf index: it was never committed to the ledger")
        if cp is None:
            return Check("ledger", False, cp_error or "no signed checkpoint")
        try:
            entry = state.entry().encode()
        except EntryError as e:
            return Check("ledger", False, f"the stored state does not form a valid ledger entry: {e}")
        why = self._included(entry, state.leaf_index, cp)
        if why is not None:
            return Check("ledger", False, self._diagnose(state, entry, why))
        # The id also covers what the entry does not carry (creator, trusted sources).
        if state.compute_id() != state.state_id:
            return Check("ledger", False, "the stored fields no longer hash to the state id: the stored state was altered")
        return Check("ledger", True, f"leaf {state.leaf_index} included in the checkpoint of size {cp.size} signed by the log key")

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
        if checkpoint is not None:
            return checkpoint, None
        try:
            return self.checkpoint(), None
        except FieldprintError as e:
            return None, str(e)

    def verify(self, state: State, checkpoint: Checkpoint | None = None) -> Check:
        """Check (1) alone: does this stored state match its ledger entry under a signed checkpoint?"""
        return self._verify_state(state, *self._checkpoint_or_why(checkpoint))

    def _records(self, state_id: str, cp: Checkpoint | None, now: int) -> tuple[list[_Valid], list[Check]]:
        valid: list[_Valid] = []
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
            why = self._included(record_entry(rec.note, record), rec.leaf_index, cp) if cp else "no signed checkpoint"
            if why is not None:
                rejected.append(Check(rec.kind, False, f"{where} is not verifiably in the ledger: {why}"))
                continue
            if isinstance(record, Override):
                if record.expires_ns - record.issued_ns > self.config.max_override_ns:
                    rejected.append(Check("override", False, f"{where} lasts longer than the allowed {self.config.max_override_ns} ns"))
                    continue
                if not record.issued_ns <= now < record.expires_ns:
                    state = "expired" if now >= record.expires_ns else "not yet valid"
                    rejected.append(Check("override", False, f"{where} by {record.who} is {state} (valid {_utc(record.issued_ns)} to {_utc(record.expires_ns)}, now {_utc(now)})"))
                    continue
            valid.append(_Valid(rec.leaf_index, record))
        return valid, rejected

    def explain(self, state_id: str, *, checkpoint: Checkpoint | None = None, now_ns: int | None = None) -> Decision:
        """Decide whether `state_id` is an anchor now, with every check and a one-line reason."""
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
        valid, rejected = self._records(state_id, cp, now)
        revoked_overrides = {v.record.override_index for v in valid if isinstance(v.record, Revocation)}
        revocations = [v for v in valid if isinstance(v.record, Revocation) and v.record.override_index is None]
        overrides = [v for v in valid if isinstance(v.record, Override) and v.index not in revoked_overrides]
        for v in valid:
            if isinstance(v.record, Override) and v.index in revoked_overrides:
                rejected.append(Check("override", False, f"override at leaf {v.index} was withdrawn by a revocation"))
        if revocations:
            deciding = revocations[0]
            eligible, basis = False, "revocation"
            checks.append(Check("revocation", False, f"revoked by {deciding.record.who} at leaf {deciding.index}: {deciding.record.reason}"))
        elif overrides:
            deciding = max(overrides, key=lambda v: v.index)
            eligible, basis = deciding.record.action == "promote", "override"
            checks.append(Check("override", eligible, f"{deciding.record.action}d by {deciding.record.who} at leaf "
                                f"{deciding.index} until {_utc(deciding.record.expires_ns)}: {deciding.record.reason}"))
        else:
            deciding = None
            eligible, basis = type_ok and not state.label.tainted, "default"
        anchor = ledger.ok and eligible
        sentence = self._sentence(state, anchor, ledger, checks, basis)
        return Decision(state_id, anchor, ledger.ok, eligible, basis, deciding.index if deciding else None,
                        tuple(checks), tuple(rejected), sentence)

    @staticmethod
    def _sentence(state: State, anchor: bool, ledger: Check, checks: list[Check], basis: str) -> str:
        what = f"this {state.state_type}"
        if not ledger.ok:
            return f"not an anchor: {what} does not verify against the ledger ({ledger.detail})"
        last = checks[-1]
        if basis == "revocation":
            return f"not an anchor: {what} is {last.detail}"
        if basis == "override":
            return f"{'an anchor' if anchor else 'not an anchor'} by override: {what} was {last.detail}; it verifies ({ledger.detail})"
        failed = [c.detail for c in checks[1:3] if not c.ok]
        if failed:
            return f"not an anchor: {what} verifies, but {' and '.join(failed)}; only a signed override could promote it"
        return f"an anchor: {what} verifies ({ledger.detail}), its type is promotable and it is untainted"

    def is_anchor(self, state_id: str) -> bool:
        """True when `state_id` is an anchor now (see explain for why)."""
        return self.explain(state_id).anchor

    def apply(self, note: str, *, now_ns: int | None = None) -> PolicyRecord:
        """Check a signed override/revocation, append it to the ledger, store it; PolicyError if refused."""
        if not isinstance(note, str):
            raise PolicyError(f"an override or revocation is a signed note (str), got {type(note).__name__}")
        record = open_record(note, list(self.config.override_keys))
        now = self.clock() if now_ns is None else now_ns
        if self.store.get(record.state_id) is None:
            raise PolicyError(f"{type(record).__name__.lower()} names state {record.state_id}, which is not in the store")
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
        except sqlite3.Error as e:
            raise PolicyError(f"the {kind} was appended to the ledger at leaf {index}, but the state store refused "
                              f"to store it ({e}), so it does not count yet; once the store accepts writes again, "
                              f"call Pacemaker.recover_record({index}) (or PromotionGate.recover_record) to store it from the ledger (do not apply the note "
                              f"again: that would log it twice)") from e
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
