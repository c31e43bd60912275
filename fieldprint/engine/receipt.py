"""THE receipt: what conditioned one output, provable offline with nothing but the log's public key.

A receipt (docs/formats.md, "Receipts") carries a signed checkpoint and, each with its RFC 9162
inclusion proof against it: every anchor state's ledger entry (with the gate's decision, and the
override entry where an override promoted it), the anchor set's `anchor_kv` entry and manifest
(model, DQP profile, ordered state ids, Merkle root over every K/V block digest), and the
generation entry that binds model and tokenizer, anchor set, prompt and output digests, the
output text's digest and sampling parameters. The generation entry is appended in the background; until it is sequenced and covered
by a checkpoint the receipt says `"bound": false` and `bind_receipt` adds its proof later.

`verify_receipt(receipt, log_key)` refuses, naming the first failure: a checkpoint not signed by
`log_key` or of another origin; any entry whose proof fails; an anchor dropped, added or reordered
against the manifest; an anchor state that is not promotable by type and taint and has no logged
override naming it; a manifest that is not the one logged; an output or prompt whose tokens, count,
digest or text differ from the generation entry; a missing, renamed or extra field, or base64 that
is not canonical. Only the gate's `decision` (basis, why) is informational. The log key always
comes from the caller, never from the receipt.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass

import blake3

from fieldprint.canon import canonical_json, is_int, tag_digest
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
        data = base64.b64decode(text, validate=True)
    except (TypeError, ValueError):
        raise ReceiptError(f"{what} is not base64") from None
    if _b64(data) != text:  # non-zero padding bits would let two texts carry the same bytes
        raise ReceiptError(f"{what} is not canonical base64")
    return data


def text_digest(text: str) -> str:
    """Digest of an output's decoded text (UTF-8): binds the text a reader sees, which an offline verifier cannot decode."""
    return tag_digest("blake3", blake3.blake3(b"fieldprint/output-text/v1\x00" + text.encode("utf-8")).digest())


def generation_entry(model_id: str, tokenizer: str, anchor_set, prompt_ids: list[int], output_ids: list[int], text: str,
                     params, session: str | None) -> bytes:
    """The `generation` leaf: what one output was conditioned on, and its digest."""
    return encode_entry("generation", {
        "model_id": model_id, "tokenizer": tokenizer,
        "anchor_set": manifest_digest(anchor_set.manifest) if anchor_set else None,
        "prompt": token_digest(prompt_ids), "prompt_tokens": len(prompt_ids),
        "output": token_digest(output_ids), "output_tokens": len(output_ids), "output_text": text_digest(text),
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


_KEYS = {
    "receipt": {"format", "checkpoint", "model", "anchors", "prompt", "output", "sampling", "generation"},
    "model": {"id", "tokenizer"},
    "prompt": {"tokens", "digest", "token_ids"},
    "output": {"tokens", "digest", "token_ids", "text"},
    "generation": {"entry", "bound", "index", "proof", "checkpoint"},
    "anchors": {"set", "states"},
    "anchor set": {"manifest", "index", "entry", "proof"},
    "anchor state": {"index", "entry", "proof", "text", "decision", "override"},
    "override": {"index", "entry", "proof"},
}


def _exact(d: object, what: str) -> dict:
    """`d` as a dict with exactly the fields of `what` (a renamed or extra field is a changed receipt, not noise)."""
    keys = {k for k in d if not (what == "receipt" and k.startswith("_"))} if isinstance(d, dict) else None
    if keys != _KEYS[what]:
        got = sorted(keys) if keys is not None else type(d).__name__
        raise ReceiptError(f"receipt is malformed: {what} must have exactly the fields {sorted(_KEYS[what])}, got {got}")
    return d


def _tokens(part: dict, what: str, logged_digest: object, logged_count: object) -> None:
    """Token ids, their count and digest agree with each other and with the generation entry."""
    ids = part["token_ids"]
    if not isinstance(ids, list) or not all(is_int(t) and 0 <= t < 2**32 for t in ids):
        raise ReceiptError(f"{what} token ids must be a list of integers in [0, 2**32)")
    if token_digest(ids) != part["digest"] or part["digest"] != logged_digest:
        raise ReceiptError(f"{what} digest differs from the {what} tokens or from the generation entry")
    if part["tokens"] != len(ids) or not is_int(part["tokens"]) or len(ids) != logged_count:
        raise ReceiptError(f"{what} token count {part['tokens']!r} differs from its {len(ids)} token ids "
                           f"or from the generation entry's {logged_count!r}")


def _check_included(item: dict, cp: Checkpoint, what: str) -> bytes:
    entry = _unb64(item["entry"], f"{what} entry")
    index, proof = item["index"], item["proof"]
    if not is_int(index) or not 0 <= index < cp.size or not isinstance(proof, list):
        raise ReceiptError(f"{what}: index {index!r} is not a leaf of the checkpoint's tree (size {cp.size}) "
                           "or its proof is not a list")
    proof = [_unb64(h, f"{what} proof") for h in proof]
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
    """An anchor must be promotable by type and untainted, or carry a logged override naming it.

    An override a receipt carries is checked even where the default rule alone would promote the
    state (the gate names an override as the basis whenever one is in force).
    """
    from fieldprint.memory.policy import DEFAULT_PROMOTABLE
    from fieldprint.memory.records import Override, open_record, parse_record_text

    ov = item["override"]
    if ov is None:
        if state.state_type in DEFAULT_PROMOTABLE and not state.taint:
            return
        why = f"tainted by {list(state.taint)}" if state.taint else f"of type {state.state_type!r}"
        raise ReceiptError(f"anchor {i} ({state.state_id}) is {why} and no override promoted it")
    raw = _check_included(_exact(ov, "override"), cp, f"override of anchor {i}")
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
    _exact(receipt, "receipt")
    model, out, prompt = _exact(receipt["model"], "model"), _exact(receipt["output"], "output"), _exact(receipt["prompt"], "prompt")
    gen = _exact(receipt["generation"], "generation")
    try:
        g = decode_entry(_unb64(gen["entry"], "generation entry"))
    except EntryError as e:
        raise ReceiptError(f"generation entry is malformed: {e}") from None
    if g["kind"] != "generation" or not is_int(g.get("time_ns")):
        raise ReceiptError(f"generation entry is a {g['kind']!r} entry, not a generation entry with its time")
    _tokens(out, "output", g.get("output"), g.get("output_tokens"))
    _tokens(prompt, "prompt", g.get("prompt"), g.get("prompt_tokens"))
    if not isinstance(out["text"], str) or text_digest(out["text"]) != g.get("output_text"):
        raise ReceiptError("output text differs from the text the generation entry binds")
    if g.get("model_id") != model["id"] or g.get("tokenizer") != model["tokenizer"]:
        raise ReceiptError("the generation entry names another model or tokenizer than the receipt")
    if canonical_json(g.get("sampling")) != canonical_json(receipt.get("sampling")):
        raise ReceiptError("sampling parameters differ from the generation entry")
    anchors = receipt.get("anchors")
    ids: list[str] = []
    cp = None
    if anchors is not None or receipt.get("checkpoint") is not None:
        cp = _open_checkpoint(receipt.get("checkpoint"), log_key, origin, "receipt")
    if anchors is None:
        if g.get("anchor_set") is not None:
            raise ReceiptError("the generation entry names an anchor set the receipt does not carry")
    else:
        aset = _exact(_exact(anchors, "anchors")["set"], "anchor set")
        manifest = aset["manifest"]
        if not isinstance(manifest, dict):
            raise ReceiptError("receipt is malformed: the anchor set manifest is not an object")
        set_entry = _check_included(aset, cp, "anchor set entry")
        try:
            se = StateEntry.decode(set_entry)
        except EntryError as e:
            raise ReceiptError(f"anchor set entry is malformed: {e}") from None
        if se.state_type != ANCHOR_STATE_TYPE or se.state_id != manifest_digest(manifest):
            raise ReceiptError("the anchor set manifest is not the one the log commits to")
        if g.get("anchor_set") != se.state_id:
            raise ReceiptError("the generation entry names another anchor set")
        if manifest.get("model_id") != model.get("id") or manifest.get("tokenizer") != model.get("tokenizer"):
            raise ReceiptError("the anchor set was compiled for another model or tokenizer")
        items = anchors["states"]
        if not isinstance(items, list):
            raise ReceiptError("receipt is malformed: anchor states are not a list")
        ids = [StateEntry.decode(_check_included(_exact(it, "anchor state"), cp, f"anchor state {i}")).state_id
               for i, it in enumerate(items)]
        if ids != manifest.get("state_ids"):
            raise ReceiptError(f"anchor states {ids} differ from the anchor set's ordered states {manifest.get('state_ids')} "
                               "(dropped, added or reordered)")
        if tuple(sorted(set(ids))) != tuple(se.parents):
            raise ReceiptError("the logged anchor set entry binds other states")
        from fieldprint.memory.state import content_digest

        for i, it in enumerate(items):
            st = StateEntry.decode(_unb64(it["entry"], "anchor entry"))
            if it["text"] is not None and (not isinstance(it["text"], str) or not it["text"]
                                           or content_digest(it["text"], None) != st.digest):
                raise ReceiptError(f"anchor {i}'s text differs from its logged digest")
            _check_promoted(st, it, cp, override_keys, i, g["time_ns"])
    bound = gen["bound"]
    if bound is True:
        gcp = _open_checkpoint(gen["checkpoint"], log_key, origin, "generation")
        _check_included(gen, gcp, "generation entry")
    elif bound is not False or (gen["index"], gen["proof"], gen["checkpoint"]) != (None, None, None):
        raise ReceiptError("receipt is malformed: generation must be bound (true, with index, proof and checkpoint) "
                           "or not (false, with none of them)")
    report_cp = cp or (gcp if bound else None)
    return ReceiptReport(report_cp.origin if report_cp else (origin or Verifier.parse(log_key).name),
                         report_cp.size if report_cp else 0, ids, bound, model.get("id", ""))
