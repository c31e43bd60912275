"""System Anchor Tokens: promoted states compiled into K/V blocks of the anchor pool, and checked.

compile: the states' texts become one system message through the chat template -> tokens ->
prefill at positions 0..A-1 into sequence blocks -> every layer's K and V, read in place by the
Committer's block-table-aware quantizer (on a GPU, on its side stream: no gathered copy) -> DQP
int8 codes (K with the model's calibrated per-channel profile, V per token and head in the DQP
row layout) -> one `anchor_kv` state entry in the log whose state id is the manifest's digest:
the manifest binds every (layer, K|V, block) digest (an RFC 9162 Merkle root over them) to the
model, the profile, the ordered state ids and the anchor tokens -> the committed codes written
into anchor-pool blocks, whose digests must equal the commit's -> a signed checkpoint covering
the entry. The model-dtype option copies the blocks as they are and logs the same manifest.

Before a set is first attended to, `verify_slot` re-hashes the pool bytes (the very bytes the
kernel reads), names the first bad (layer, K|V, block) and checks the manifest against the logged
entry and the entry's inclusion in a signed checkpoint. Compiled sets persist under
`<data_dir>/anchor-sets/` (one file per set, keyed by model id, profile and ordered state ids) and
are verified again on load, so a restart recompiles nothing.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass

import blake3
import numpy as np
import torch

from fieldprint.atomic import replace_file, sweep_temporaries
from fieldprint.canon import canonical_json, parse_digest, tag_digest
from fieldprint.dqp import quantize
from fieldprint.dqp_profile import DQPProfile
from fieldprint.engine.commit import CommitResult
from fieldprint.engine.tp import anchor_states, copy_blocks, put_anchor_states, sequence_kv, set_anchor_k_scales
from fieldprint.errors import AnchorError, CommitError
from fieldprint.ledger import merkle
from fieldprint.ledger.entry import StateEntry

MANIFEST_FORMAT = "fieldprint-anchor-set/2"  # /2: int8 V blocks are DQP row-layout bytes
ANCHOR_STATE_TYPE = "anchor_kv"
ANCHOR_SESSION = "anchors"
_KEY_DOMAIN = b"fieldprint/anchor-set-key/v1\x00"
_MANIFEST_DOMAIN = b"fieldprint/anchor-manifest/v1\x00"
_FILE_MAGIC = b"FPAS2\n"
CALIBRATION_TEXT = (
    "Calibration passage. The committee met on Tuesday to review the quarterly budget, the hiring plan "
    "and three proposals for the new office. Revenue grew 12% while costs rose 4%; the main risk is supply. "
    "def add(a, b):\n    return a + b  # code, numbers 0 1 2 3 4 5 6 7 8 9, and symbols: {}[]()<>=+-*/%$#@!\n"
    "Bonjour, comment allez-vous ? Das Wetter ist heute schön. ¿Dónde está la biblioteca? 東京は晴れです。\n"
    "The user prefers vegetarian food, is allergic to peanuts, hikes on weekends and lives near Lake Tahoe. "
    "Remember: always answer briefly and cite the source of every fact you state."
)


def token_digest(ids: list[int]) -> str:
    """Digest of a token id sequence (little-endian u32s): what receipts record for prompts and outputs."""
    return tag_digest("blake3", blake3.blake3(b"fieldprint/tokens/v1\x00" + struct.pack(f"<{len(ids)}I", *ids)).digest())


def set_key(model_id: str, encoding: str, state_ids: list[str], tokens: str) -> str:
    """The cache key of an anchor set: model, encoding (profile digest or dtype), ordered state ids and
    the anchor tokens' digest (a chat template may render the same states differently, e.g. with a date)."""
    return blake3.blake3(_KEY_DOMAIN + canonical_json([model_id, encoding, list(state_ids), tokens])).hexdigest()


def manifest_digest(manifest: dict) -> str:
    """The manifest's digest: the anchor_kv entry's state id."""
    return tag_digest("blake3", blake3.blake3(_MANIFEST_DOMAIN + canonical_json(manifest)).digest())


def blocks_root(digests: list[bytes]) -> str:
    """RFC 9162 Merkle root over the block digests in (layer, K then V, block) order."""
    return tag_digest("sha256", merkle.root_hash([merkle.leaf_hash(d) for d in digests]))


def anchor_text(texts: list[str]) -> str:
    """The system message the anchors become: one remembered fact per line."""
    return "Trusted memory (verified facts about the user and the task):\n" + "\n".join(f"- {t.strip()}" for t in texts)


def _template(tok, messages: list[dict], generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def split_prompt(tok, system: str | None, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(anchor prefix tokens, the request's own tokens) of a chat rendered with `system` first.

    The two token lists concatenated are exactly the tokens of the whole rendered chat, so anchors
    in the cache condition the model as the same text would as a prompt prefix.
    """
    if system is None:
        return [], _encode(tok, _template(tok, messages, True))
    full = _template(tok, [{"role": "system", "content": system}, *messages], True)
    head = _template(tok, [{"role": "system", "content": system}], False)
    if not full.startswith(head):
        raise AnchorError("this chat template renders the system message differently alone and in a chat; "
                          "anchors cannot be a fixed prefix with it")
    return _encode(tok, head), _encode(tok, full[len(head):])


def _encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


@dataclass(slots=True)
class CompiledSet:
    """What the engine keeps with a compiled set in the pool (and the receipt carries)."""

    key: str
    manifest: dict
    entry: bytes  # the logged anchor_kv state entry
    index: int  # its leaf index
    block_digests: list[bytes]
    tokens: list[int]


def quantize_stack(k: torch.Tensor, v: torch.Tensor, profile: DQPProfile) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical DQP codes of stacked K and V [L, A, H, D] under `profile`, on their device (the CPU
    reference: the same codes the committer makes), for a pool filled without a commit (replays, benches)."""
    return tuple(torch.stack([quantize(x[layer], profile, layer, kind).codes for layer in range(x.shape[0])]).to(x.device)
                 for kind, x in (("K", k), ("V", v)))


def digest_blocks(runner, blocks: list[int], length: int) -> list[bytes]:
    """BLAKE3 of every (layer, K then V, block) of a set as stored in the anchor pool (every rank's heads)."""
    bs = runner.config.block_size
    out = []
    for state in _by_layer(*anchor_states(runner, blocks, length)):
        flat = state.contiguous().cpu().view(torch.uint8).reshape(length, -1).numpy()
        out += [blake3.blake3(flat[i : i + bs].tobytes()).digest() for i in range(0, length, bs)]
    return out


def _by_layer(k: torch.Tensor, v: torch.Tensor):
    """(layer, K then V) states of stacked K and V: the order of block digests and of set files."""
    for layer in range(k.shape[0]):
        yield k[layer]
        yield v[layer]


PROFILE_RECIPE = "k-channel-v-token"  # what calibrate_profile makes: K per channel, V per (token, head) row


def calibrate_profile(runner, name: str, v_granularity: str = "token") -> DQPProfile:
    """Calibrate the model's DQP profile on a fixed, varied passage (once per model; cached by the engine).

    The engine's int8 anchors need V per token (PROFILE_RECIPE); other granularities are for comparisons.
    """
    tok = runner.lm.tokenizer
    ids = _encode(tok, _template(tok, [{"role": "system", "content": CALIBRATION_TEXT},
                                       {"role": "user", "content": CALIBRATION_TEXT}], True))
    k, v = prefill_kv(runner, ids)
    samples = [{(l, "K"): k[l], (l, "V"): v[l]} for l in range(k.shape[0])]
    a = runner.args
    return DQPProfile.calibrate(samples, name=name, num_layers=a.num_layers, num_kv_heads=a.num_kv_heads,
                                head_dim=a.head_dim, k_granularity="channel", v_granularity=v_granularity,
                                block_size=runner.config.block_size)


@contextmanager
def prefilled(runner, ids: list[int]):
    """`ids` prefilled at positions 0..A-1 (no anchors) into sequence blocks; yields their block table.

    The blocks go back to the pool on exit: a reader on another stream must be ordered first.
    """
    from fieldprint.engine.sequence import SamplingParams, Sequence

    seq = Sequence(list(ids), SamplingParams())
    runner.blocks.grow(seq.block_table, len(ids))
    try:
        runner.forward([seq], [len(ids)])
        yield seq.block_table
    finally:
        runner.blocks.release(seq.block_table)


def prefill_kv(runner, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's K and V [L, A, H, D] of `ids` prefilled at positions 0..A-1 (a copy: calibration, replay)."""
    with prefilled(runner, ids) as table:
        return sequence_kv(runner, table, len(ids))


def commit_sequence(committer, runner, table: list[int], length: int, **meta):
    """Queue the K/V of the sequence in `table` (its first `length` tokens) as one commit; its ticket.

    One device: the committer reads the blocks in place (on a GPU on its side stream, and this
    stream waits for that read, no host sync, before anything can write those blocks again).
    Tensor parallelism: every rank's heads are gathered first (a copy) and committed whole.
    """
    c = runner.cache
    if runner.tp_size > 1:
        ticket = committer.submit_stack(*sequence_kv(runner, table, length), **meta)
    else:
        ticket = committer.submit_paged(c.k, c.v, table, length, **meta)
    if c.k.is_cuda:
        ticket.wait_quantized()
    return ticket


def _pool_order(blocks: dict, layers: int) -> list[bytes]:
    """A commit's per-block digests in the pool's (layer, K then V, block) order."""
    return [d for layer in range(layers) for kind in ("K", "V") for d in blocks[(layer, kind)]]


class AnchorCompiler:
    """Compiles, verifies, persists and reloads anchor sets for one model runner and one log."""

    def __init__(self, runner, log, committer, profile: DQPProfile | None, folder: str | None) -> None:
        self.runner, self.log, self.committer, self.profile, self.folder = runner, log, committer, profile, folder
        if folder is not None:
            sweep_temporaries(folder)  # set files a killed writer left half-written
        self.int8 = runner.cache.anchor_k.dtype == torch.int8
        if self.int8:
            if profile is None:
                raise AnchorError("int8 anchors need the model's DQP profile")
            if not profile.per_row(0, "V"):
                raise AnchorError(f"int8 anchors need a profile that scales V per token (format 3); profile "
                                  f"{profile.name!r} scales it per {profile.v_granularity}: recalibrate")
            set_anchor_k_scales(runner, torch.stack([profile.scales(layer, "K", runner.device)
                                                     for layer in range(runner.args.num_layers)]))
        self.encoding = profile.digest if self.int8 else str(runner.lm.dtype).removeprefix("torch.")
        self.compiled: dict[str, CompiledSet] = {}

    def anchor_tokens(self, texts: list[str]) -> list[int]:
        """The tokens a set of anchor texts becomes (the system message through the chat template)."""
        ids, _ = split_prompt(self.runner.lm.tokenizer, anchor_text(texts), [{"role": "user", "content": "."}])
        return ids

    def key(self, state_ids: list[str], texts: list[str], ids: list[int] | None = None) -> str:
        """The set's cache key (`ids`: the texts' anchor tokens, when already known)."""
        ids = self.anchor_tokens(texts) if ids is None else ids
        return set_key(self.runner.lm.model_id, self.encoding, state_ids, token_digest(ids))

    def _path(self, key: str) -> str | None:
        return None if self.folder is None else os.path.join(self.folder, key + ".fpas")

    def acquire(self, state_ids: list[str], texts: list[str]) -> CompiledSet:
        """The set for these ordered states, in the pool and verified: reused, reloaded from disk or compiled."""
        ids = self.anchor_tokens(texts)
        key = self.key(state_ids, texts, ids)
        pool = self.runner.anchor_pool
        if pool.get(key) is not None and key in self.compiled:
            return self.compiled[key]
        path = self._path(key)
        if path and os.path.exists(path):
            return self._load(key, path)
        return self._compile(key, state_ids, ids)

    def _compile(self, key: str, state_ids: list[str], ids: list[int]) -> CompiledSet:
        r = self.runner
        if len(ids) > r.config.max_anchor_len:
            raise AnchorError(f"the anchors are {len(ids)} tokens; the engine takes at most {r.config.max_anchor_len} "
                              "(max_anchor_len): promote fewer or shorter states")
        slot = r.anchor_pool.reserve(key, len(ids))
        try:
            digests, committed = self._fill(slot.blocks, state_ids, ids)
            manifest = self._manifest(state_ids, ids, digests)
            if committed is not None:
                entry, index = committed.entry, committed.index
            else:
                entry = StateEntry(manifest_digest(manifest), ANCHOR_STATE_TYPE, manifest["blocks_root"], None,
                                   tuple(state_ids), (), ANCHOR_SESSION, time.time_ns()).encode()
                index = self.log.add(entry).result()
            cs = CompiledSet(key, manifest, entry, index, digests, ids)
            self.log.checkpoint()  # an explicit checkpoint: the set must verify before it is first used
            self.verify(cs, slot.blocks)
            if self.folder:
                self._save(cs)
        except BaseException:
            r.anchor_pool.evict(key)
            raise
        self.compiled[key] = cs
        return cs

    def _fill(self, blocks: list[int], state_ids: list[str], ids: list[int]) -> tuple[list[bytes], CommitResult | None]:
        """Prefill the anchor tokens and write their K/V into the set's pool blocks: (the pool's block digests, the commit).

        int8: the committer quantizes straight from the prefill's paged blocks (on a GPU, on its side
        stream) and logs the anchor_kv entry, whose state id is the manifest's digest over its block
        digests; the pool receives exactly the committed codes, and its digests must equal the commit's.
        Model dtype: the blocks are copied as they are. Under tensor parallelism the heads live on
        several devices: they are gathered (a copy) and committed whole, and each rank's pool gets its heads.
        """
        r, c, n = self.runner, self.runner.cache, len(ids)
        layers = c.k.shape[0]
        with prefilled(r, ids) as table:
            if not self.int8:
                copy_blocks(r, table, blocks)
                return digest_blocks(r, blocks, n), None
            ticket = commit_sequence(
                self.committer, r, table, n, session=ANCHOR_SESSION, state_type=ANCHOR_STATE_TYPE, parents=tuple(state_ids),
                state_id=lambda done: manifest_digest(self._manifest(state_ids, ids, _pool_order(done, layers))))
        try:
            result = ticket.future.result()
        except CommitError as e:
            try:  # collect the failure: it is reported here, not again by the committer's next flush
                self.committer.flush(ANCHOR_SESSION)
            except CommitError:
                pass
            raise AnchorError(f"the anchors cannot be committed: {e}") from None
        put_anchor_states(r, blocks, *ticket.stacks)  # K [L, A, H, D] and V [L, A, H, D + 1] codes, as committed
        digests = digest_blocks(r, blocks, n)
        committed = _pool_order(result.blocks, layers)
        if committed != digests:
            i = next((i for i, (a, b) in enumerate(zip(committed, digests)) if a != b), min(len(committed), len(digests)))
            raise AnchorError(f"the anchor pool differs from the committed codes at {self._block_name(i, n)} "
                              f"(log leaf {result.index}); nothing is attended to")
        return digests, result

    def _block_name(self, i: int, length: int) -> str:
        """'layer L K|V block B' of the i-th digest in the pool's order."""
        nb = -(-length // self.runner.config.block_size)
        layer, rest = divmod(i, 2 * nb)
        return f"layer {layer} {'K' if rest < nb else 'V'} block {rest % nb}"

    def _manifest(self, state_ids: list[str], ids: list[int], digests: list[bytes]) -> dict:
        a, lm = self.runner.args, self.runner.lm
        return {
            "format": MANIFEST_FORMAT, "model_id": lm.model_id, "tokenizer": lm.tokenizer_digest,
            "state_ids": list(state_ids), "tokens": len(ids), "token_digest": token_digest(ids),
            "encoding": "int8" if self.int8 else self.encoding, "profile": self.profile.digest if self.int8 else None,
            "block_size": self.runner.config.block_size, "layers": a.num_layers, "kv_heads": a.num_kv_heads,
            "head_dim": a.head_dim, "blocks": len(digests), "blocks_root": blocks_root(digests),
        }

    def verify(self, cs: CompiledSet, blocks: list[int]) -> None:
        """Re-hash the pool bytes; check the manifest, the logged entry and its inclusion; AnchorError names the failure."""
        length = cs.manifest["tokens"]
        now = digest_blocks(self.runner, blocks, length)
        for i, (got, want) in enumerate(zip(now, cs.block_digests)):
            if got != want:
                raise AnchorError(f"anchor set {cs.key[:16]}: {self._block_name(i, length)} differs from what "
                                  f"was committed (log leaf {cs.index}); the set is refused and nothing is attended to")
        if len(now) != len(cs.block_digests) or blocks_root(cs.block_digests) != cs.manifest["blocks_root"]:
            raise AnchorError(f"anchor set {cs.key[:16]}: its block digests do not match the manifest's root")
        if len(cs.tokens) != length or token_digest(cs.tokens) != cs.manifest["token_digest"]:
            raise AnchorError(f"anchor set {cs.key[:16]}: its token list does not match the manifest's token digest")
        entry = StateEntry.decode(cs.entry)
        if entry.state_id != manifest_digest(cs.manifest) or entry.state_type != ANCHOR_STATE_TYPE:
            raise AnchorError(f"anchor set {cs.key[:16]}: log leaf {cs.index} does not commit to this manifest")
        if self.log.entry(cs.index) != cs.entry:
            raise AnchorError(f"anchor set {cs.key[:16]}: log leaf {cs.index} holds another entry")
        cp = self.log.latest_checkpoint()
        if cp is None or cp.size <= cs.index:
            raise AnchorError(f"anchor set {cs.key[:16]}: log leaf {cs.index} is not covered by a signed checkpoint yet")
        proof = self.log.inclusion_proof(cs.index, cp.size)
        merkle.verify_inclusion(merkle.leaf_hash(cs.entry), cs.index, cp.size, proof, cp.root_hash)

    # -- persistence ---------------------------------------------------------------------------
    def _save(self, cs: CompiledSet) -> None:
        slot = self.runner.anchor_pool.sets[cs.key]
        head = {"key": cs.key, "manifest": cs.manifest, "entry": base64.b64encode(cs.entry).decode(), "index": cs.index,
                "blocks": [d.hex() for d in cs.block_digests], "tokens": cs.tokens}
        os.makedirs(self.folder, exist_ok=True)

        def write(f) -> None:
            f.write(_FILE_MAGIC + canonical_json(head) + b"\n")
            for state in _by_layer(*anchor_states(self.runner, slot.blocks, slot.length)):
                f.write(state.contiguous().cpu().view(torch.uint8).numpy().tobytes())

        replace_file(self._path(cs.key), write)  # a set file is whole or absent

    def _load(self, key: str, path: str) -> CompiledSet:
        c, r = self.runner.cache, self.runner
        try:
            with open(path, "rb") as f:
                if f.read(len(_FILE_MAGIC)) != _FILE_MAGIC:
                    raise ValueError("not an anchor set file")
                head = json.loads(f.readline())
                body = f.read()
            cs = CompiledSet(head["key"], head["manifest"], base64.b64decode(head["entry"], validate=True),
                             int(head["index"]), [bytes.fromhex(d) for d in head["blocks"]], list(head["tokens"]))
            length = int(cs.manifest["tokens"])
            parse_digest(cs.manifest["model_id"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AnchorError(f"anchor set file {path} is unreadable or damaged ({e}); delete it to recompile") from None
        if cs.key != key or cs.manifest.get("model_id") != r.lm.model_id:
            raise AnchorError(f"anchor set file {path} holds another set or another model's set; delete it to recompile")
        if cs.manifest.get("block_size") != r.config.block_size:
            raise AnchorError(f"anchor set file {path} was compiled with cache block size {cs.manifest.get('block_size')}; "
                              f"this engine uses {r.config.block_size}: delete it to recompile")
        layers, h, d = r.args.num_layers, r.args.num_kv_heads, r.args.head_dim  # every rank's heads
        row_v = c.anchor_v_exp is not None
        shapes = {"K": (length, h, d), "V": (length, h, d + row_v)}
        size = {kind: length * h * shape[2] * c.anchor_k.element_size() for kind, shape in shapes.items()}
        expected = (size["K"] + size["V"]) * layers
        if len(body) != expected:
            raise AnchorError(f"anchor set file {path} is truncated or padded ({len(body)} bytes of K/V, expected "
                              f"{expected}); delete it to recompile")
        slot = r.anchor_pool.reserve(key, length)
        try:
            per_layer = torch.from_numpy(np.frombuffer(body, dtype=np.uint8).copy()).view(layers, -1)  # K, then V
            k, v = ((part.contiguous().view(c.anchor_k.dtype).view(layers, *shapes[kind]).to(c.anchor_k.device))
                    for kind, part in zip("KV", per_layer.split([size["K"], size["V"]], dim=1)))
            put_anchor_states(r, slot.blocks, k, v)
            self.verify(cs, slot.blocks)
        except BaseException:
            r.anchor_pool.evict(key)
            raise
        self.compiled[key] = cs
        return cs
