"""Our forward against transformers' on the same weights; prefill/decode/chunking equivalence; the CPU
attention path against the Triton kernels; the loader's refusals; the KV cache's block accounting."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from fieldprint.engine.attention import AttentionContext, KVCache, torch_paged_attention
from fieldprint.engine.kv_cache import AnchorPool, BlockManager
from fieldprint.engine.loader import load_model
from fieldprint.errors import EngineError, ModelError
from fieldprint.kernels.paged_attention import AnchorRouting, paged_attention_decode, paged_attention_prefill

# fp32 on both sides: what differs is summation order (observed: 2e-5..1e-4 on the tiny models, 7e-5
# on SmolLM2). A wrong RoPE theta or scaling, a dropped bias or q/k norm moves them by 6..25 (logit
# std ~3), so these bounds leave four orders of magnitude on either side.
TINY_TOL = 1e-3
SMOL_TOL = 2e-3


def _prompt(tok, text: str) -> list[int]:
    chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return list(tok(chat, add_special_tokens=False)["input_ids"])


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0].float()


def _one_shot(runner, engine_ops, ids: list[int]) -> torch.Tensor:
    seq = engine_ops.new_seq(ids)
    return engine_ops.step(runner, [seq], [len(ids)])


TEXT = ("Explain, step by step, why the sky is blue at noon and red at sunset; mention Rayleigh scattering, "
        "the path length of light through the atmosphere, and what an observer on the Moon would see instead.")


# -- 1. logits and greedy tokens equal transformers' ---------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "llama-gqa3", "llama3-rope", "mistral", "qwen2", "qwen3"])
def test_tiny_logits_equal_transformers(name, tiny_model, make_runner, engine_ops):
    lm, hf = tiny_model(name)
    ids = _prompt(lm.tokenizer, TEXT)
    assert len(ids) > 64  # past llama3-rope's original_max_position_embeddings (32)
    ours = _one_shot(make_runner(lm), engine_ops, ids)
    ref = _hf_logits(hf, ids)
    diff = (ours - ref).abs().max().item()
    assert diff < TINY_TOL, f"{name}: max |dlogit| = {diff:.3g} over {len(ids)} positions (logit scale {ref.std():.3g})"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
def test_smollm2_logits_equal_transformers(smollm2, smollm2_hf, make_runner, engine_ops, one_thread):
    lm = smollm2.lm
    assert (lm.args.num_heads, lm.args.num_kv_heads) == (9, 3)  # group 3
    ids = _prompt(lm.tokenizer, TEXT)
    ours = _one_shot(make_runner(lm, block_size=16), engine_ops, ids)
    ref = _hf_logits(smollm2_hf, ids)
    diff = (ours - ref).abs().max().item()
    assert diff < SMOL_TOL, f"SmolLM2: max |dlogit| = {diff:.3g} over {len(ids)} positions"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
def test_smollm2_greedy_256_tokens_equal_transformers(smollm2, smollm2_hf, make_runner, engine_ops, one_thread):
    """256 greedy tokens through the runner (prefill, then decode steps) are transformers' greedy tokens.

    transformers' side is one teacher-forced forward over prompt + our tokens: its greedy `generate`
    yields our sequence exactly when its argmax at every position is our next token (a full
    `generate` on this CPU costs minutes and would test the same thing). The first 16 tokens are
    also checked against `generate` itself.
    """
    lm = smollm2.lm
    ids = _prompt(lm.tokenizer, "Tell me about the Moon: its size, its orbit, and how it formed.")
    seq = engine_ops.new_seq(ids, max_tokens=256)
    start = time.perf_counter()
    engine_ops.greedy(make_runner(lm, block_size=16), [seq], 256)
    took = time.perf_counter() - start
    out = seq.output_ids
    assert len(out) == 256
    ref = _hf_logits(smollm2_hf, ids + out[:-1])[len(ids) - 1:]
    hf_next = ref.argmax(-1).tolist()
    first = next((i for i, (a, b) in enumerate(zip(out, hf_next)) if a != b), None)
    assert first is None, (f"position {first}: ours {out[first]} vs transformers {hf_next[first]} "
                           f"(top-2 margin {ref[first].topk(2).values.diff().abs().item():.3g})")
    with torch.inference_mode():
        gen = smollm2_hf.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert gen[0, len(ids):].tolist() == out[:16]
    print(f"SmolLM2: 256 greedy tokens in {took:.1f} s ({1000 * took / 256:.0f} ms/token)")


# -- 2. prefill then decode, chunked prefill, batching: all equal one-shot prefill -----------------------
@pytest.mark.parametrize("name", ["llama-gqa3", "qwen3"])
def test_prefill_decode_and_chunks_equal_one_shot(name, tiny_model, make_runner, engine_ops):
    lm, _ = tiny_model(name)
    ids = _prompt(lm.tokenizer, TEXT)[:61]
    one_shot = _one_shot(make_runner(lm), engine_ops, ids)

    runner = make_runner(lm)  # block_size 4: chunks and decode steps cross block boundaries
    seq = engine_ops.new_seq(ids)
    rows = [engine_ops.step(runner, [seq], [20])]
    rows += [engine_ops.step(runner, [seq], [1]) for _ in range(len(ids) - 20)]
    decoded = torch.cat(rows)
    d = (decoded - one_shot).abs().max().item()
    assert d < 1e-4, f"prefill(20) + {len(ids) - 20} decode steps vs one-shot: max |dlogit| = {d:.3g}"

    runner = make_runner(lm)
    seq = engine_ops.new_seq(ids)
    sizes = [7, 5, 13, 1, 16, 19]
    assert sum(sizes) == len(ids)
    chunked = torch.cat([engine_ops.step(runner, [seq], [n]) for n in sizes])
    d = (chunked - one_shot).abs().max().item()
    assert d < 1e-4, f"chunks {sizes} vs one-shot: max |dlogit| = {d:.3g}"


def test_mixed_batch_equals_each_sequence_alone(tiny_model, make_runner, engine_ops):
    """One step holding a decode, a chunk and a fresh prefill gives each sequence its solo logits."""
    lm, _ = tiny_model("llama")
    a, b, c = (_prompt(lm.tokenizer, t) for t in ("Hello there.", TEXT, "What is 2 + 2?"))
    solo = [_one_shot(make_runner(lm), engine_ops, x) for x in (a, b, c)]
    runner = make_runner(lm)
    sa, sb, sc = engine_ops.new_seq(a), engine_ops.new_seq(b), engine_ops.new_seq(c)
    engine_ops.step(runner, [sa, sb], [len(a) - 1, 10])
    got = engine_ops.step(runner, [sa, sb, sc], [1, 9, len(c)])
    want = torch.cat([solo[0][-1:], solo[1][10:19], solo[2]])
    d = (got - want).abs().max().item()
    assert d < 1e-4, f"mixed batch vs solo: max |dlogit| = {d:.3g}"


# -- 3. the CPU attention path equals the Triton kernels (interpreted) on the same context ---------------
def _attention_case(dtype: torch.dtype, anchors: str, decode: bool):
    """A two-layer cache with shuffled blocks, three sequences, two anchor sets (one sequence reads none)."""
    g = torch.Generator().manual_seed(7)
    L, nb, bs, hkv, hq, d = 2, 24, 8, 2, 6, 32  # group 3
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    if anchors == "int8":
        ak = torch.randint(-127, 128, (L, 8, bs, hkv, d), generator=g, dtype=torch.int8)
        av = torch.randint(-127, 128, (L, 8, bs, hkv, d), generator=g, dtype=torch.int8)
        k_scale = torch.exp2(torch.randint(-9, -5, (L, hkv, d), generator=g).float())
        v_exp = torch.randint(-12, -3, (L, 8, bs, hkv), generator=g, dtype=torch.int8)  # per (token, head) row
        cache = KVCache(rnd(L, nb, bs, hkv, d), rnd(L, nb, bs, hkv, d), ak, av, k_scale, v_exp)
    else:
        cache = KVCache(rnd(L, nb, bs, hkv, d), rnd(L, nb, bs, hkv, d), rnd(L, 8, bs, hkv, d), rnd(L, 8, bs, hkv, d))
    lens = [13, 30, 7]
    new = [1, 1, 1] if decode else [5, 30, 1]  # a chunk, a whole prompt, one token
    perm = (torch.randperm(nb - 1, generator=g) + 1).tolist()
    tables = torch.zeros((3, 4), dtype=torch.int32)
    for i, n in enumerate(lens):
        k = -(-n // bs)
        tables[i, :k] = torch.tensor(perm[:k], dtype=torch.int32)
        perm = perm[k:]
    if anchors == "none":
        atable, alens, which = torch.zeros((0, 3), dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    else:
        atable = torch.tensor([[5, 2, 0], [7, 1, 3]], dtype=torch.int32)  # 11 and 20 tokens
        alens, which = torch.tensor([11, 20], dtype=torch.int32), torch.tensor([1, -1, 0], dtype=torch.int32)
    cu = torch.tensor([0, *np.cumsum(new)], dtype=torch.int32)
    ctx = AttentionContext(cache, is_prefill=not decode, slot_mapping=torch.zeros(sum(new), dtype=torch.int64),
                           block_tables=tables, context_lens=torch.tensor(lens, dtype=torch.int32), cu_seqlens_q=cu,
                           max_seqlen_q=max(new), routing=AnchorRouting(atable, alens, which),
                           check=True)
    return rnd(sum(new), hq, d), ctx


@pytest.mark.parametrize("anchors", ["none", "model", "int8"])
@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cpu_attention_equals_triton_kernels(dtype, decode, anchors):
    q, ctx = _attention_case(dtype, anchors, decode)
    layer, c = 1, ctx.cache
    ours = torch_paged_attention(q, layer, ctx)
    if decode:
        ref = paged_attention_decode(q, c.k[layer], c.v[layer], ctx.block_tables, ctx.context_lens, *ctx.anchors(layer))
    else:
        ref = paged_attention_prefill(q, ctx.cu_seqlens_q, c.k[layer], c.v[layer], ctx.block_tables, ctx.context_lens,
                                      *ctx.anchors(layer), max_seqlen_q=ctx.max_seqlen_q)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    d = (ours.float() - ref.float()).abs().max().item()
    assert d < tol, f"{dtype} {'decode' if decode else 'prefill'} anchors={anchors}: max |dout| = {d:.3g}"
    # the anchors are really read: dropping them changes the output of the sequences that have them
    if anchors != "none":
        ctx.routing.seq_anchor_set = torch.full_like(ctx.routing.seq_anchor_set, -1)
        bare = torch_paged_attention(q, layer, ctx)
        assert (bare.float() - ours.float()).abs().max().item() > 100 * tol


# -- 6. the loader refuses bad input with a ModelError that names the problem --------------------------
def _copy_model_folder(lm, dst) -> str:
    import shutil

    shutil.copytree(lm.source, dst, ignore=shutil.ignore_patterns(".fieldprint"))
    return str(dst)


def test_loader_refuses_an_unknown_architecture_and_unsupported_attention(tmp_path):
    from transformers import GPT2Config, LlamaConfig, MistralConfig

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelError, match="model_type 'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"):
        load_model(str(tmp_path / "gpt2"), device="cpu")
    MistralConfig(sliding_window=4096).save_pretrained(tmp_path / "mistral")
    with pytest.raises(ModelError, match=r"sliding-window attention \(window 4096\) is not supported"):
        load_model(str(tmp_path / "mistral"), device="cpu")
    LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0}).save_pretrained(tmp_path / "yarn")
    with pytest.raises(ModelError, match="RoPE type 'yarn' is not supported"):
        load_model(str(tmp_path / "yarn"), device="cpu")


def test_loader_refuses_missing_truncated_and_incomplete_weights(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    lm, _ = tiny_model("llama")
    missing = _copy_model_folder(lm, tmp_path / "missing")
    os.remove(os.path.join(missing, "model.safetensors"))
    with pytest.raises(ModelError, match=r"holds config.json but no \*.safetensors"):
        load_model(missing, device="cpu")

    truncated = _copy_model_folder(lm, tmp_path / "truncated")
    f = os.path.join(truncated, "model.safetensors")
    os.truncate(f, os.path.getsize(f) // 2)
    with pytest.raises(ModelError, match="model.safetensors is unreadable or truncated"):
        load_model(truncated, device="cpu")

    incomplete = _copy_model_folder(lm, tmp_path / "incomplete")
    f = os.path.join(incomplete, "model.safetensors")
    tensors = load_file(f)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"lack tensor 'layers.1.self_attn.k_proj.weight'"):
        load_model(incomplete, device="cpu")


def test_loader_refuses_folders_without_a_model(tmp_path):
    with pytest.raises(ModelError, match="has no config.json .* and not exactly one .gguf"):
        load_model(str(tmp_path), device="cpu")
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelError, match="not exactly one .gguf"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(ModelError, match="neither a folder, a .gguf file nor 'smollm2'"):
        load_model(str(tmp_path / "nowhere"), device="cpu")


def _gguf_like_smollm2(path, tensors: dict[str, np.ndarray]) -> None:
    """A GGUF holding SmolLM2's metadata (config, tokenizer, chat template) and the given tensors."""
    import gguf

    from fieldprint.engine.loader import resolve_source

    folder, name = resolve_source("smollm2")
    reader = gguf.GGUFReader(os.path.join(folder, name))
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    for tname, data in tensors.items():
        writer.add_tensor(tname, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.slow
def test_loader_refuses_unsupported_and_truncated_gguf(tmp_path):
    bad = tmp_path / "int.gguf"
    _gguf_like_smollm2(bad, {"token_embd.weight": np.arange(64 * 16, dtype=np.int32).reshape(64, 16)})
    with pytest.raises(ModelError, match=r"holds tensor types \['I32'\]; supported: "):
        load_model(str(bad), device="cpu")
    cut = tmp_path / "cut.gguf"
    data = bad.read_bytes()
    cut.write_bytes(data[: len(data) - 1000])  # the tensor data ends early
    with pytest.raises(ModelError, match=r"GGUF file .*cut\.gguf is unreadable or truncated"):
        load_model(str(cut), device="cpu")


# -- 7. the KV cache: a full pool refuses without touching anyone's blocks; pinned anchor sets stay -----
def test_block_manager_full_raises_and_leaves_tables_untouched():
    bm = BlockManager(num_blocks=9, block_size=4)  # block 0 is kept back: 8 usable
    a, b = [], []
    bm.grow(a, 13)  # 4 blocks
    bm.grow(b, 9)  # 3 blocks
    assert 0 not in a + b and len(set(a + b)) == 7 and bm.num_free == 1
    before = (list(a), list(b), list(bm.free))
    c = []
    with pytest.raises(EngineError, match=r"the KV cache is full: 2 more block\(s\) needed, 1 free of 8"):
        bm.grow(c, 5)
    with pytest.raises(EngineError, match="KV cache is full"):
        bm.grow(a, 13 + 8)  # a growing past what is free keeps its blocks too
    assert (a, b, bm.free, c) == (*before, [])
    bm.release(a)
    assert a == [] and bm.num_free == 5
    bm.grow(c, 20)
    assert set(c).isdisjoint(b) and bm.num_free == 0


def test_anchor_pool_pins_evicts_lru_and_refuses_when_pinned():
    pool = AnchorPool(num_blocks=6, block_size=4)
    x, y = pool.reserve("x", 8), pool.reserve("y", 5)  # 2 blocks each
    pool.pin("x")
    pool.get("y")  # y used after x: x is the least recently used, but pinned
    z = pool.reserve("z", 16)  # 4 blocks: 2 free, evicts y (unpinned), never x
    assert set(pool.sets) == {"x", "z"} and set(z.blocks) >= set(y.blocks) - set(x.blocks)
    assert set(x.blocks).isdisjoint(z.blocks)
    # 5 blocks cannot be had even by evicting z (4): refused, and z stays cached
    with pytest.raises(EngineError, match=r"anchor pool is full: 5 blocks needed, 0 free, 2 pinned"):
        pool.reserve("v", 20)
    assert set(pool.sets) == {"x", "z"} and pool.get("z") is z
    pool.pin("z")
    with pytest.raises(EngineError, match=r"anchor pool is full: 1 blocks needed, 0 free, 6 pinned"):
        pool.reserve("w", 1)
    with pytest.raises(EngineError, match="read by 1 running sequence"):
        pool.evict("x")
    with pytest.raises(EngineError, match="needs 7 blocks; the anchor pool has 6"):
        pool.reserve("huge", 25)
    with pytest.raises(EngineError, match="already in the pool"):
        pool.reserve("x", 4)
    assert set(pool.sets) == {"x", "z"} and pool.sets["x"].blocks == x.blocks
    pool.unpin("x")
    with pytest.raises(EngineError, match="is not pinned"):
        pool.unpin("x")
    w = pool.reserve("w", 4)  # now x may leave
    assert set(pool.sets) == {"z", "w"} and w.blocks[0] in x.blocks


def test_a_damaged_model_id_cache_is_recomputed_not_trusted(tiny_model):
    import glob
    import json
    import os

    lm, _ = tiny_model("llama")
    folder = os.path.dirname(glob.glob(os.path.join(lm.source, ".fieldprint", "*", "model-id.json"))[0])
    path = os.path.join(folder, "model-id.json")
    for damaged in ('{"weights": 5}', '{"weights": "blake3:zz"}', "{", ""):
        with open(path, "w") as f:
            f.write(damaged)
        again = load_model(lm.source, device="cpu")
        assert again.model_id == lm.model_id and again.weights_digest == lm.weights_digest
        with open(path) as f:
            assert json.load(f)["weights"] == lm.weights_digest  # and the cache is written afresh
