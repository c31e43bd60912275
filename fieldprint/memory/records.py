"""Signed override and revocation records: their fields, their signed text and their ledger leaf.

An override is the promotion gate's only bypass (promote or demote one state until it expires); a
revocation withdraws a state's eligibility for good, or one override. Both are C2SP signed notes (so
any note verifier can check them) whose text is a header line and one canonical JSON line; the ledger
leaf is that note wrapped in an entry of kind `override` or `revocation` (docs/formats.md, "Overrides
and revocations").

Each record carries a random `record_id` inside its signed body, so that a copy of a record (a
replay, which needs no key) can be recognised and counted once; the gate (policy.py) does so.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field

from fieldprint.canon import canonical_json, check_label, is_int, parse_digest
from fieldprint.errors import EntryError, NoteError, PolicyError
from fieldprint.ledger.entry import encode_entry
from fieldprint.ledger.note import open_note, sign_note

OVERRIDE_HEADER = "fieldprint/override/v2"
REVOCATION_HEADER = "fieldprint/revocation/v2"
_RECORD_ID_RE = re.compile(r"^[0-9a-f]{32}$")
ACTIONS = ("promote", "demote")
MAX_REASON_CHARS = 1000


def utc_text(ns: int) -> str:
    """A record's time (ns since the epoch) as ISO 8601 UTC to the second, for messages."""
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

