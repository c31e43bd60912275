"""Tensor parallelism across the GPUs of one host: TP=2 equals TP=1, Llama-3-70B at TP=2, Llama-3-8B's scaling.

Rank 0 is this process (scheduler, log, committer, sampling); the other ranks are processes of their
own that mirror every step (fieldprint/engine/tp.py). Random bf16 weights, no checkpoint: every rank
makes the same full tensors, one at a time, from one seed (`random_model`), and keeps its shard, so
TP=1 and TP=2 run the very same model.

1. Parity (Llama-3.2-1B config): TP=2 logits and greedy tokens against TP=1 after a 512-token prefill
   and 32 decode steps.
2. Generation with a 2,048-token int8 anchor set shared by the batch and the asynchronous commit of
   every finished sequence on (e2e_bench's serve loop): output tokens/s at batch 1/8/32 for
   Llama-3-8B at TP=1 and TP=2 (the scaling) and Llama-3-70B at TP=2.

Needs >= 2 GPUs (NCCL; NVLink multicast off). --smoke: tiny configs on two CPU processes (gloo).
Prints a table, writes benchmarks/results/tp_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import blake3
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from e2e_bench import requests, serve, warm  # noqa: E402
from engine_bench import BLOCK, AnchorBench, hf_config, log, meta, word_tokenizer  # noqa: E402

from fieldprint.canon import canonical_json, tag_digest  # noqa: E402
from fieldprint.engine.kv_cache import cdiv  # noqa: E402
from fieldprint.engine.loader import LoadedModel, build_model, tokenizer_digest  # noqa: E402
from fieldprint.engine.model import ModelArgs  # noqa: E402
from fieldprint.engine.runner import ModelRunner, RunnerConfig  # noqa: E402
from fieldprint.engine.scheduler import Scheduler  # noqa: E402
from fieldprint.engine.sequence import SamplingParams, Sequence  # noqa: E402
from fieldprint.engine.tp import TensorParallel  # noqa: E402

FULL = {"parity": "llama-3.2-1b", "runs": [("llama-3-8b", 1), ("llama-3-8b", 2), ("llama-3-70b", 2)], "batches": (1, 8, 32),
        "prompt": 512, "new": 128, "anchors": 2048, "anchor_states": 8, "parity_prompt": 512, "parity_steps": 32}
SMOKE = {"parity": "tiny-llama", "runs": [("tiny-llama", 1), ("tiny-llama", 2)], "batches": (1, 2, 4),
         "prompt": 24, "new": 6, "anchors": 48, "anchor_states": 3, "parity_prompt": 24, "parity_steps": 4}


class RandomWeights(dict):
    """HF-named tensors made on first use from (seed, name): the same on every rank, never all at once."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int, device: torch.device) -> None:
        super().__init__(shapes)
        self.seed, self.device = seed, device

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = super().__getitem__(name)
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + int.from_bytes(name.encode()[-6:], "little"))
        if len(shape) == 1:  # norms: around 1, as trained ones are
            return 1.0 + 0.02 * torch.randn(shape, generator=g, device=self.device)
        return torch.randn(shape, generator=g, device=self.device) * (shape[-1] ** -0.5)


def random_model(spec: str, device: torch.device | str) -> LoadedModel:
    """'<config name>:<seed>' -> this rank's shard of a model with random bf16 (fp32 on a CPU) weights."""
    from transformers import AutoModelForCausalLM

    name, seed = spec.rsplit(":", 1)
    device = torch.device(device)
    cfg = hf_config(name)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    args = ModelArgs.from_hf(cfg)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args, RandomWeights(shapes, int(seed), device), device, dtype)
    tok = word_tokenizer(args.vocab_size)
    label = tag_digest("blake3", blake3.blake3(b"fieldprint-bench/random-weights/v2\x00" + canonical_json([name, int(seed)])).digest())
    return LoadedModel(model, tok, args, label, label, tokenizer_digest(tok), f"random:{spec}")


def start(name: str, tp: int, device: torch.device, p: dict, seq_tokens: int) -> tuple[ModelRunner, TensorParallel | None]:
    """Rank 0's runner for `name` at `tp` ranks (the others started and mirroring)."""
    spec, group = f"{name}:0", None
    config = RunnerConfig(block_size=BLOCK, max_model_len=p["prompt"] + p["new"] + 8, max_anchor_len=max(p["anchors"], BLOCK),
                          num_blocks=cdiv(seq_tokens, BLOCK) + 2, anchor_blocks=2 * cdiv(p["anchors"], BLOCK) + 2)
    if tp > 1:
        group = TensorParallel(spec, tp, device, config, loader=random_model)
        device = group.device
    runner = ModelRunner(random_model(spec, device), config)
    if group is not None:
        group.attach(runner)
    return runner, group


def parity(name: str, device: torch.device, p: dict) -> dict:
    """Logits of one prefill and greedy decode steps, TP=1 then TP=2, on the same weights."""
    seq_tokens = p["parity_prompt"] + p["parity_steps"] + 64
    out = {}
    for tp in (1, 2):
        runner, group = start(name, tp, device, {**p, "prompt": p["parity_prompt"], "new": p["parity_steps"]}, seq_tokens)
        try:
            ids = [random.Random(3).randrange(runner.args.vocab_size) for _ in range(p["parity_prompt"])]
            s = Sequence(ids, SamplingParams(max_tokens=p["parity_steps"], ignore_eos=True))
            runner.blocks.grow(s.block_table, len(ids) + p["parity_steps"])
            logits = [runner.forward([s], [len(ids)]).float().cpu()]
            s.num_cached = len(ids)
            for _ in range(p["parity_steps"]):
                s.output_ids.append(int(logits[-1][0].argmax()))
                logits.append(runner.forward([s], [1]).float().cpu())
                s.num_cached += 1
            out[tp] = (torch.cat(logits), list(s.output_ids))
        finally:
            if group is not None:
                group.close()
        del runner
    diff = (out[1][0] - out[2][0]).abs()
    return {"model": name, "max_dlogit": diff.max().item(), "logit_std": out[1][0].std().item(),
            "tokens_equal": out[1][1] == out[2][1], "first_token_difference": next(
                (i for i, (a, b) in enumerate(zip(out[1][1], out[2][1])) if a != b), None)}


def throughput(name: str, tp: int, device: torch.device, p: dict) -> dict:
    rng = random.Random(11)
    b_max = max(p["batches"])
    runner, group = start(name, tp, device, p, max(b_max * (p["prompt"] + p["new"] + 16), 512))  # + calibration
    try:
        sched = Scheduler(runner.blocks, max_num_seqs=b_max, max_num_batched_tokens=8192)
        with tempfile.TemporaryDirectory() as folder:
            bench = AnchorBench(runner, folder, 256, rng)
            try:
                t0 = time.perf_counter()
                cs, _ = bench.compile(p["anchors"], p["anchor_states"])
                compile_s = time.perf_counter() - t0
                warm(runner, sched, b_max, rng, cs, p["prompt"])
                rows = {}
                for b in p["batches"]:
                    run = serve(runner, sched, requests(rng, b, p["prompt"], p["new"], runner.args.vocab_size, cs),
                                bench.committer, session=f"tp{tp}-b{b}")
                    rows[str(b)] = {"tok_s": run["tok_s"], "seconds": run["seconds"], "steps": run["steps"]}
                    log(f"  {name} TP={tp} B={b:>3}: {run['tok_s']:9.0f} tok/s with the {p['anchors']}-token anchor set")
            finally:
                bench.close()
        return {"model": name, "tp": tp, "anchor_compile_s": compile_s, "batches": rows}
    finally:
        if group is not None:
            group.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny configs on two CPU processes")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "tp_bench.json"))
    a = ap.parse_args()
    p = SMOKE if a.smoke else FULL
    device = torch.device("cpu" if a.smoke else "cuda")
    if not a.smoke and torch.cuda.device_count() < 2:
        raise SystemExit(f"tp_bench needs 2 GPUs; {torch.cuda.device_count()} visible (--smoke runs on the CPU)")
    log(f"tp_bench: {meta(device, a.smoke)}")
    out = {"meta": meta(device, a.smoke), "parity": parity(p["parity"], device, p), "runs": []}
    log(f"  parity {out['parity']}")
    for name, tp in p["runs"]:
        out["runs"].append(throughput(name, tp, device, p))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
    print("\n== tp_bench ==")
    pr = out["parity"]
    print(f"parity {pr['model']}: max |dlogit| {pr['max_dlogit']:.3g} (logit std {pr['logit_std']:.3g}), "
          f"greedy tokens equal: {pr['tokens_equal']}")
    base = {r["model"]: r for r in out["runs"] if r["tp"] == 1}
    print(f"{'model':14s} {'TP':>2s} " + " ".join(f"{'B=' + b:>10s}" for b in map(str, p["batches"])) + "  vs TP=1")
    for r in out["runs"]:
        ref = base.get(r["model"])
        ratios = [r["batches"][b]["tok_s"] / ref["batches"][b]["tok_s"] for b in map(str, p["batches"])] if ref else []
        print(f"{r['model']:14s} {r['tp']:2d} " + " ".join(f"{r['batches'][b]['tok_s']:10.0f}" for b in map(str, p["batches"]))
              + ("  " + " ".join(f"{x:.2f}" for x in ratios) if ref and r["tp"] != 1 else ""))


if __name__ == "__main__":
    main()
