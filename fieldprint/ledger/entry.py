"""Versioned, deterministic leaf entries: the small canonical records the transparency log holds.

An entry is canonical JSON (docs/formats.md): UTF-8, keys sorted, no insignificant whitespace,
no floats, byte strings as lowercase hex inside algorithm-tagged digests ("blake3:<hex>").
Decoding re-encodes and demands the same bytes, so one logical record has exactly one encoding
and its leaf hash is reproducible by any verifier in any language.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from fieldprint.canon import canonical_json, check_label, is_int, parse_digest
from fieldprint.errors import EntryError

ENTRY_VERSION = 1
MAX_ENTRY_BYTES = 64 * 1024
ENTRY_KINDS = ("state", "override", "revocation", "generation", "rollback")  # each kind: a section of docs/formats.md


def _check_value(value: object, where: str) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise EntryError(f"{where}: integer {value} does not fit in 64 bits")
        return
    if isinstance(value, float):
        raise EntryError(f"{where}: floats are not allowed in entries (they have no canonical text form)")
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_value(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise EntryError(f"{where}: keys must be strings, got {key!r}")
            _check_value(item, f"{where}.{key}")
        return
    raise EntryError(f"{where}: {type(value).__name__} cannot be stored in an entry")


def encode_entry(kind: str, fields: dict) -> bytes:
    """Encode one leaf entry of `kind` canonically; raise EntryError if it is malformed or > 64 KiB."""
    if kind not in ENTRY_KINDS:
        raise EntryError(f"entry kind {kind!r} is not one of {ENTRY_KINDS}")
    if "v" in fields or "kind" in fields:
        raise EntryError("fields must not set 'v' or 'kind': encode_entry sets them")
    record = {"v": ENTRY_VERSION, "kind": kind, **fields}
    _check_value(record, "entry")
    data = canonical_json(record)
    if len(data) > MAX_ENTRY_BYTES:
        raise EntryError(f"entry is {len(data)} bytes; entries are small records of at most {MAX_ENTRY_BYTES} bytes, never tensors")
    return data


def decode_entry(data: bytes) -> dict:
    """Parse a leaf entry, rejecting anything that is not the canonical encoding of a known version."""
    if not isinstance(data, (bytes, bytearray)):
        raise EntryError(f"an entry is bytes, got {type(data).__name__}")
    if len(data) > MAX_ENTRY_BYTES:
        raise EntryError(f"entry is {len(data)} bytes, over the {MAX_ENTRY_BYTES}-byte limit")
    try:
        record = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EntryError(f"entry is not UTF-8 JSON: {e}") from None
    version = record.get("v") if isinstance(record, dict) else None
    if isinstance(version, bool) or version != ENTRY_VERSION:  # true == 1 in Python, not in the format
        raise EntryError(f"entry is not a version-{ENTRY_VERSION} record")
    fields = {k: v for k, v in record.items() if k not in ("v", "kind")}
    if encode_entry(record.get("kind"), fields) != bytes(data):
        raise EntryError("entry is not in canonical form (key order, whitespace or escaping differs)")
    return record


@dataclass(frozen=True, slots=True)
class StateEntry:
    """The ledger record of one memory state: what it is, what it hashes to, and where it came from."""

    state_id: str  # content address of the state, an algorithm-tagged digest
    state_type: str  # observation, tool_output, user_input, belief, instruction, summary
    digest: str  # algorithm-tagged digest of the stored content (DQP digest for tensors)
    profile: str | None  # algorithm-tagged digest of the DQP profile, None for text-only states
    parents: tuple[str, ...]  # state ids this state was derived from
    taint: tuple[str, ...]  # untrusted sources this state carries; empty means trusted
    session: str
    time_ns: int  # creation time, Unix nanoseconds

    def encode(self) -> bytes:
        """Canonical bytes of this entry (parents and taint sorted and de-duplicated)."""
        parse_digest(self.state_id)
        parse_digest(self.digest)
        if self.profile is not None:
            parse_digest(self.profile)
        for parent in self.parents:
            parse_digest(parent)
        for source in self.taint:
            check_label(source, "taint source")
        check_label(self.state_type, "state type")
        check_label(self.session, "session")
        if not is_int(self.time_ns) or self.time_ns < 0:
            raise EntryError(f"time_ns must be a non-negative integer, got {self.time_ns!r}")
        return encode_entry(
            "state",
            {
                "state_id": self.state_id,
                "type": self.state_type,
                "digest": self.digest,
                "profile": self.profile,
                "parents": sorted(set(self.parents)),
                "taint": sorted(set(self.taint)),
                "session": self.session,
                "time_ns": self.time_ns,
            },
        )

    @classmethod
    def decode(cls, data: bytes) -> StateEntry:
        """Parse and validate a state entry."""
        record = decode_entry(data)
        if record["kind"] != "state":
            raise EntryError(f"expected a state entry, got kind {record['kind']!r}")
        expected = {"v", "kind", "state_id", "type", "digest", "profile", "parents", "taint", "session", "time_ns"}
        if set(record) != expected:
            raise EntryError(f"state entry fields {sorted(record)} differ from {sorted(expected)}")
        entry = cls(
            state_id=record["state_id"],
            state_type=record["type"],
            digest=record["digest"],
            profile=record["profile"],
            parents=tuple(record["parents"]),
            taint=tuple(record["taint"]),
            session=record["session"],
            time_ns=record["time_ns"],
        )
        if entry.encode() != bytes(data):
            raise EntryError("state entry is not in canonical form")
        return entry
