"""The promotion gate: which memory states become anchors, and why.

A state is an anchor only when
  (1) its ledger entry verifies: the entry rebuilt from the stored state is included, by a Merkle
      proof, in a checkpoint signed by a configured log key, and the stored fields still hash to
      the state id; and
  (2) its type is promotable and (3) it is untainted -- or (4) an override allows it: a signed,
      logged, unexpired record by a configured override key.
A valid revocation of the state overrides everything; a revoked override no longer counts; among
active overrides the latest issued wins (ties: the later leaf). Overrides never excuse (1):
provenance is mandatory.

Each record carries a random `record_id` inside its signed body, and a record counts once: apply()
refuses a record already stored, and a copy logged again (a replay, which needs no key) is listed as
rejected. Precedence comes from the signed `issued_ns`, not from where a copy sits in the ledger, so
no replay, in any order, changes a decision.

The gate only reads: it verifies against the log's latest stored checkpoint and never asks the log
to sign one (the log signs on its own schedule or on an explicit log.checkpoint()). States and
records not yet covered by that checkpoint are simply not verified yet.

Overrides and revocations are C2SP signed notes (so any note verifier can check them) whose text is
a header line and one canonical JSON line; the ledger leaf is that note wrapped in an entry of kind
`override` or `revocation` (docs/formats.md, "Overrides and revocations"). Nothing here trusts the
state store: every decision re-verifies signatures, inclusion and time windows from scratch.
"""

from __future__ import annotations

import json
import re
import secrets
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

OVERRIDE_HEADER = "fieldprint/override/v2"
REVOCATION_HEADER = "fieldprint/revocation/v2"
_RECORD_ID_RE = re.compile(r"^[0-9a-f]{32}$")
ACTIONS = ("promote", "demote")
MAX_REASON_CHARS = 1000
DEFAULT_MAX_OVERRIDE_NS = 30 * 24 * 3600 * 10**9  # an override is a temporary exception, not a new rule
DEFAULT_PROMOTABLE = frozenset(t for t, rule in STATE_TYPES.items() if rule.promotable)


def _utc(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns // 10**9))


def new_record_id() -> str:
    """A fresh record id: 128 random bits as 32 lowercase hex digits (makes every signed record unique)."""
    return secrets.token_hex(16)


def _check_common(state_id: object, who: object, reason: object, issued_ns: object, record_id: object) -> None:
    if not isinstance(record_id, str) or not _RECORD_ID_RE.match(record_id):
        raise PolicyError(f"record_id must be 32 lowercase hex digits (new_record_id()), got {record_id!r}")
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
    record_id: str = field(default_factory=new_record_id)  # unique per record: a copy is a replay

    def __post_init__(self) -> None:
        _check_common(self.state_id, self.who, self.reason, self.issued_ns, self.record_id)
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
    record_id: str = field(default_factory=new_record_id)  # unique per record: a copy is a replay

    def __post_init__(self) -> None:
        _check_common(self.state_id, self.who, self.reason, self.issued_ns, self.record_id)
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


_SIGNS = "the log signs one on its schedule or on log.checkpoint()"


class PromotionGate:
    """Decides, explains and records promotion: verify -> revocations -> overrides -> type and taint."""

    def __init__(self, store: StateStore, log: TransparencyLog, config: GateConfig,
                 clock: Callable[[], int] = time.time_ns) -> None:
        if config.log_origin is not None and config.log_origin != log.origin:
            raise PolicyError(f"the gate is configured for the log {config.log_origin!r} but was given the log "
                              f"{log.origin!r}; give it that log or change GateConfig.log_origin")
        self.store, self.log, self.config, self.clock = store, log, config, clock
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
                 now: int) -> tuple[list[_Valid], dict[int, str], list[Check]]:
        # Returns the records that count, the record id at each verified leaf (copies too), and the rejected.
        valid: list[_Valid] = []
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
                    window = f"valid {_utc(record.issued_ns)} to {_utc(record.expires_ns)}, now {_utc(now)}"
                    rejected.append(Check("override", False, f"{where} by {record.who} is {state} ({window})"))
                    continue
            valid.append(_Valid(rec.leaf_index, record))
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

        eligible, basis, deciding, check, rejected = self._policy(state, *self._records(state_id, included, now))
        if check is not None:
            checks.append(check)
        anchor = ledger.ok and eligible
        sentence = self._sentence(state, anchor, ledger, checks, basis)
        return Decision(state_id, anchor, ledger.ok, eligible, basis, deciding.index if deciding else None,
                        tuple(checks), tuple(rejected), sentence)

    def eligible_as_writer(self, state_id: str, now_ns: int | None = None) -> bool:
        """The policy part of a decision with records checked against the log's own leaves (for the index hint).

        Right after apply() a record is in the log but usually not yet under a signed checkpoint; the
        vector index's `promotable` flag should already reflect it. Anchor decisions never use this.
        """
        state = self.store.get(state_id)
        if state is None:
            return False
        now = self.clock() if now_ns is None else now_ns
        return self._policy(state, *self._records(state_id, self._in_log, now))[0]

    def _policy(self, state: State, valid: list[_Valid], ids_at: dict[int, str],
                rejected: list[Check]) -> tuple[bool, str, _Valid | None, Check | None, list[Check]]:
        # (eligible, basis, deciding record, its check, rejected records) from the records that count.
        type_ok = state.state_type in self.config.promotable_types
        # A revocation withdraws the override record at its target leaf, and with it every copy of that record.
        withdrawn = {ids_at[v.record.override_index] for v in valid
                     if isinstance(v.record, Revocation) and v.record.override_index in ids_at}
        revocations = [v for v in valid if isinstance(v.record, Revocation) and v.record.override_index is None]
        overrides = [v for v in valid if isinstance(v.record, Override) and v.record.record_id not in withdrawn]
        for v in valid:
            if isinstance(v.record, Override) and v.record.record_id in withdrawn:
                rejected.append(Check("override", False, f"override at leaf {v.index} was withdrawn by a revocation"))
        if revocations:
            v = revocations[0]
            return False, "revocation", v, Check("revocation", False, f"revoked by {v.record.who} at leaf {v.index}: "
                                                 f"{v.record.reason}"), rejected
        if overrides:
            # The latest issued decides (signed time, so a copy's position in the ledger cannot matter).
            v = max(overrides, key=lambda v: (v.record.issued_ns, v.index))
            ok = v.record.action == "promote"
            return ok, "override", v, Check("override", ok, f"{v.record.action}d by {v.record.who} at leaf {v.index} "
                                            f"until {_utc(v.record.expires_ns)}: {v.record.reason}"), rejected
        return type_ok and not state.label.tainted, "default", None, None, rejected

    @staticmethod
    def _sentence(state: State, anchor: bool, ledger: Check, checks: list[Check], basis: str) -> str:
        what = f"this {state.state_type}"
        if not ledger.ok:
            return f"not an anchor: {what} does not verify against the ledger ({ledger.detail})"
        last = checks[-1]
        if basis == "revocation":
            return f"not an anchor: {what} is {last.detail}"
        if basis == "override":
            verdict = "an anchor" if anchor else "not an anchor"
            return f"{verdict} by override: {what} was {last.detail}; it verifies ({ledger.detail})"
        failed = [c.detail for c in checks[1:3] if not c.ok]
        if failed:
            return f"not an anchor: {what} verifies, but {' and '.join(failed)}; only a signed override could promote it"
        return f"an anchor: {what} verifies ({ledger.detail}), its type is promotable and it is untainted"

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
