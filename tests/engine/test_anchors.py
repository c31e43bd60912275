"""System Anchor Tokens: compiled anchors condition the model exactly as the same text as a prompt prefix
does; tampered or oversized anchor sets are refused with an AnchorError that names what is wrong."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from fieldprint.engine.anchors import AnchorCompiler, anchor_text, calibrate_profile, split_prompt
from fieldprint.engine.commit import Committer
from fieldprint.errors import AnchorError

FACTS = ["The user's name is Ada.", "Ada is allergic to peanuts.", "Ada lives in Lisbon and hikes every Saturday."]
QUESTION = [{"role": "user", "content": "Suggest a snack for my hike tomorrow, in one sentence."}]


@pytest.fixture
def make_compiler(log, make_runner, tmp_path):
    """make_compiler(lm, anchor_dtype, **runner overrides) -> AnchorCompiler on a fresh runner, one shared log.

    Each call is a fresh engine (a restart): a new runner and pool; the log and the set folder stay.
    """
    committers = []

    def make(lm, anchor_dtype: str = "model", **overrides) -> AnchorCompiler:
        runner = make_runner(lm, anchor_dtype=anchor_dtype, block_size=16, **overrides)
        profile = calibrate_profile(runner, "test") if anchor_dtype == "int8" else None
        committers.append(Committer(log, profile) if profile is not None else None)
        return AnchorCompiler(runner, log, committers[-1], profile, str(tmp_path / "anchor-sets"))

    yield make
    for c in committers:
        if c is not None:
            c.close()


def _acquire(compiler: AnchorCompiler, engine_ops, texts: list[str] = FACTS):
    return compiler.acquire([engine_ops.state_id(t) for t in texts], texts)


# -- 4. anchors in the cache = the same text as a prompt prefix ------------------------------------------
@pytest.mark.parametrize("model", ["llama-gqa3", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_model_dtype_anchors_equal_the_text_as_prompt_prefix(model, request, tiny_model, make_compiler, engine_ops,
                                                             one_thread):
    lm = request.getfixturevalue("smollm2").lm if model == "smollm2" else tiny_model(model)[0]
    compiler = make_compiler(lm, "model")
    runner = compiler.runner
    cs = _acquire(compiler, engine_ops)
    prefix, own = split_prompt(lm.tokenizer, anchor_text(FACTS), QUESTION)
    assert prefix == cs.tokens and len(prefix) % 16  # the set ends inside a block
    as_text = engine_ops.new_seq(prefix + own)
    anchored = engine_ops.new_seq(own, anchor_key=cs.key, anchor_len=len(prefix))
    bare = engine_ops.new_seq(own)  # the control: the anchors must change something
    runner.anchor_pool.pin(cs.key)
    steps = engine_ops.greedy(runner, [as_text, anchored, bare], 24)
    d = max((s[0] - s[1]).abs().max().item() for s in steps)
    assert d < 1e-3, f"{model}: anchors vs prompt prefix, max |dlogit| over 24 steps = {d:.3g}"
    assert anchored.output_ids == as_text.output_ids
    assert max((s[0] - s[2]).abs().max().item() for s in steps) > 1.0


def test_an_anchored_prompt_prefilled_in_chunks_equals_the_text_prefix(tiny_model, make_compiler, engine_ops):
    """Chunks and decode steps of an anchored sequence see the anchors at positions 0..A-1, as one-shot does."""
    lm, _ = tiny_model("qwen3")
    compiler = make_compiler(lm, "model")
    runner = compiler.runner
    cs = _acquire(compiler, engine_ops)
    prefix, own = split_prompt(lm.tokenizer, anchor_text(FACTS), QUESTION)
    as_text = engine_ops.new_seq(prefix + own)
    want = engine_ops.step(runner, [as_text], [len(as_text)])[len(prefix):]
    anchored = engine_ops.new_seq(own, anchor_key=cs.key, anchor_len=len(prefix))
    runner.anchor_pool.pin(cs.key)
    sizes = [3, 9, 1, len(own) - 14, 1]
    got = torch.cat([engine_ops.step(runner, [anchored], [n]) for n in sizes])
    d = (got - want).abs().max().item()
    assert d < 1e-3, f"anchored chunks {sizes} vs the text as prefix: max |dlogit| = {d:.3g}"


# -- reuse and persistence ---------------------------------------------------------------------------
@pytest.mark.parametrize("anchor_dtype", ["model", "int8"])
def test_sets_are_reused_and_reloaded_without_recompiling(anchor_dtype, tiny_model, make_compiler, engine_ops, log):
    lm, _ = tiny_model("llama")
    first = make_compiler(lm, anchor_dtype)
    cs = _acquire(first, engine_ops)
    size = log.size
    assert _acquire(first, engine_ops) is cs and log.size == size  # reused from the pool
    assert _acquire(first, engine_ops, FACTS[::-1]).key != cs.key  # order matters: another set
    size = log.size
    # A writer killed while saving a set left its temporary; the restart sweeps it and reads the whole file.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = os.path.join(first.folder, f".{cs.key}.fpas.{dead.pid}.a1b2c3d4.tmp")
    with open(leftover, "wb") as f:
        f.write(b"half a set")
    again = _acquire(make_compiler(lm, anchor_dtype), engine_ops)  # a restart: read from its file and verified
    assert log.size == size and (again.key, again.index, again.entry) == (cs.key, cs.index, cs.entry)
    assert not os.path.exists(leftover)


# -- 5. tampering ---------------------------------------------------------------------------------------
def _set_file(compiler: AnchorCompiler, key: str) -> str:
    (path,) = glob.glob(os.path.join(compiler.folder, key + ".fpas"))
    return path


def _body_offset(data: bytes) -> int:
    """Where the K/V bytes begin: after the magic line and the one-line JSON head."""
    magic = data.index(b"\n") + 1
    return data.index(b"\n", magic) + 1


@pytest.mark.parametrize("anchor_dtype", ["model", "int8"])
def test_a_flipped_byte_in_a_set_file_is_refused_naming_the_block(anchor_dtype, tiny_model, make_compiler,
                                                                   engine_ops, log):
    lm, _ = tiny_model("llama")
    cs = _acquire(make_compiler(lm, anchor_dtype), engine_ops)
    restarted = make_compiler(lm, anchor_dtype)
    path = _set_file(restarted, cs.key)
    data = bytearray(open(path, "rb").read())
    c = restarted.runner.cache
    h, d, size = c.anchor_k.shape[3], c.anchor_k.shape[4], c.anchor_k.element_size()
    k_token = h * d * size
    v_token = h * (d + 1) * size if anchor_dtype == "int8" else k_token  # int8 V: the row layout, D codes + exponent
    length = len(cs.tokens)
    assert length > 20
    layer, kind, token = 1, "V", 20  # token 20 lies in block 1 (16 tokens a block)
    at = _body_offset(data) + layer * length * (k_token + v_token) + length * k_token + token * v_token + 3
    data[at] ^= 0x10
    open(path, "wb").write(data)
    size = log.size
    with pytest.raises(AnchorError, match=f"layer {layer} {kind} block 1 differs from what was committed "
                                          f"\\(log leaf {cs.index}\\)"):
        _acquire(restarted, engine_ops)
    assert restarted.runner.anchor_pool.get(cs.key) is None and not restarted.runner.anchor_pool.sets
    assert log.size == size  # a refused file is not recompiled behind the caller's back


@pytest.mark.parametrize("anchor_dtype", ["model", "int8"])
def test_a_truncated_or_damaged_set_file_is_refused(anchor_dtype, tiny_model, make_compiler, engine_ops):
    lm, _ = tiny_model("llama")
    cs = _acquire(make_compiler(lm, anchor_dtype), engine_ops)
    restarted = make_compiler(lm, anchor_dtype)
    path = _set_file(restarted, cs.key)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-7])
    with pytest.raises(AnchorError, match=r"is truncated or padded \(\d+ bytes of K/V, expected \d+\); delete it"):
        _acquire(restarted, engine_ops)
    open(path, "wb").write(data[: _body_offset(data) // 2])  # cut inside the JSON head
    with pytest.raises(AnchorError, match="is unreadable or damaged"):
        _acquire(restarted, engine_ops)
    assert not restarted.runner.anchor_pool.sets


def test_a_set_file_with_forged_tokens_is_refused(tiny_model, make_compiler, engine_ops):
    """The token list travels in the file's head: it must match the committed manifest's token digest."""
    lm, _ = tiny_model("llama")
    cs = _acquire(make_compiler(lm), engine_ops)
    restarted = make_compiler(lm)
    path = _set_file(restarted, cs.key)
    data = open(path, "rb").read()
    magic = data.index(b"\n") + 1
    head = json.loads(data[magic : _body_offset(data)])
    head["tokens"][3] += 1
    open(path, "wb").write(data[:magic] + json.dumps(head).encode() + b"\n" + data[_body_offset(data):])
    with pytest.raises(AnchorError, match="its token list does not match the manifest's token digest"):
        _acquire(restarted, engine_ops)
    assert not restarted.runner.anchor_pool.sets


def test_a_set_file_of_another_block_size_is_refused_as_such(tiny_model, make_compiler, engine_ops, make_runner, log,
                                                             tmp_path):
    """Not reported as tampering: the file is intact, the engine's cache block size changed."""
    lm, _ = tiny_model("llama")
    cs = _acquire(make_compiler(lm), engine_ops)
    runner = make_runner(lm, block_size=8)
    compiler = AnchorCompiler(runner, log, None, None, str(tmp_path / "anchor-sets"))
    with pytest.raises(AnchorError, match="was compiled with cache block size 16; this engine uses 8: delete it"):
        _acquire(compiler, engine_ops)
    assert compiler.key([engine_ops.state_id(t) for t in FACTS], list(FACTS)) == cs.key and not runner.anchor_pool.sets


@pytest.mark.parametrize("anchor_dtype", ["model", "int8"])
def test_a_flipped_byte_in_the_pool_is_refused_naming_the_block(anchor_dtype, tiny_model, make_compiler, engine_ops):
    lm, _ = tiny_model("llama")
    compiler = make_compiler(lm, anchor_dtype)
    cs = _acquire(compiler, engine_ops)
    slot = compiler.runner.anchor_pool.get(cs.key)
    compiler.verify(cs, slot.blocks)  # intact: passes
    pool = compiler.runner.cache.anchor_k
    raw = pool[0, slot.blocks[1]].view(torch.uint8).view(-1)  # layer 0, K, the set's second block
    raw[5] ^= 0x01
    with pytest.raises(AnchorError, match=f"anchor set {cs.key[:16]}: layer 0 K block 1 differs .* nothing is attended to"):
        compiler.verify(cs, slot.blocks)


def test_int8_anchors_refuse_a_profile_without_per_row_v(tiny_model, make_runner, log):
    lm, _ = tiny_model("llama")
    runner = make_runner(lm, anchor_dtype="int8", block_size=16)
    channels = calibrate_profile(runner, "test", v_granularity="channel")
    with pytest.raises(AnchorError, match="scales V per token \\(format 3\\); profile 'test' scales it per channel"):
        AnchorCompiler(runner, log, None, channels, None)


def test_a_moved_v_row_exponent_is_refused_in_the_pool_and_in_the_set_file(tiny_model, make_compiler, engine_ops,
                                                                          log):
    """The exponents are attended to as much as the codes: each is hashed with its row."""
    lm, _ = tiny_model("llama")
    compiler = make_compiler(lm, "int8")
    cs = _acquire(compiler, engine_ops)
    slot = compiler.runner.anchor_pool.get(cs.key)
    v_exp = compiler.runner.cache.anchor_v_exp
    v_exp[1, slot.blocks[1], 4, 0] += 1  # layer 1, V, the set's second block: that row's values double
    with pytest.raises(AnchorError, match=f"layer 1 V block 1 differs from what was committed \\(log leaf {cs.index}\\)"):
        compiler.verify(cs, slot.blocks)
    v_exp[1, slot.blocks[1], 4, 0] -= 1
    compiler.verify(cs, slot.blocks)

    restarted = make_compiler(lm, "int8")
    path = _set_file(restarted, cs.key)
    data = bytearray(open(path, "rb").read())
    c = restarted.runner.cache
    h, d = c.anchor_k.shape[3], c.anchor_k.shape[4]
    length = len(cs.tokens)
    # layer 0's K, then its V rows: token 17's first head's exponent is the last byte of that row
    at = _body_offset(data) + length * h * d + 17 * h * (d + 1) + d
    data[at] = (data[at] + 1) % 256
    open(path, "wb").write(data)
    with pytest.raises(AnchorError, match="layer 0 V block 1 differs"):
        _acquire(restarted, engine_ops)
    assert not restarted.runner.anchor_pool.sets


def test_anchors_longer_than_max_anchor_len_are_refused_and_nothing_is_logged(tiny_model, make_compiler,
                                                                             engine_ops, log, tmp_path):
    lm, _ = tiny_model("llama")
    compiler = make_compiler(lm, "int8", max_anchor_len=32)
    size = log.size
    with pytest.raises(AnchorError, match=r"the anchors are \d+ tokens; the engine takes at most 32 \(max_anchor_len\)"):
        _acquire(compiler, engine_ops)
    log.flush()
    assert log.size == size
    assert not compiler.runner.anchor_pool.sets and compiler.runner.anchor_pool.num_blocks == len(compiler.runner.anchor_pool.free)
    assert not glob.glob(str(tmp_path / "anchor-sets" / "*"))


def test_anchors_that_cannot_be_committed_are_refused_and_nothing_is_logged(tiny_model, make_compiler, engine_ops,
                                                                           log, tmp_path):
    """A NaN in one layer's V (a poisoned weight): the committer refuses the stack, the compile fails naming
    the layer, and neither the log, the anchor pool nor the sequence pool keeps anything of it."""
    lm, _ = tiny_model("llama")
    compiler = make_compiler(lm, "int8")
    runner = compiler.runner
    weight = lm.model.layers[1].self_attn.qkv_proj.weight
    saved = weight.clone()
    free, size = runner.blocks.num_free, log.size
    try:
        weight[-1] = float("nan")  # the last V channel of layer 1
        with pytest.raises(AnchorError, match=r"cannot be committed: .*layer 1 V .* NaN"):
            _acquire(compiler, engine_ops)
    finally:
        weight.copy_(saved)
    log.flush()
    assert log.size == size and runner.blocks.num_free == free
    assert not runner.anchor_pool.sets and not glob.glob(str(tmp_path / "anchor-sets" / "*"))
    assert _acquire(compiler, engine_ops).index >= size  # the same set compiles once the weights are whole
