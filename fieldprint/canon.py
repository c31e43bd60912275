"""Primitives every part shares: canonical JSON, algorithm-tagged digests, labels, integer checks.

The ledger's entries, DQP's profiles and headers, the memory's state ids and policy records and
the engine's receipts all hash or sign these encodings, so there is exactly one of each.
"""

from __future__ import annotations

import json
import re

from fieldprint.errors import EntryError, FieldprintError

DIGEST_ALGORITHMS = {"blake3": 32, "sha256": 32}
_DIGEST_RE = re.compile(r"^([a-z0-9]+):([0-9a-f]+)$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9._:@/+-]{1,128}$")
I64_MAX = 2**63


def canonical_json(record: object) -> bytes:
    """UTF-8 JSON with sorted keys and no insignificant whitespace: one logical record, one encoding."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def tag_digest(algorithm: str, digest: bytes) -> str:
    """Return the algorithm-tagged text form of a digest, e.g. 'blake3:9f86…'."""
    if DIGEST_ALGORITHMS.get(algorithm) != len(digest):
        raise EntryError(f"a {algorithm!r} digest must be {DIGEST_ALGORITHMS.get(algorithm)} bytes, got {len(digest)}")
    return f"{algorithm}:{digest.hex()}"


def parse_digest(tagged: str) -> tuple[str, bytes]:
    """Split an algorithm-tagged digest into (algorithm, raw bytes), checking its length."""
    m = _DIGEST_RE.match(tagged) if isinstance(tagged, str) else None
    if not m:
        raise EntryError(f"digest {tagged!r} is not of the form '<algorithm>:<lowercase hex>'")
    algorithm, hexdigest = m.groups()
    if algorithm not in DIGEST_ALGORITHMS:
        raise EntryError(f"digest algorithm {algorithm!r} is not one of {sorted(DIGEST_ALGORITHMS)}")
    raw = bytes.fromhex(hexdigest)
    if len(raw) != DIGEST_ALGORITHMS[algorithm]:
        raise EntryError(f"a {algorithm} digest must be {DIGEST_ALGORITHMS[algorithm]} bytes, got {len(raw)}")
    return algorithm, raw


def check_label(label: str, what: str) -> str:
    """Validate a short identifier (session, taint source, state type) used inside entries."""
    if not isinstance(label, str) or not _LABEL_RE.match(label):
        raise EntryError(f"{what} {label!r} must be 1-128 characters of letters, digits and ._:@/+-")
    return label


def is_int(value: object) -> bool:
    """An int that is not a bool (True == 1 in Python, but no format here accepts it as a number)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value: object, what: str, *, lo: int = 0, hi: int = I64_MAX,
              error: type[FieldprintError] = FieldprintError) -> int:
    """Return `value` if it is an int (not a bool) in [lo, hi); otherwise raise `error` saying so."""
    if not is_int(value) or not lo <= value < hi:
        raise error(f"{what} must be an integer in [{lo}, {hi}), got {value!r}")
    return value
