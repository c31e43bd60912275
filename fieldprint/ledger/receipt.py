"""Offline proof bundles: an entry, its inclusion proof and the signed checkpoint it is proven against.

A bundle is self-contained JSON: anyone holding the log's verifier key can check it with no access
to the log (`verify_bundle`). Receipts of generations are lists of such bundles plus what was produced.
"""

from __future__ import annotations

import base64

from fieldprint.errors import LogError, ProofError
from fieldprint.ledger.merkle import leaf_hash, verify_inclusion
from fieldprint.ledger.note import Checkpoint

BUNDLE_FORMAT = "fieldprint-inclusion-v1"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def covering_checkpoint(log, index: int) -> Checkpoint:
    """The latest signed checkpoint that covers leaf `index`, signing a fresh one if none does."""
    if not 0 <= index < log.size:
        raise LogError(f"entry {index} does not exist; the log has {log.size} entries")
    cp = log.latest_checkpoint()
    return cp if cp is not None and cp.size > index else log.checkpoint()


def inclusion_bundle(log, index: int, checkpoint: Checkpoint | None = None) -> dict:
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


def verify_bundle(bundle: dict, verifier_key: str) -> Checkpoint:
    """Check an inclusion proof bundle offline; return its checkpoint, raise ProofError/NoteError."""
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
    cp = Checkpoint.open(note, [verifier_key])
    if cp.size != size:
        raise ProofError(f"bundle claims size {size} but its checkpoint is for size {cp.size}")
    if entry is not None and leaf_hash(entry) != lh:
        raise ProofError("the bundle's entry does not hash to its leaf hash")
    verify_inclusion(lh, index, size, proof, cp.root_hash)
    return cp
