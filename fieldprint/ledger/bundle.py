"""Offline proof bundles: an entry's inclusion proof against a signed checkpoint, or the consistency
proof between two signed checkpoints.

A bundle is self-contained JSON: anyone holding the log's verifier key can check it with no access
to the log (`verify_bundle`, `verify_consistency_bundle`); each checkpoint must name the expected
origin (by default the key's name). Receipts of generations are lists of such bundles plus what was produced.
"""

from __future__ import annotations

import base64

from fieldprint.canon import is_int
from fieldprint.errors import LogError, ProofError
from fieldprint.ledger.merkle import leaf_hash, verify_consistency, verify_inclusion
from fieldprint.ledger.note import Checkpoint, Verifier
from fieldprint.ledger.reader import LogReader

BUNDLE_FORMAT = "fieldprint-inclusion-v1"
CONSISTENCY_FORMAT = "fieldprint-consistency-v1"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def covering_checkpoint(log: LogReader, index: int) -> Checkpoint:
    """The latest stored checkpoint that covers leaf `index`; a log that can sign signs one if none does."""
    if not 0 <= index < log.size:
        raise LogError(f"entry {index} does not exist; the log has {log.size} entries")
    cp = log.latest_checkpoint()
    if cp is not None and cp.size > index:
        return cp
    sign = getattr(log, "checkpoint", None)  # a TransparencyLog signs; a read-only LogReader cannot
    if sign is None:
        raise LogError(f"no signed checkpoint covers entry {index} yet; sign one with the log's key "
                       f"(`fieldprint ledger checkpoint`), then prove it")
    return sign()


def inclusion_bundle(log: LogReader, index: int, checkpoint: Checkpoint | None = None) -> dict:
    """A JSON-ready bundle proving that entry `index` is in the tree of `checkpoint`."""
    cp = checkpoint or covering_checkpoint(log, index)
    if not 0 <= index < cp.size:
        raise LogError(f"entry {index} is not covered by the checkpoint of size {cp.size}")
    entry = log.entry(index)
    return {
        "format": BUNDLE_FORMAT,
        "index": index,
        "size": cp.size,
        "leaf_hash": _b64(leaf_hash(entry)),
        "entry": _b64(entry),
        "proof": [_b64(h) for h in log.inclusion_proof(index, cp.size)],
        "checkpoint": cp.note,
    }


def consistency_bundle(log: LogReader, size1: int, size2: int) -> dict:
    """A JSON-ready bundle proving that the log's signed tree of size1 is a prefix of its tree of size2."""
    if not (is_int(size1) and is_int(size2) and 0 <= size1 <= size2 <= log.size):
        raise LogError(f"consistency needs 0 <= SIZE1 <= SIZE2 <= {log.size} (the log's size), got {size1!r} and {size2!r}")
    cps = [log.checkpoint_at(size1), log.checkpoint_at(size2)]
    for size, cp in zip((size1, size2), cps):
        if cp is None:
            latest = log.latest_checkpoint()
            raise LogError(f"no signed checkpoint is stored for size {size} (the latest is for "
                           f"{latest.size if latest else 'none'}); prove between sizes the log has signed")
    return {
        "format": CONSISTENCY_FORMAT,
        "size1": size1,
        "size2": size2,
        "proof": [_b64(h) for h in log.consistency_proof(size1, size2)],
        "checkpoint1": cps[0].note,
        "checkpoint2": cps[1].note,
    }


def _expected_origin(verifier_key: str, origin: str | None) -> str:
    # A C2SP log's key name is its origin: without an explicit origin, the key's own name is expected.
    return Verifier.parse(verifier_key).name if origin is None else origin


def verify_bundle(bundle: dict, verifier_key: str, *, origin: str | None = None) -> Checkpoint:
    """Check an inclusion proof bundle offline; return its checkpoint, raise ProofError/NoteError.

    The checkpoint must name `origin` (None: the verifier key's name, which is a C2SP log's origin).
    """
    origin = _expected_origin(verifier_key, origin)
    try:
        if bundle.get("format") != BUNDLE_FORMAT:
            raise ProofError(f"bundle format is {bundle.get('format')!r}, expected {BUNDLE_FORMAT!r}")
        index, size = bundle["index"], bundle["size"]
        lh = base64.b64decode(bundle["leaf_hash"], validate=True)
        proof = [base64.b64decode(p, validate=True) for p in bundle["proof"]]
        note = bundle["checkpoint"]
        entry = base64.b64decode(bundle["entry"], validate=True) if "entry" in bundle else None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ProofError(f"malformed proof bundle ({exc!r}); produce one with `fieldprint ledger prove`") from None
    cp = Checkpoint.open(note, [verifier_key], origin=origin)
    if cp.size != size:
        raise ProofError(f"bundle claims size {size} but its checkpoint is for size {cp.size}")
    if entry is not None and leaf_hash(entry) != lh:
        raise ProofError("the bundle's entry does not hash to its leaf hash")
    verify_inclusion(lh, index, size, proof, cp.root_hash)
    return cp


def verify_consistency_bundle(bundle: dict, verifier_key: str, *, origin: str | None = None) -> tuple[Checkpoint, Checkpoint]:
    """Check a consistency bundle offline; return its two checkpoints, raise ProofError/NoteError."""
    origin = _expected_origin(verifier_key, origin)
    try:
        if bundle.get("format") != CONSISTENCY_FORMAT:
            raise ProofError(f"bundle format is {bundle.get('format')!r}, expected {CONSISTENCY_FORMAT!r}")
        size1, size2 = bundle["size1"], bundle["size2"]
        proof = [base64.b64decode(p, validate=True) for p in bundle["proof"]]
        notes = bundle["checkpoint1"], bundle["checkpoint2"]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ProofError(f"malformed consistency bundle ({exc!r}); produce one with `fieldprint ledger consistency`") from None
    cp1, cp2 = (Checkpoint.open(n, [verifier_key], origin=origin) for n in notes)
    if (cp1.size, cp2.size) != (size1, size2):
        raise ProofError(f"bundle claims sizes {size1} and {size2} but its checkpoints are for {cp1.size} and {cp2.size}")
    verify_consistency(size1, size2, proof, cp1.root_hash, cp2.root_hash)
    return cp1, cp2
