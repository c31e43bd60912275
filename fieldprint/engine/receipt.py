"""THE receipt: what conditioned one output, provable offline with nothing but the log's public key.

A receipt (docs/formats.md, "Receipts") carries a signed checkpoint and, each with its RFC 9162
inclusion proof against it: every anchor state's ledger entry (with the gate's decision, and the
override entry where an override promoted it), the anchor set's `anchor_kv` entry and manifest
(model, DQP profile, ordered state ids, Merkle root over every K/V block digest), and the
generation entry that binds model, anchor set, prompt digest, output digest and sampling
parameters. The generation entry is appended in the background; until it is sequenced and covered
by a checkpoint the receipt says `"bound": false` and `bind_receipt` adds its proof later.

`verify_receipt(receipt, log_key)` refuses, naming the first failure: a checkpoint not signed by
`log_key` or of another origin; any entry whose proof fails; an anchor dropped, added or reordered
against the manifest; an anchor state that is not promotable by type and taint and has no logged
override naming it; a manifest that is not the one logged; an output or prompt whose digest differs
from the generation entry. The log key always comes from the caller, never from the receipt.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass

from fieldprint.canon import canonical_json
from fieldprint.engine.anchors import ANCHOR_STATE_TYPE, manifest_digest, token_digest
from fieldprint.errors import (
    EntryError,
    NoteError,
    PolicyError,
    ProofError,
    ReceiptError,
)
from fieldprint.ledger import merkle
from fieldprint.ledger.entry import StateEntry, decode_entry, encode_entry
from fieldprint.ledger.note import Checkpoint, Verifier

RECEIPT_FORMAT = "fieldprint-receipt/1"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (TypeError, ValueError):
        raise ReceiptError(f"{what} is not base64") from None


def generation_entry(model_id: str, anchor_set, prompt_ids: list[int], output_ids: list[int], params, session: str | None) -> bytes:
    """The `generation` leaf: what one output was conditioned on, and its digest."""
    return encode_entry("generation", {
        "model_id": model_id,
        "anchor_set": anchor_set.manifest and manifest_digest(anchor_set.manifest) if anchor_set else None,
        "prompt": token_digest(prompt_ids), "prompt_tokens": len(prompt_ids),
        "output": token_digest(output_ids), "output_tokens": len(output_ids),
        "sampling": params.to_dict(), "session": session, "time_ns": time.time_ns(),
    })


def _proved(log, index: int, size: int, entry: bytes) -> dict:
    return {"index": index, "entry": _b64(entry), "proof": [_b64(h) for h in log.inclusion_proof(index, size)]}


def build_receipt(memory, lm, anchor_set, states: list, decisions: list[dict], prompt_ids: list[int],
                  output_ids: list[int], text: str, params, gen_entry: bytes) -> dict:
    """Assemble a receipt; every anchor-side proof is against the latest signed checkpoint."""
    log = memory.log
    cp = log.latest_checkpoint()
    anchors = None
    if anchor_set is not None:
        if cp is None or cp.size <= anchor_set.index:
            raise ReceiptError("no signed checkpoint covers the anchor set yet")
        by_id = {d["state_id"]: d for d in decisions}
        items = []
        for s in states:
            d = by_id[s.state_id]
            item = {**_proved(log, s.leaf_index, cp.size, log.entry(s.leaf_index)), "text": s.text,
                    "decision": {"basis": d["basis"], "why": d["why"]}, "override": None}
            if d["basis"] == "override":
                ri = d["record_index"]
                item["override"] = _proved(log, ri, cp.size, log.entry(ri))
            items.append(item)
        anchors = {"set": {"manifest": anchor_set.manifest, **_proved(log, anchor_set.index, cp.size, anchor_set.entry)},
                   "states": items}
    return {
        "format": RECEIPT_FORMAT,
        "checkpoint": cp.note if cp is not None else None,
        "model": {"id": lm.model_id, "tokenizer": lm.tokenizer_digest},
        "anchors": anchors,
        "prompt": {"tokens": len(prompt_ids), "digest": token_digest(prompt_ids), "token_ids": list(prompt_ids)},
        "output": {"tokens": len(output_ids), "digest": token_digest(output_ids), "token_ids": list(output_ids), "text": text},
        "sampling": params.to_dict(),
        "generation": {"entry": _b64(gen_entry), "bound": False, "index": None, "proof": None, "checkpoint": None},
    }


def bind_receipt(memory, receipt: dict, timeout: float = 30.0) -> dict:
    """Add the generation entry's inclusion proof (sequencing and checkpointing it if needed)."""
    future = receipt.pop("_future", None)
    log = memory.log
    entry = _unb64(receipt["generation"]["entry"], "generation entry")
    if future is None:
        raise ReceiptError("this receipt has no pending generation entry to bind (already bound, or loaded from a file)")
    index = future.result(timeout)
    cp = log.latest_checkpoint()
    if cp is None or cp.size <= index:
        cp = log.checkpoint()
    receipt["generation"] = {"entry": _b64(entry), "bound": True, "checkpoint": cp.note,
                             **{k: v for k, v in _proved(log, index, cp.size, entry).items() if k != "entry"}}
    return receipt


def dump_receipt(receipt: dict) -> str:
    """The receipt as JSON text (the pending-entry handle left out)."""
    return json.dumps({k: v for k, v in receipt.items() if not k.startswith("_")}, indent=2, ensure_ascii=False) + "\n"


@dataclass(slots=True)
class ReceiptReport:
    """What a receipt proved."""

    origin: str
    checkpoint_size: int
    anchors: list[str]  # state ids, in the anchor set's order
    bound: bool  # the generation entry itself is proved included
    model_id: str

    def summary(self) -> str:
        state = "bound: the log records this output" if self.bound else "NOT YET BOUND: the generation entry is not yet proved in the log"
        return (f"receipt OK against {self.origin} (checkpoint size {self.checkpoint_size}); model {self.model_id[:23]}…; "
                f"{len(self.anchors)} anchor state(s); {state}")


def _field(d: object, key: str, what: str):
    if not isinstance(d, dict) or key not in d:
        raise ReceiptError(f"receipt is malformed: {what} lacks {key!r}")
    return d[key]


def _check_included(item: dict, cp: Checkpoint, what: str) -> bytes:
    entry = _unb64(_field(item, "entry", what), f"{what} entry")
    index = _field(item, "index", what)
    proof = [_unb64(h, f"{what} proof") for h in _field(item, "proof", what) or []]
    try:
        merkle.verify_inclusion(merkle.leaf_hash(entry), index, cp.size, proof, cp.root_hash)
    except ProofError as e:
        raise ReceiptError(f"{what} (leaf {index}) is not included in the checkpoint: {e}") from None
    return entry


def _open_checkpoint(note: object, log_key: str, origin: str | None, what: str) -> Checkpoint:
    if not isinstance(note, str):
        raise ReceiptError(f"{what} has no signed checkpoint")
    try:
        expected = origin or Verifier.parse(log_key).name
        cp = Checkpoint.open(note, [log_key], origin=expected)
    except NoteError as e:
        raise ReceiptError(f"{what}: checkpoint refused: {e}") from None
    if cp.origin != expected:
        raise ReceiptError(f"{what}: checkpoint is for log {cp.origin!r}, expected {expected!r}")
    return cp


def _check_promoted(state: StateEntry, item: dict, cp: Checkpoint, override_keys: list[str] | None, i: int,
                    generated_ns: int) -> None:
    """An anchor must be promotable by type and untainted, or carry a logged override naming it."""
    from fieldprint.memory.policy import (
        DEFAULT_PROMOTABLE,
        Override,
        open_record,
        parse_record_text,
    )

    if state.state_type in DEFAULT_PROMOTABLE and not state.taint:
        return
    ov = item.get("override")
    if not ov:
        why = f"tainted by {list(state.taint)}" if state.taint else f"of type {state.state_type!r}"
        raise ReceiptError(f"anchor {i} ({state.state_id}) is {why} and no override promoted it")
    raw = _check_included(ov, cp, f"override of anchor {i}")
    try:
        record = decode_entry(raw)
        if record["kind"] != "override":
            raise ReceiptError(f"override of anchor {i}: leaf {ov['index']} is a {record['kind']!r} entry")
        note = record["note"]
        # The log only records overrides the gate verified; with the override keys, check the signature too.
        parsed = open_record(note, override_keys) if override_keys else parse_record_text(note.split("\n\n")[0] + "\n")
    except (EntryError, PolicyError, NoteError, KeyError, AttributeError) as e:
        raise ReceiptError(f"override of anchor {i} does not verify: {e}") from None
    if not isinstance(parsed, Override) or parsed.action != "promote" or parsed.state_id != state.state_id:
        raise ReceiptError(f"override of anchor {i} does not promote state {state.state_id}")
    if not parsed.issued_ns <= generated_ns < parsed.expires_ns:
        raise ReceiptError(f"override of anchor {i} was not in force when the output was generated")


def verify_receipt(receipt: object, log_key: str, *, origin: str | None = None,
                   override_keys: list[str] | None = None) -> ReceiptReport:
    """Check a receipt offline against the log's public key; ReceiptError names the first failure."""
    if not isinstance(receipt, dict) or receipt.get("format") != RECEIPT_FORMAT:
        raise ReceiptError(f"not a {RECEIPT_FORMAT} receipt")
    if not isinstance(log_key, str):
        raise ReceiptError("the log key must be the verifier key text (name+hash+key)")
    try:
        Verifier.parse(log_key)
    except NoteError as e:
        raise ReceiptError(f"log key is malformed: {e}") from None
    model = _field(receipt, "model", "receipt")
    out, prompt = _field(receipt, "output", "receipt"), _field(receipt, "prompt", "receipt")
    gen = _field(receipt, "generation", "receipt")
    try:
        g = decode_entry(_unb64(_field(gen, "entry", "generation"), "generation entry"))
    except EntryError as e:
        raise ReceiptError(f"generation entry is malformed: {e}") from None
    if g["kind"] != "generation":
        raise ReceiptError(f"generation entry is a {g['kind']!r} entry")
    if token_digest(_field(out, "token_ids", "output")) != out.get("digest") or out.get("digest") != g["output"]:
        raise ReceiptError("output digest differs from the output tokens or from the generation entry")
    if token_digest(_field(prompt, "token_ids", "prompt")) != prompt.get("digest") or prompt.get("digest") != g["prompt"]:
        raise ReceiptError("prompt digest differs from the prompt tokens or from the generation entry")
    if g["model_id"] != model.get("id"):
        raise ReceiptError("the generation entry names another model than the receipt")
    if canonical_json(g["sampling"]) != canonical_json(receipt.get("sampling")):
        raise ReceiptError("sampling parameters differ from the generation entry")
    anchors = receipt.get("anchors")
    ids: list[str] = []
    cp = None
    if anchors is not None or receipt.get("checkpoint") is not None:
        cp = _open_checkpoint(receipt.get("checkpoint"), log_key, origin, "receipt")
    if anchors is None:
        if g["anchor_set"] is not None:
            raise ReceiptError("the generation entry names an anchor set the receipt does not carry")
    else:
        aset = _field(anchors, "set", "anchors")
        manifest = _field(aset, "manifest", "anchor set")
        set_entry = _check_included(aset, cp, "anchor set entry")
        try:
            se = StateEntry.decode(set_entry)
        except EntryError as e:
            raise ReceiptError(f"anchor set entry is malformed: {e}") from None
        if se.state_type != ANCHOR_STATE_TYPE or se.state_id != manifest_digest(manifest):
            raise ReceiptError("the anchor set manifest is not the one the log commits to")
        if g["anchor_set"] != se.state_id:
            raise ReceiptError("the generation entry names another anchor set")
        if manifest.get("model_id") != model.get("id") or manifest.get("tokenizer") != model.get("tokenizer"):
            raise ReceiptError("the anchor set was compiled for another model or tokenizer")
        items = _field(anchors, "states", "anchors")
        ids = [StateEntry.decode(_check_included(it, cp, f"anchor state {i}")).state_id for i, it in enumerate(items)]
        if ids != manifest.get("state_ids"):
            raise ReceiptError(f"anchor states {ids} differ from the anchor set's ordered states {manifest.get('state_ids')} "
                               "(dropped, added or reordered)")
        if tuple(sorted(set(ids))) != tuple(se.parents):
            raise ReceiptError("the logged anchor set entry binds other states")
        from fieldprint.memory.state import content_digest

        for i, it in enumerate(items):
            st = StateEntry.decode(_unb64(it["entry"], "anchor entry"))
            if it.get("text") is not None and content_digest(it["text"], None) != st.digest:
                raise ReceiptError(f"anchor {i}'s text differs from its logged digest")
            _check_promoted(st, it, cp, override_keys, i, g["time_ns"])
    bound = bool(gen.get("bound"))
    if bound:
        gcp = _open_checkpoint(gen.get("checkpoint"), log_key, origin, "generation")
        _check_included(gen, gcp, "generation entry")
    report_cp = cp or (gcp if bound else None)
    return ReceiptReport(report_cp.origin if report_cp else (origin or Verifier.parse(log_key).name),
                         report_cp.size if report_cp else 0, ids, bound, model.get("id", ""))
