"""GPU correctness check of the engine's CUDA path (run before any engine figure is believed).

Random-weight Llama-family models (SmolLM2-135M's shape: 9 query / 3 KV heads; a Qwen3-style one
with q/k norms) in bf16 on the GPU: our forward through the fused kernels vs HF transformers (SDPA)
on the same weights (max |dlogit|, top-1 agreement over a prompt); greedy decode through CUDA graphs
vs eager steps vs HF greedy generate (token agreement); the torch path over the same paged cache vs
the kernels; anchors (bf16 and int8) through the kernels vs the torch path; the stepper with steps
overlapped vs in order (check_overlap). Prints a table and writes
benchmarks/results/check_engine.json.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from fieldprint.dqp_profile import DQPProfile  # noqa: E402
from fieldprint.engine.attention import torch_paged_attention  # noqa: E402
from fieldprint.engine.loader import LoadedModel, build_model  # noqa: E402
from fieldprint.engine.model import ModelArgs  # noqa: E402
from fieldprint.engine.runner import ModelRunner, RunnerConfig  # noqa: E402
from fieldprint.engine.sequence import SamplingParams, Sequence  # noqa: E402

CONFIGS = {
    "smollm2-135m-shape": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                               num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                               rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True),
    "qwen3-small": dict(model_type="qwen3", vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6,
                        rope_theta=1000000.0, max_position_embeddings=8192, tie_word_embeddings=True),
}


def make(name: str, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**CONFIGS[name])
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").to(device).eval()
    args = ModelArgs.from_hf(cfg)
    ours = build_model(args, hf.state_dict(), torch.device(device), torch.bfloat16)
    return hf, LoadedModel(ours, None, args, f"random:{name}", "", "", name)


def prefill_logits(runner, ids):
    seq = Sequence(list(ids), SamplingParams())
    runner.blocks.grow(seq.block_table, len(ids))
    from fieldprint.engine.attention import AttentionContext  # noqa: F401

    inp, pos, ctx = runner.prepare([seq], [len(ids)])
    with torch.inference_mode():
        h = runner.model(inp, pos, ctx)
        logits = runner.model.logits(h)
    return seq, logits, (inp, pos, ctx)


def main() -> None:
    dev = "cuda"
    rows, results = [], {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name in CONFIGS:
        hf, lm = make(name, dev)
        runner = ModelRunner(lm, RunnerConfig(num_blocks=512, anchor_blocks=64, max_model_len=2048, max_anchor_len=1024,
                                              anchor_dtype="model"))
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, lm.args.vocab_size, (300,), generator=g).tolist()
        seq, ours, (inp, pos, ctx) = prefill_logits(runner, ids)
        with torch.inference_mode():
            ref = hf(torch.tensor([ids], device=dev)).logits[0].float()
        dl = (ours - ref).abs().max().item()
        top1 = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
        # the torch path over the same cache, layer 0's attention of the prefill's q: compare kernel vs torch
        runner.blocks.release(seq.block_table)
        # greedy decode: graphs vs eager vs HF
        outs = {}
        for mode in ("graph", "eager"):
            runner.use_graphs = mode == "graph"
            s = Sequence(list(ids[:64]), SamplingParams(max_tokens=64, ignore_eos=True))
            runner.blocks.grow(s.block_table, 64 + 64)
            n = 64
            logits = runner.forward([s], [n])
            s.num_cached = n
            for _ in range(64):
                tok = runner.sample([s], logits)[0]
                s.output_ids.append(tok)
                logits = runner.forward([s], [1])
                s.num_cached += 1
            outs[mode] = list(s.output_ids)
            runner.blocks.release(s.block_table)
        with torch.inference_mode():
            hf_out = hf.generate(torch.tensor([ids[:64]], device=dev), max_new_tokens=64, do_sample=False,
                                 min_new_tokens=64)[0, 64:].tolist()
        agree = lambda a, b: next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))  # noqa: E731
        graph_anchors = check_graph_anchors(runner, lm)
        overlap = check_overlap(runner, lm)
        anchor_check = check_anchors(runner, lm)  # kernels vs the torch path, bf16 and int8 anchors, one layer
        r = {"max_dlogit_vs_hf": dl, "top1_vs_hf": top1, "graph_eq_eager_tokens": agree(outs["graph"], outs["eager"]),
             "graph_vs_hf_first_divergence": agree(outs["graph"], hf_out), **graph_anchors, **anchor_check, **overlap}
        results[name] = r
        rows.append((name, r))
        del hf, runner, lm
        torch.cuda.empty_cache()
    out = os.environ.get("OUT_DIR", "benchmarks/results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "check_engine.json"), "w") as f:
        json.dump(results, f, indent=2)
    for name, r in rows:
        print(name, json.dumps(r))


def check_overlap(runner, lm) -> dict:
    """The stepper with each step queued before the step before is read vs steps in order, through the
    CUDA graphs: 12 sequences (chunked prompts, a stop on a token, max_tokens). Exact: each finished
    sequence's cached count (its last token has no K/V). Reported: how many sequences drew the same
    tokens (the batches differ by the rows of sequences that stopped a step earlier, which a GPU may
    round otherwise) and the earliest divergence."""
    from fieldprint.engine.scheduler import Scheduler
    from fieldprint.engine.stepper import Stepper

    runner.use_graphs = runner.device.type == "cuda"
    g = torch.Generator().manual_seed(2)
    lens = (5, 40, 300, 17, 129, 64, 3, 250, 90, 33, 200, 11)
    prompts = [torch.randint(0, lm.args.vocab_size, (n,), generator=g).tolist() for n in lens]
    runs = {}
    for overlap in (False, True):
        sched = Scheduler(runner.blocks, max_num_seqs=64, max_num_batched_tokens=256)
        seqs = [Sequence(list(p), SamplingParams(max_tokens=8 + 5 * i, ignore_eos=True)) for i, p in enumerate(prompts)]
        cached = {}

        def reason(s, tok):
            return "stop" if tok % 13 == 0 else "length" if len(s.output_ids) >= s.params.max_tokens else None

        stepper = Stepper(runner, sched, reason, lambda s, c=cached: c.__setitem__(s.seq_id, s.num_cached), overlap=overlap)
        for s in seqs:
            sched.add(s)
        while not stepper.idle:
            stepper.step()
        assert all(cached[s.seq_id] == len(s) - 1 for s in seqs), [(cached[s.seq_id], len(s)) for s in seqs]
        runs[overlap] = [(s.output_ids, s.finish_reason) for s in seqs]
    first = [next((i for i, (x, y) in enumerate(zip(a[0], b[0])) if x != y), min(len(a[0]), len(b[0])))
             for a, b in zip(runs[True], runs[False]) if a != b]
    return {"overlap_same_tokens": sum(a == b for a, b in zip(runs[True], runs[False])), "overlap_sequences": len(lens),
            "overlap_first_divergence": min(first, default=None), "overlap_stops": sum(r == "stop" for _, r in runs[True])}


def check_graph_anchors(runner, lm, new: int = 48) -> dict:
    """Decode of three sequences (two reading an anchor set of random bf16 K/V, one none; padded to the
    batch bucket of 4) through captured graphs vs eager steps, across a context bucket (the graphs are
    captured per (batch, context, anchor) bucket). The graph run is fed the eager run's greedy tokens,
    so both see the same inputs at every step: max |dlogit| over all steps and argmax agreement."""
    g = torch.Generator(device="cuda").manual_seed(5)
    slot = runner.anchor_pool.reserve("graph-check", 333)
    for t in (runner.cache.anchor_k, runner.cache.anchor_v):
        t[:, slot.blocks] = torch.randn(t[:, slot.blocks].shape, generator=g, device="cuda").to(t.dtype)
    runner.anchor_pool.pin("graph-check")
    prompts = [torch.randint(0, lm.args.vocab_size, (n,), generator=g, device="cuda").tolist() for n in (230, 31, 250)]
    runs = {}
    for mode in ("eager", "graph"):
        runner.use_graphs = mode == "graph"
        seqs = [Sequence(list(p), SamplingParams(max_tokens=new, ignore_eos=True), anchor_key=k, anchor_len=a)
                for p, k, a in zip(prompts, ("graph-check", None, "graph-check"), (333, 0, 333))]
        for s in seqs:
            runner.blocks.grow(s.block_table, len(s) + new)
        steps = [runner.forward(seqs, [len(s) for s in seqs]).clone()]
        for s in seqs:
            s.num_cached = len(s)
        for i in range(new):
            toks = runner.sample(seqs, steps[-1]) if mode == "eager" else [t[i] for t in runs["eager"][0]]
            for s, tok in zip(seqs, toks):
                s.output_ids.append(tok)
            steps.append(runner.forward(seqs, [1] * len(seqs)).clone())
            for s in seqs:
                s.num_cached += 1
        runs[mode] = ([list(s.output_ids) for s in seqs], torch.stack(steps))
        for s in seqs:
            runner.blocks.release(s.block_table)
    runner.use_graphs = True
    runner.anchor_pool.unpin("graph-check")
    (_, eager), (_, graph) = runs["eager"], runs["graph"]
    return {"graph_anchors_max_dlogit": (graph - eager).abs().max().item(),
            "graph_anchors_argmax_agree": (graph.argmax(-1) == eager.argmax(-1)).float().mean().item(),
            "graph_keys": sorted(runner.graphs)}


def check_anchors(runner, lm) -> dict:
    """Kernels vs the torch path over the same pools and routing, with bf16 and int8 anchors."""
    from fieldprint.engine.kv_cache import allocate_cache

    a = lm.args
    out = {}
    g = torch.Generator(device="cuda").manual_seed(3)
    for adtype in (torch.bfloat16, torch.int8):
        cache = allocate_cache(a, block_size=16, num_blocks=64, num_anchor_blocks=32, dtype=torch.bfloat16,
                               anchor_dtype=adtype, device=torch.device("cuda"))
        cache.k.normal_(generator=g)
        cache.v.normal_(generator=g)
        if adtype == torch.int8:
            cache.anchor_k.copy_(torch.randint(-127, 128, cache.anchor_k.shape, generator=g, device="cuda", dtype=torch.int32).to(torch.int8))
            cache.anchor_v.copy_(torch.randint(-127, 128, cache.anchor_v.shape, generator=g, device="cuda", dtype=torch.int32).to(torch.int8))
            cache.anchor_k_scale.fill_(2.0 ** -6)
            # per-row V exponents spread over 2**-12..2**-4, as real rows differ
            cache.anchor_v_exp.copy_(torch.randint(-12, -3, cache.anchor_v_exp.shape, generator=g, device="cuda",
                                                   dtype=torch.int32).to(torch.int8))
        else:
            cache.anchor_k.normal_(generator=g)
            cache.anchor_v.normal_(generator=g)
        runner_cache = runner.cache
        runner.cache = cache
        try:
            for kind, counts in (("prefill", [37, 5]), ("decode", [1, 1])):
                seqs = []
                for i, n in enumerate(counts):
                    s = Sequence([0] * (n + (40 if kind == "decode" else 0)), SamplingParams(), anchor_key=None)
                    s.block_table = list(range(1 + 8 * i, 1 + 8 * i + 5))
                    s.num_cached = len(s) - n
                    seqs.append(s)
                from fieldprint.engine.kv_cache import AnchorPool

                runner.anchor_pool = AnchorPool(32, 16)
                slot = runner.anchor_pool.reserve("a", 70)
                seqs[0].anchor_key, seqs[0].anchor_len = "a", 70
                _, _, ctx = runner.prepare(seqs, counts)
                T = sum(counts)
                q = torch.randn((T, a.num_heads, a.head_dim), generator=g, device="cuda").to(torch.bfloat16)
                from fieldprint.engine.attention import paged_attention

                k = torch.randn((T, a.num_kv_heads, a.head_dim), generator=g, device="cuda").to(torch.bfloat16)
                v = torch.randn_like(k)
                got = paged_attention(q, k, v, 0, ctx).float()
                want = torch_paged_attention(q, 0, ctx).float()
                out[f"{kind}_{str(adtype).removeprefix('torch.')}_anchors_max_err"] = (got - want).abs().max().item()
                del slot
        finally:
            runner.cache = runner_cache
    return out


if __name__ == "__main__":
    DQPProfile  # noqa: B018 - imported to fail early if the package is broken
    main()
