"""Our forward vs HF transformers' on the same random bf16 weights: prefill, decode, anchors, compile/verify.

Llama-3.2-1B and Llama-3-8B shapes (configs written out below; random weights, no checkpoint):
the HF model is built from its config on the device, and its state_dict goes through
fieldprint.engine.loader.build_model, so both forwards read the very same weights.

- parity: our logits vs HF's at the end of a prefill and over greedy decode steps (sanity check);
- prefill tokens/s, one sequence of 2k and 8k tokens: our ModelRunner vs HF (SDPA), ours also
  after a 2k-token int8 anchor set;
- decode step time at batch 1/8/32, context 2k: our runner (CUDA graphs) vs HF with a
  StaticCache; ours with the anchor set vs HF with the same number of tokens as a plain prefix;
- anchors: compile a 2k-token set through AnchorCompiler (prefill, DQP int8 into the anchor pool,
  per-block digests, commit through the Committer, signed checkpoint, re-hash check) and verify it.

A step is timed from its first host instruction to its sampled token (argmax) on the device:
CUDA events around it, medians of repeats (perf_counter on the CPU). --smoke runs tiny configs
on the CPU in seconds: it checks the script, its timings mean nothing.
    python benchmarks/engine_bench.py [--smoke] [--models llama-3.2-1b,llama-3-8b] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

import blake3
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fieldprint.canon import canonical_json, tag_digest
from fieldprint.dqp_profile import DQPProfile
from fieldprint.engine.anchors import AnchorCompiler, anchor_text, prefill_kv, split_prompt
from fieldprint.engine.commit import Committer
from fieldprint.engine.engine import EngineConfig
from fieldprint.engine.kv_cache import cdiv
from fieldprint.engine.loader import LoadedModel, build_model, tokenizer_digest
from fieldprint.engine.model import ModelArgs
from fieldprint.engine.runner import ModelRunner, RunnerConfig
from fieldprint.engine.sequence import SamplingParams, Sequence
from fieldprint.ledger.log import TransparencyLog
from fieldprint.ledger.note import generate_key

BLOCK = 16
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


def arch(model_type: str, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, ffn: int, vocab: int,
         max_pos: int, rope: dict, tied: bool, eps: float = 1e-5) -> dict:
    """An HF config, written out by hand (no model hub on the GPU machine)."""
    return {"model_type": model_type, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": head_dim, "intermediate_size": ffn, "vocab_size": vocab,
            "max_position_embeddings": max_pos, "rope_parameters": rope, "tie_word_embeddings": tied, "rms_norm_eps": eps}


def rope(theta: float) -> dict:
    return {"rope_type": "default", "rope_theta": theta}


CONFIGS = {
    "llama-3.2-1b": arch("llama", 2048, 16, 32, 8, 64, 8192, 128256, 131072, LLAMA3_ROPE, tied=True),
    "llama-3-8b": arch("llama", 4096, 32, 32, 8, 128, 14336, 128256, 8192, rope(500000.0), tied=False),
    "qwen3-0.6b": arch("qwen3", 1024, 28, 16, 8, 128, 3072, 151936, 40960, rope(1000000.0), tied=True, eps=1e-6),
    "llama-3-70b": arch("llama", 8192, 80, 64, 8, 128, 28672, 128256, 8192, rope(500000.0), tied=False),  # tp_bench, TP=2
    # --smoke: the same families (llama3 RoPE, untied head, q/k norm), small enough for a CPU; the untied one's
    # 128-token context is shorter than its longest prefill after the anchors, so that skip is exercised too
    "tiny-llama": arch("llama", 64, 2, 4, 2, 16, 128, 1024, 16384, LLAMA3_ROPE, tied=True),
    "tiny-llama-untied": arch("llama", 96, 2, 6, 2, 16, 160, 1024, 128, rope(500000.0), tied=False),
    "tiny-qwen3": arch("qwen3", 64, 2, 4, 2, 32, 128, 1024, 4096, rope(1000000.0), tied=True, eps=1e-6),
}
FULL = {"models": "llama-3.2-1b,llama-3-8b", "prefill": (2048, 8192), "batches": (1, 8, 32), "context": 2048,
        "anchors": 2048, "anchor_states": 8, "repeats": 5, "decode_repeats": 20, "compile_repeats": 3,
        "parity_prompt": 512, "parity_steps": 16}
SMOKE = {"models": "tiny-llama,tiny-llama-untied", "prefill": (48, 96), "batches": (1, 2, 4), "context": 40,
         "anchors": 48, "anchor_states": 3, "repeats": 2, "decode_repeats": 3, "compile_repeats": 2,
         "parity_prompt": 40, "parity_steps": 4}


def log(msg: str) -> None:
    """A progress line, flushed (the GPU script's output is read as it comes)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def meta(device: torch.device, smoke: bool) -> dict:
    """What the numbers were measured on: device, library versions, date."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": name, "device_type": device.type, "torch": torch.__version__, "triton": triton_version,
            "transformers": transformers.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "smoke": smoke, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


# -- timing ------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of fn() (CUDA events on a GPU that was idle when each call began)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def wall_s(fn, device: torch.device):
    """(fn(), seconds) with the device synchronized on both sides."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


# -- models with shared random weights -----------------------------------------------------------
def word_tokenizer(vocab_size: int):
    """A whitespace word-level tokenizer ('w<id>' is token id) with a plain chat template.

    Random weights have no tokenizer of their own; this one lets the real anchor compiler render
    and tokenize anchor texts through a chat template, with token counts known exactly.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = min(vocab_size - 1, 32000)
    vocab = {f"w{i}": i for i in range(words)}
    vocab["<unk>"] = words
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </{{ m['role'] }}> {% endfor %}"
                "{% if add_generation_prompt %}<assistant> {% endif %}")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", chat_template=template)
    tok.bench_words = words
    return tok


def hf_config(name: str):
    from transformers import AutoConfig

    kw = dict(CONFIGS[name])
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def build_pair(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(HF model, our LoadedModel) over the same random weights; HF is initialized on the device."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(name)
    torch.manual_seed(seed)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    hf.eval()
    args = ModelArgs.from_hf(cfg)
    model = build_model(args, dict(hf.state_dict()), device, dtype)
    tok = word_tokenizer(args.vocab_size)
    # Random weights have no file to digest: the model id is a fixed label for (config, seed).
    label = tag_digest("blake3", blake3.blake3(b"fieldprint-bench/random-weights/v1\x00" + canonical_json([name, seed])).digest())
    lm = LoadedModel(model, tok, args, label, label, tokenizer_digest(tok), f"random:{name}:seed{seed}")
    return hf, lm


def weight_bytes(lm: LoadedModel) -> int:
    """Bytes a decode step reads from the weights: every matrix once (an untied embedding table only by its rows)."""
    total = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    if not lm.args.tie_embeddings:
        e = lm.model.embed_tokens.weight
        total -= e.numel() * e.element_size()
    return total


def kv_bytes_per_token(args: ModelArgs, itemsize: int) -> int:
    return 2 * args.num_layers * args.num_kv_heads * args.head_dim * itemsize


def make_runner(lm: LoadedModel, *, seq_tokens: int, max_model_len: int, anchor_tokens: int,
                anchor_sets: int = 2, anchor_dtype: str = "int8") -> ModelRunner:
    """A runner whose pools hold `seq_tokens` sequence tokens (in blocks) and `anchor_sets` sets."""
    cfg = RunnerConfig(block_size=BLOCK, max_model_len=max_model_len, max_anchor_len=max(anchor_tokens, BLOCK),
                       num_blocks=cdiv(seq_tokens, BLOCK) + 2, anchor_blocks=anchor_sets * cdiv(anchor_tokens, BLOCK) + 2,
                       anchor_dtype=anchor_dtype)
    return ModelRunner(lm, cfg)


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


# -- anchors -------------------------------------------------------------------------------------
class AnchorBench:
    """A log, a committer and an anchor compiler over one runner, with a profile calibrated on its K/V."""

    def __init__(self, runner: ModelRunner, folder: str, calib_tokens: int, rng: random.Random) -> None:
        self.runner, self.rng = runner, rng
        signer, _ = generate_key("bench.fieldprint.example/engine")
        os.makedirs(folder, exist_ok=True)
        self.log = TransparencyLog.open(os.path.join(folder, "log.sqlite"), signer)
        a = runner.args
        k, v = prefill_kv(runner, random_ids(rng, calib_tokens, a.vocab_size))
        samples = [{(layer, "K"): k[layer], (layer, "V"): v[layer]} for layer in range(a.num_layers)]
        self.profile = DQPProfile.calibrate(samples, name="bench-random", num_layers=a.num_layers,
                                            num_kv_heads=a.num_kv_heads, head_dim=a.head_dim,
                                            k_granularity="channel", v_granularity="token", block_size=BLOCK)
        del k, v, samples
        # queued as the engine queues them (a batch's session K/V commits ending at once)
        self.committer = Committer(self.log, self.profile, max_pending=None,
                                   max_pending_bytes=EngineConfig().commit_queue_bytes)
        int8 = runner.cache.anchor_k.dtype == torch.int8
        self.compiler = AnchorCompiler(runner, self.log, self.committer, self.profile if int8 else None, None)

    def texts(self, tokens: int, states: int) -> list[str]:
        """`states` random anchor texts whose chat-rendered system message is exactly `tokens` tokens."""
        tok = self.runner.lm.tokenizer
        words = tok.bench_words

        def count(texts: list[str]) -> int:
            ids, _ = split_prompt(tok, anchor_text(texts), [{"role": "user", "content": "."}])
            return len(ids)

        overhead = count(["w0"] * states) - states  # the template's and the header's own tokens
        per, extra = divmod(tokens - overhead, states)
        if per < 1:
            raise SystemExit(f"{tokens} anchor tokens cannot hold {states} states (the template takes {overhead})")
        texts = [" ".join(f"w{self.rng.randrange(words)}" for _ in range(per + (i < extra))) for i in range(states)]
        if count(texts) != tokens:
            raise SystemExit(f"anchor texts came to {count(texts)} tokens, not {tokens}: the tokenizer splits differently")
        return texts

    def compile(self, tokens: int, states: int):
        """Compile a fresh set (new texts, so new state ids): (CompiledSet, seconds)."""
        texts = self.texts(tokens, states)
        ids = [tag_digest("blake3", blake3.blake3(t.encode()).digest()) for t in texts]
        return wall_s(lambda: self.compiler.acquire(ids, texts), self.runner.device)

    def drop(self, key: str) -> None:
        self.runner.anchor_pool.evict(key)
        self.compiler.compiled.pop(key, None)

    def close(self) -> None:
        try:
            self.committer.close()
        finally:
            self.log.close()


# -- HF side ---------------------------------------------------------------------------------------
def hf_prefill_fn(hf, ids: torch.Tensor):
    def run():
        return hf(input_ids=ids, logits_to_keep=1).logits[:, -1].argmax(-1)

    return run


def hf_decode_fn(hf, batch: int, context: int, device: torch.device, vocab: int):
    """One HF decode step of `batch` sequences at position `context` over a StaticCache.

    A static cache always attends over its whole length under a mask, so its contents (here one
    real token, then zeros) change values but not time; a full prefill of every row is skipped.
    """
    from transformers import StaticCache

    cache = StaticCache(config=hf.config, max_cache_len=context + 1)
    first = torch.randint(0, vocab, (batch, 1), device=device)
    hf(input_ids=first, past_key_values=cache, cache_position=torch.zeros(1, dtype=torch.long, device=device),
       logits_to_keep=1)
    tok = torch.randint(0, vocab, (batch, 1), device=device)
    pos = torch.tensor([context], dtype=torch.long, device=device)

    def run():
        return hf(input_ids=tok, past_key_values=cache, cache_position=pos, logits_to_keep=1).logits[:, -1].argmax(-1)

    return run, cache


# -- our side --------------------------------------------------------------------------------------
def our_prefill_fn(runner: ModelRunner, ids: list[int], anchor=None):
    """A prefill step of one sequence (after `anchor` if given), re-run over the same blocks."""
    seq = Sequence(list(ids), SamplingParams(), anchor_key=anchor.key if anchor else None,
                   anchor_len=len(anchor.tokens) if anchor else 0)
    runner.blocks.grow(seq.block_table, len(ids))

    def run():
        return runner.forward([seq], [len(ids)]).argmax(-1)

    return run, seq


def decode_seqs(runner: ModelRunner, batch: int, context: int, rng: random.Random) -> list[Sequence]:
    """`batch` sequences with `context` tokens in the cache and one new token each (contents do not change time)."""
    seqs = []
    for _ in range(batch):
        s = Sequence(random_ids(rng, context + 1, runner.args.vocab_size), SamplingParams())
        runner.blocks.grow(s.block_table, context + 1)
        s.num_cached = context
        seqs.append(s)
    return seqs


def our_decode_fn(runner: ModelRunner, seqs: list[Sequence]):
    def run():
        return runner.forward(seqs, [1] * len(seqs)).argmax(-1)

    return run


def release(runner: ModelRunner, seqs: list[Sequence]) -> None:
    for s in seqs:
        runner.blocks.release(s.block_table)


# -- sections --------------------------------------------------------------------------------------
@torch.inference_mode()
def parity(hf, runner: ModelRunner, prompt: int, steps: int, rng: random.Random) -> dict:
    """Our logits vs HF's on the same weights: end of a prefill, then greedy decode steps (ours via graphs)."""
    dev, vocab = runner.device, runner.args.vocab_size
    ids = random_ids(rng, prompt, vocab)
    seq = Sequence(list(ids), SamplingParams())
    runner.blocks.grow(seq.block_table, prompt + steps)
    try:
        out = hf(input_ids=torch.tensor([ids], device=dev), use_cache=True)
        ref, cache = out.logits[0, -1].float(), out.past_key_values
        ours = runner.forward([seq], [prompt])[0]
        seq.num_cached = prompt
        diffs, agree, scale = [], 0, []
        for step in range(steps + 1):
            diffs.append(float((ours - ref).abs().max()))
            agree += int(ours.argmax() == ref.argmax())
            scale.append(float(ref.std()))
            if step == steps:
                break
            tok = int(ref.argmax())
            seq.output_ids.append(tok)
            out = hf(input_ids=torch.tensor([[tok]], device=dev), past_key_values=cache, use_cache=True)
            ref, cache = out.logits[0, -1].float(), out.past_key_values
            ours = runner.forward([seq], [1])[0].float()
            seq.num_cached += 1
    finally:
        runner.blocks.release(seq.block_table)
    return {"positions": steps + 1, "max_abs_dlogit": max(diffs), "logit_std": statistics.mean(scale),
            "rel": max(diffs) / max(statistics.mean(scale), 1e-12), "top1_agree": agree / (steps + 1)}


@torch.inference_mode()
def prefill_section(hf, runner: ModelRunner, cs, lengths, repeats: int, rng: random.Random) -> dict:
    dev, vocab, alen = runner.device, runner.args.vocab_size, len(cs.tokens)
    out = {}
    for n in lengths:
        ids = random_ids(rng, n, vocab)
        row = {}
        for label, anchor in (("ours", None), ("ours_anchors", cs)):
            if anchor is not None and alen + n > runner.args.max_position:
                # Positions past the model's context have no RoPE entry (Llama-3-8B: 8192).
                row[label + "_ms"] = None
                row["note"] = f"anchors + {n} tokens exceed the model's {runner.args.max_position}-token context"
                continue
            fn, seq = our_prefill_fn(runner, ids, anchor)
            try:
                row[label + "_ms"] = median_ms(fn, dev, repeats)
            finally:
                runner.blocks.release(seq.block_table)
        row["hf_ms"] = median_ms(hf_prefill_fn(hf, torch.tensor([ids], device=dev)), dev, repeats)
        for k in ("ours", "ours_anchors", "hf"):
            row[k + "_tok_s"] = None if row[k + "_ms"] is None else n / row[k + "_ms"] * 1e3
        row["speedup_vs_hf"] = row["hf_ms"] / row["ours_ms"]
        row["anchors_vs_none"] = None if row["ours_anchors_ms"] is None else row["ours_ms"] / row["ours_anchors_ms"]
        out[str(n)] = row
        log(f"  prefill {n:>6}: ours {row['ours_tok_s']:>10.0f} tok/s  +anchors {fmt(row['ours_anchors_tok_s'], '>10.0f')}  "
            f"HF {row['hf_tok_s']:>10.0f}  (x{row['speedup_vs_hf']:.2f} vs HF)")
    return out


def fmt(x, spec: str) -> str:
    """A number formatted, or '-' (same width) for one not measured."""
    return format(x, spec) if x is not None else format("-", spec.split(".")[0].rstrip("fgde%"))


@torch.inference_mode()
def decode_section(hf, runner: ModelRunner, cs, batches, context: int, repeats: int, rng: random.Random) -> dict:
    dev, vocab = runner.device, runner.args.vocab_size
    alen = len(cs.tokens)
    out = {}
    for b in batches:
        seqs = decode_seqs(runner, b, context, rng)
        row = {}
        try:
            row["ours_ms"] = median_ms(our_decode_fn(runner, seqs), dev, repeats, warmup=2)
            for s in seqs:
                s.anchor_key, s.anchor_len = cs.key, alen
            row["ours_anchors_ms"] = median_ms(our_decode_fn(runner, seqs), dev, repeats, warmup=2)
        finally:
            release(runner, seqs)
        for label, ctx in (("hf", context), ("hf_prefix", context + alen)):
            fn, cache = hf_decode_fn(hf, b, ctx, dev, vocab)
            row[label + "_ms"] = median_ms(fn, dev, repeats, warmup=2)
            del fn, cache
        row["speedup_vs_hf"] = row["hf_ms"] / row["ours_ms"]
        row["anchors_speedup_vs_hf_prefix"] = row["hf_prefix_ms"] / row["ours_anchors_ms"]
        row["anchors_vs_none"] = row["ours_ms"] / row["ours_anchors_ms"]
        for k in ("ours", "ours_anchors", "hf", "hf_prefix"):
            row[k + "_tok_s"] = b / row[k + "_ms"] * 1e3
        out[str(b)] = row
        log(f"  decode B={b:>3}: ours {row['ours_ms']:7.2f} ms  +anchors {row['ours_anchors_ms']:7.2f}  "
            f"HF {row['hf_ms']:7.2f}  HF+prefix {row['hf_prefix_ms']:7.2f}  (x{row['speedup_vs_hf']:.2f} vs HF)")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def bench_model(name: str, p: dict, device: torch.device, dtype: torch.dtype, folder: str) -> dict:
    """Every section for one model; returns its results."""
    rng = random.Random(0)
    log(f"{name}: building HF and our model on {device} ({dtype})")
    (hf, lm), load_s = wall_s(lambda: build_pair(name, device, dtype), device)
    ctx, alen, batches = p["context"], p["anchors"], p["batches"]
    seq_tokens = max(max(p["prefill"]), max(batches) * cdiv(ctx + 1, BLOCK) * BLOCK, p["parity_prompt"] + p["parity_steps"])
    # max_model_len sizes the captured decode graphs' block tables, from which the decode kernel
    # plans its split-KV work: the decode context, as an engine serving it would be configured.
    # Prefill steps run outside graphs and are not bound by it.
    runner = make_runner(lm, seq_tokens=seq_tokens + alen, max_model_len=max(ctx + 1, p["parity_prompt"] + p["parity_steps"]),
                         anchor_tokens=alen, anchor_sets=2)
    res = {"config": CONFIGS[name], "load_s": load_s, "weight_bytes": weight_bytes(lm), "anchor_tokens": alen,
           "kv_bytes_per_token": kv_bytes_per_token(lm.args, lm.dtype.itemsize)}
    log(f"{name}: loaded in {load_s:.1f} s ({res['weight_bytes'] / 1e9:.2f} GB of weights); parity check")
    res["parity"] = parity(hf, runner, p["parity_prompt"], p["parity_steps"], rng)
    log(f"  parity: max |dlogit| {res['parity']['max_abs_dlogit']:.3g} (logit std {res['parity']['logit_std']:.3g}), "
        f"top-1 agreement {res['parity']['top1_agree']:.0%} over {res['parity']['positions']} positions")
    bench = AnchorBench(runner, folder, alen, rng)
    try:
        log(f"{name}: compiling a {alen}-token int8 anchor set (cold: first use of the committer's workers)")
        cs, cold = bench.compile(alen, p["anchor_states"])
        runner.anchor_pool.pin(cs.key)  # the set every timed step reads: never evicted by the compile repeats
        times = []
        for _ in range(p["compile_repeats"]):
            other, t = bench.compile(alen, p["anchor_states"])
            times.append(t)
            bench.drop(other.key)
        blocks = runner.anchor_pool.sets[cs.key].blocks
        verify_ms = median_ms(lambda: bench.compiler.verify(cs, blocks), device, p["compile_repeats"])
        res["anchors"] = {"tokens": len(cs.tokens), "states": p["anchor_states"], "compile_cold_s": cold,
                          "compile_s": statistics.median(times), "compile_runs_s": times, "verify_ms": verify_ms,
                          "blocks": cs.manifest["blocks"], "profile": bench.profile.digest, "log_index": cs.index}
        log(f"  anchors: compile {res['anchors']['compile_s']:.3f} s (cold {cold:.3f} s), verify {verify_ms:.1f} ms, "
            f"{cs.manifest['blocks']} block digests")
        log(f"{name}: prefill")
        res["prefill"] = prefill_section(hf, runner, cs, p["prefill"], p["repeats"], rng)
        log(f"{name}: decode, context {ctx}")
        res["decode"] = decode_section(hf, runner, cs, batches, ctx, p["decode_repeats"], rng)
        res["decode_context"] = ctx
        runner.anchor_pool.unpin(cs.key)
    finally:
        bench.close()
    del hf, lm, runner
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def print_table(results: dict) -> None:
    """The side-by-side summary: ours vs HF, anchors vs none, compile/verify."""
    print("\n== engine_bench: ours vs HF transformers (same random weights) ==")
    print(f"{'model':18}{'what':26}{'ours':>12}{'+anchors':>12}{'HF':>12}{'ours/HF':>9}{'anc/none':>9}")
    for name, r in results["models"].items():
        for n, row in r.get("prefill", {}).items():
            print(f"{name:18}{'prefill ' + n + ' tok/s':26}{row['ours_tok_s']:>12.0f}{fmt(row['ours_anchors_tok_s'], '>12.0f')}"
                  f"{row['hf_tok_s']:>12.0f}{row['speedup_vs_hf']:>9.2f}{fmt(row['anchors_vs_none'], '>9.2f')}")
        for b, row in r.get("decode", {}).items():
            print(f"{name:18}{'decode B=' + b + ' step ms':26}{row['ours_ms']:>12.2f}{row['ours_anchors_ms']:>12.2f}"
                  f"{row['hf_ms']:>12.2f}{row['speedup_vs_hf']:>9.2f}{row['anchors_vs_none']:>9.2f}")
        a = r.get("anchors")
        if a:
            print(f"{name:18}{'anchor set ' + str(a['tokens']) + ' tok':26}compile {a['compile_s']:.3f} s, "
                  f"verify {a['verify_ms']:.1f} ms; parity max|dlogit| {r['parity']['max_abs_dlogit']:.3g}, "
                  f"top-1 {r['parity']['top1_agree']:.0%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny configs on the CPU: checks the script in seconds")
    ap.add_argument("--models", default=None, help="comma-separated, from: " + ", ".join(CONFIGS))
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "engine_bench.json"))
    args = ap.parse_args()
    p = dict(SMOKE if args.smoke else FULL)
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = {"meta": meta(device, args.smoke), "params": {k: v for k, v in p.items() if k != "models"}, "models": {}}
    log(f"engine_bench: {results['meta']}")
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as folder:
        for i, name in enumerate((args.models or p["models"]).split(",")):
            results["models"][name] = bench_model(name, p, device, dtype, os.path.join(folder, str(i)))
            results["seconds"] = time.time() - t0
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:  # after every model: a later failure keeps what was measured
                json.dump(results, f, indent=1)
    print_table(results)
    log(f"engine_bench done in {time.time() - t0:.0f} s; JSON in {args.out}")


if __name__ == "__main__":
    main()
