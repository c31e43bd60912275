"""Receipts from real generations, verified offline, and everything a verifier must refuse.

One engine (SmolLM2-135M-Instruct on the CPU) serves the whole module: it generates an anchored
output (two untainted states), an output anchored on a tainted tool output that a signed operator
override promoted, and an output without anchors. Every refusal is tried on a deep copy of a bound
receipt's JSON form, so the tests never disturb each other.
"""

from __future__ import annotations

import base64
import copy
import inspect
import json
import random
import time
from types import SimpleNamespace

import pytest

from fieldprint.config import DEFAULT_ORIGIN, LEDGER_KEY_STEM
from fieldprint.engine.anchors import token_digest
from fieldprint.engine.engine import Engine, EngineConfig
from fieldprint.engine.receipt import dump_receipt, text_digest, verify_receipt
from fieldprint.engine.replay import _replay_params, replay_receipt
from fieldprint.engine.runner import RunnerConfig
from fieldprint.engine.sequence import SamplingParams
from fieldprint.errors import ReceiptError
from fieldprint.ledger import merkle
from fieldprint.ledger.entry import decode_entry, encode_entry
from fieldprint.ledger.keys import ensure_key_pair
from fieldprint.ledger.note import Checkpoint, Signer, generate_key, sign_note
from fieldprint.memory.records import Override, sign_record

PROMPT = "What should I cook for Ada tonight? One sentence."
OTHER_ORIGIN = "other.example/log"


def _json(receipt: dict) -> dict:
    """The receipt as a verifier receives it: its JSON text, parsed."""
    return json.loads(dump_receipt(receipt))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("receipts"))
    config = EngineConfig(runner=RunnerConfig(cpu_cache_tokens=2048, anchor_blocks=64, max_model_len=512))
    engine = Engine("smollm2", data_dir=data_dir, config=config)
    pm = engine.memory.pacemaker
    name = pm.add("user_input", session="s", creator="user", sources=["user"], text="My name is Ada and I live in Zurich.")
    diet = pm.add("belief", session="s", creator="agent", sources=["agent"], text="Ada is vegetarian and allergic to peanuts.")
    rumor = pm.add("tool_output", session="s", creator="agent", sources=["web:forum"], taint=["web:forum"],
                   text="Ada's favourite dish is mushroom risotto.")
    params = SamplingParams(max_tokens=6)

    out = engine.generate(PROMPT, params, anchors=[name.state_id, diet.state_id])[0]
    unbound = _json(out.receipt)
    engine.bind(out.receipt)

    now = time.time_ns()
    override = Override(rumor.state_id, "promote", "operator", "checked the forum post by hand", now, now + 3600 * 10**9)
    pm.apply(sign_record(override, engine.memory.operator_key))
    engine.memory.ensure_checkpoint()  # the gate counts an override once a signed checkpoint covers it
    decision = engine.memory.gate.explain(rumor.state_id)
    assert decision.anchor and decision.basis == "override"
    promoted = engine.generate(PROMPT, params, anchors=[rumor.state_id])[0]
    engine.bind(promoted.receipt)

    plain = engine.generate(PROMPT, params)[0]
    engine.bind(plain.receipt)
    sampled = engine.generate(PROMPT, SamplingParams(max_tokens=6, temperature=0.9, top_k=40, top_p=0.9, seed=11),
                              anchors=[name.state_id, diet.state_id])[0]
    unseeded = engine.generate(PROMPT, SamplingParams(max_tokens=2, temperature=0.9))[0]

    log_signer, _ = ensure_key_pair(data_dir, LEDGER_KEY_STEM, DEFAULT_ORIGIN)
    yield SimpleNamespace(
        engine=engine, log_key=engine.memory.log_key, log_signer=log_signer,
        operator_verifier=Signer.parse(engine.memory.operator_key).verifier_key(),
        states=SimpleNamespace(name=name, diet=diet, rumor=rumor),
        unbound=unbound, bound=_json(out.receipt), output=out,
        promoted=_json(promoted.receipt), promoted_output=promoted, plain=_json(plain.receipt),
        sampled=_json(sampled.receipt), unseeded=_json(unseeded.receipt),
    )
    engine.close()


@pytest.fixture
def receipt(world) -> dict:
    """A deep copy of the bound, anchored receipt, free to tamper with."""
    return copy.deepcopy(world.bound)


def _refused(receipt: dict, log_key: str, match: str, **kw) -> None:
    with pytest.raises(ReceiptError, match=match):
        verify_receipt(receipt, log_key, **kw)


def _resign(note: str, signer_key: str, origin: str | None = None) -> str:
    """A checkpoint note's body (origin replaced if given) signed by `signer_key` alone."""
    text = note[: note.index("\n\n") + 1]
    if origin is not None:
        text = origin + text[text.index("\n") :]
    return sign_note(text, signer_key)


# -- what verifies --------------------------------------------------------------------------------

@pytest.mark.slow
def test_receipt_verifies_before_and_after_bind(world):
    report = verify_receipt(world.unbound, world.log_key)
    assert report.bound is False and "NOT YET BOUND" in report.summary()
    assert report.anchors == [world.states.name.state_id, world.states.diet.state_id] == world.output.anchors
    report = verify_receipt(world.bound, world.log_key)
    assert report.bound is True and report.origin == DEFAULT_ORIGIN
    assert report.anchors == [world.states.name.state_id, world.states.diet.state_id]
    assert world.bound["output"]["token_ids"] == world.output.token_ids
    assert world.bound["output"]["text"] == world.output.text
    g = decode_entry(base64.b64decode(world.bound["generation"]["entry"]))
    assert g["kind"] == "generation" and g["output"] == token_digest(world.output.token_ids)
    assert world.engine.log.entry(world.bound["generation"]["index"]) == base64.b64decode(world.bound["generation"]["entry"])


@pytest.mark.slow
def test_receipt_without_anchors_verifies(world):
    report = verify_receipt(world.plain, world.log_key)
    assert report.bound is True and report.anchors == [] and world.plain["anchors"] is None


@pytest.mark.slow
def test_override_promoted_tainted_anchor_verifies_with_and_without_override_keys(world):
    item = world.promoted["anchors"]["states"][0]
    assert item["override"] is not None and item["decision"]["basis"] == "override"
    assert verify_receipt(world.promoted, world.log_key).anchors == [world.states.rumor.state_id]
    assert verify_receipt(world.promoted, world.log_key, override_keys=[world.operator_verifier]).bound
    _, stranger = generate_key("fieldprint.local/operator")
    _refused(world.promoted, world.log_key, "does not verify", override_keys=[stranger])


# -- what is refused --------------------------------------------------------------------------------

@pytest.mark.slow
def test_changed_output_token_is_refused(receipt, world):
    receipt["output"]["token_ids"][0] += 1
    _refused(receipt, world.log_key, "output digest")


@pytest.mark.slow
def test_changed_output_digest_is_refused(receipt, world):
    receipt["output"]["token_ids"][0] += 1
    receipt["output"]["digest"] = token_digest(receipt["output"]["token_ids"])
    _refused(receipt, world.log_key, "output digest")


@pytest.mark.slow
def test_changed_output_with_a_rewritten_generation_entry_is_refused(receipt, world):
    # a forger rewrites the generation entry to match: the logged entry's inclusion proof then fails
    receipt["output"]["token_ids"][0] += 1
    receipt["output"]["digest"] = token_digest(receipt["output"]["token_ids"])
    g = decode_entry(base64.b64decode(receipt["generation"]["entry"]))
    g["output"] = receipt["output"]["digest"]
    receipt["generation"]["entry"] = _b64(encode_entry("generation", {k: v for k, v in g.items() if k not in ("v", "kind")}))
    _refused(receipt, world.log_key, "generation entry .* not included")


@pytest.mark.slow
def test_changed_output_text_is_refused(receipt, world):
    receipt["output"]["text"] = receipt["output"]["text"] + " Ignore the allergy."
    _refused(receipt, world.log_key, "output text")


@pytest.mark.slow
def test_wrong_token_count_is_refused(receipt, world):
    receipt["output"]["tokens"] += 1
    _refused(receipt, world.log_key, "count")


@pytest.mark.slow
def test_dropped_anchor_is_refused(receipt, world):
    del receipt["anchors"]["states"][1]
    _refused(receipt, world.log_key, "dropped, added or reordered")
    receipt["anchors"]["set"]["manifest"]["state_ids"].pop(1)  # and the manifest edited to match
    _refused(receipt, world.log_key, "manifest is not the one the log commits to")


@pytest.mark.slow
def test_added_anchor_is_refused(receipt, world):
    # the added state is a real logged state with a valid inclusion proof against the same checkpoint
    log, rumor = world.engine.log, world.states.rumor
    size = Checkpoint.open(receipt["checkpoint"], [world.log_key], origin=DEFAULT_ORIGIN).size
    extra = {"index": rumor.leaf_index, "entry": _b64(log.entry(rumor.leaf_index)),
             "proof": [_b64(h) for h in log.inclusion_proof(rumor.leaf_index, size)], "text": rumor.text,
             "decision": {"basis": "default", "why": "added"}, "override": None}
    receipt["anchors"]["states"].append(extra)
    _refused(receipt, world.log_key, "dropped, added or reordered")


@pytest.mark.slow
def test_reordered_anchors_are_refused(receipt, world):
    receipt["anchors"]["states"].reverse()
    _refused(receipt, world.log_key, "dropped, added or reordered")


@pytest.mark.slow
def test_tainted_anchor_without_its_override_is_refused(world):
    stripped = copy.deepcopy(world.promoted)
    stripped["anchors"]["states"][0]["override"] = None
    _refused(stripped, world.log_key, r"tainted by \['web:forum'\] and no override promoted it")
    # another logged, included entry in the override's place (the anchor set's own entry) is no override either
    swapped = copy.deepcopy(world.promoted)
    s = swapped["anchors"]["set"]
    swapped["anchors"]["states"][0]["override"] = {"index": s["index"], "entry": s["entry"], "proof": s["proof"]}
    _refused(swapped, world.log_key, "override of anchor 0")


@pytest.mark.slow
def test_override_attached_to_a_promotable_anchor_is_checked_too(receipt, world):
    # the rumor's override (a real, logged record, proved against another checkpoint) pinned on the first anchor
    receipt["anchors"]["states"][0]["override"] = copy.deepcopy(world.promoted["anchors"]["states"][0]["override"])
    _refused(receipt, world.log_key, "override of anchor 0")


@pytest.mark.slow
def test_checkpoint_of_another_origin_is_refused(receipt, world):
    # the log's own key signing another log's checkpoint (a key may sign for several logs)
    other = copy.deepcopy(receipt)
    other["checkpoint"] = _resign(receipt["checkpoint"], world.log_signer, origin=OTHER_ORIGIN)
    _refused(other, world.log_key, "checkpoint refused: .*another log")
    # a checkpoint of another log, signed by that log's key: not signed by ours; nor the origin asked for
    other_signer, other_verifier = generate_key(OTHER_ORIGIN)
    other["checkpoint"] = _resign(receipt["checkpoint"], other_signer, origin=OTHER_ORIGIN)
    _refused(other, world.log_key, "checkpoint refused")
    _refused(other, other_verifier, "checkpoint refused", origin=DEFAULT_ORIGIN)
    # the bound generation entry's checkpoint is checked the same way
    other = copy.deepcopy(receipt)
    other["generation"]["checkpoint"] = _resign(receipt["generation"]["checkpoint"], world.log_signer, origin=OTHER_ORIGIN)
    _refused(other, world.log_key, "generation: checkpoint refused")


@pytest.mark.slow
def test_log_key_of_another_name_is_refused(receipt, world):
    _, other_verifier = generate_key(OTHER_ORIGIN)
    _refused(receipt, other_verifier, "checkpoint refused")
    _refused(receipt, world.log_key, "checkpoint refused", origin=OTHER_ORIGIN)


@pytest.mark.slow
def test_log_key_comes_from_the_caller_never_from_the_receipt(receipt, world):
    """A forger with their own key for our log's name rewrites the output and re-signs everything."""
    evil_signer, evil_verifier = generate_key(DEFAULT_ORIGIN)
    forged = receipt
    forged["output"].update(token_ids=[42, 43], tokens=2, digest=token_digest([42, 43]), text="Serve steak.")
    g = decode_entry(base64.b64decode(forged["generation"]["entry"]))
    g.update(output=forged["output"]["digest"], output_tokens=2, output_text=text_digest("Serve steak."))
    entry = encode_entry("generation", {k: v for k, v in g.items() if k not in ("v", "kind")})
    root = merkle.leaf_hash(entry)  # a one-leaf log of the forger's own
    forged["generation"].update(entry=_b64(entry), index=0, proof=[],
                                checkpoint=sign_note(Checkpoint.body(DEFAULT_ORIGIN, 1, root), evil_signer))
    forged["checkpoint"] = _resign(receipt["checkpoint"], evil_signer)  # the real tree's root, the forger's signature
    assert verify_receipt(forged, evil_verifier).bound  # complete and consistent: only the key can stop it
    _refused(forged, world.log_key, "checkpoint refused")
    # verifying a genuine receipt against the forger's key fails too: the key decides, not the receipt
    _refused(copy.deepcopy(world.bound), evil_verifier, "checkpoint refused")
    # there is no key inside a receipt to fall back on: none is taken, and a receipt that carries one is malformed
    assert inspect.signature(verify_receipt).parameters["log_key"].default is inspect.Parameter.empty
    with pytest.raises(ReceiptError, match="log key"):
        verify_receipt(copy.deepcopy(world.bound), None)
    forged["log_key"] = evil_verifier
    _refused(forged, evil_verifier, "exactly the fields")


# -- any single byte --------------------------------------------------------------------------------

# Fields that carry no meaning a verifier checks: the gate's decision as shown to a reader (`basis`
# and the `why` sentence). The verifier re-derives promotion itself from the logged state's type and
# taint and the logged override, so editing these cannot make a refused anchor pass. Whitespace
# outside strings (indentation) is not a field at all: a change that parses to the same receipt is fine.
INFORMATIONAL = (("anchors", "states", "*", "decision"),)


def _informational(path: tuple) -> bool:
    return any(len(path) >= len(p) and all(q == "*" or q == x for q, x in zip(p, path)) for p in INFORMATIONAL)


def _differences(a: object, b: object, path: tuple = ()) -> list[tuple]:
    """The paths at which two parsed JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [path + (k,) for k in set(a) ^ set(b)]
        for k in set(a) & set(b):
            out += _differences(a[k], b[k], path + (k,))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, path + (i,))]
    return [] if type(a) is type(b) and a == b else [path]


def _positions(text: bytes, rng: random.Random, n: int) -> list[int]:
    """One random position on each of up to `n` lines (so short fields are hit, not only long base64), topped up at random."""
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == 0x0A][:-1]
    lines = rng.sample(starts, min(n, len(starts)))
    out = set()
    for s in lines:
        end = text.index(b"\n", s)
        out.add(rng.randrange(s, end + 1))
    while len(out) < n:
        out.add(rng.randrange(len(text)))
    return sorted(out)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["bound", "promoted"])
def test_every_single_byte_change_is_refused_or_meaningless(world, which):
    original = getattr(world, which)
    text = dump_receipt(original).encode()
    rng = random.Random(20261201)
    seen = {"unparsable": 0, "refused": 0, "same": 0, "informational": 0}
    for pos in _positions(text, rng, 200):
        mutated = bytearray(text)
        mutated[pos] = rng.choice([c for c in range(0x20, 0x7F) if c != text[pos]])  # printable: most changes still parse
        try:
            parsed = json.loads(bytes(mutated).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            seen["unparsable"] += 1
            continue
        where = _differences(original, parsed)
        if not where:
            seen["same"] += 1  # whitespace between tokens: the same receipt
            continue
        if all(_informational(p) for p in where):
            seen["informational"] += 1
            continue
        try:
            verify_receipt(parsed, world.log_key)
        except ReceiptError:
            seen["refused"] += 1
            continue
        pytest.fail(f"byte {pos} ({chr(text[pos])!r} -> {chr(mutated[pos])!r}) changed {where} and the receipt still verified")
    assert seen["refused"] >= 50, seen  # about half the printable changes still parse: the verifier, not the parser, refuses them


@pytest.mark.slow  # SmolLM2 on the CPU, three times: the anchors compiled again and the tokens decoded (about a minute)
def test_sampled_generations_replay_to_the_same_tokens_seeded_or_not(world):
    verify_receipt(world.sampled, world.log_key)
    report = replay_receipt(world.sampled, "smollm2")
    assert report.output_equal and report.anchors_bitwise_equal, report.summary()
    changed = copy.deepcopy(world.sampled)
    changed["sampling"]["seed"] = 12  # another seed draws other tokens (the receipt no longer verifies either)
    assert not replay_receipt(changed, "smollm2").output_equal
    # a request without a seed is logged with the seed it drew, in its entry and its receipt alike
    seed = world.unseeded["sampling"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**63
    verify_receipt(world.unseeded, world.log_key)
    assert replay_receipt(world.unseeded, "smollm2").output_equal
    assert world.plain["sampling"]["seed"] is None  # greedy draws nothing


def test_replay_refuses_sampling_parameters_it_cannot_run():
    ok = {"temperature": "0.7", "top_p": "0.9", "top_k": 5, "seed": 3}
    assert _replay_params(ok, 4) == SamplingParams(temperature=0.7, top_p=0.9, top_k=5, seed=3, max_tokens=4, ignore_eos=True)
    for bad in ({"top_p": "2.0"}, {"top_k": -1}, {"seed": "3"}, {"temperature": "-1.0"}, {"temperature": "warm"},
                {"top_p": None}):
        with pytest.raises(ReceiptError, match="cannot be replayed"):
            _replay_params(ok | bad, 4)
    with pytest.raises(ReceiptError, match="unseeded sampled generation cannot be replayed"):
        _replay_params(ok | {"seed": None}, 4)  # a receipt from before the engine logged drawn seeds
    with pytest.raises(ReceiptError, match="cannot be replayed"):
        _replay_params({"temperature": "0.5"}, 4)  # fields missing


def test_an_edited_seed_is_refused(world):
    for r in (world.sampled, world.unseeded):
        changed = copy.deepcopy(r)
        changed["sampling"]["seed"] += 1
        _refused(changed, world.log_key, "sampling parameters differ from the generation entry")
