"""The sampler beside greedy argmax on the GPU: what a sampled step adds, and where it goes.

For B = 1/8/32/128/256 rows of Llama-3's 128,256-token vocabulary (random bf16 logits, as the model's
LM head leaves them): the time of `argmax_rows` and of `next_tokens` under four kinds of sampling
(temperature only; top-k 50; top-p 0.95; both), each including the host's part (the draws, the copy of
the rows' parameters, reading the tokens back, as in an engine step). Wall time per call, median of
repeats after a warm-up, with ratios to greedy. Then torch.profiler's kernels for one B=1 and one B=128
call of the engine's default kind (both limits): which operation costs what.
    python benchmarks/sampling_bench.py [--smoke] [--out FILE] [--baseline FILE]
--smoke runs tiny shapes on the CPU to check the script (its times mean nothing). --baseline: this
bench's JSON from another build on the same machine; each time is printed beside it, with the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fieldprint.engine.sampling import argmax_rows, next_tokens  # noqa: E402
from fieldprint.engine.sequence import SamplingParams, Sequence  # noqa: E402

KINDS = {"temperature": SamplingParams(temperature=0.8), "top_k": SamplingParams(temperature=0.8, top_k=50),
         "top_p": SamplingParams(temperature=0.8, top_p=0.95),
         "top_k+top_p": SamplingParams(temperature=0.8, top_k=50, top_p=0.95)}


def ms_per_call(fn, device: torch.device, reps: int) -> float:
    """Median wall time of one call (it ends with the tokens on the host, as an engine step does)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def profile(fn, device: torch.device) -> list[dict]:
    """The kernels (CUDA) or operators (CPU) of one call, by total time, largest first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    fn()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with prof(activities=acts) as p:
        fn()
    rows = []
    for e in p.key_averages():
        t = e.device_time_total if device.type == "cuda" else e.self_cpu_time_total
        if t > 0 and (device.type != "cuda" or e.device_type.name == "CUDA"):
            rows.append({"name": e.key[:100], "us": t, "calls": e.count})
    return sorted(rows, key=lambda r: -r["us"])[:15]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sampling_bench.json"))
    ap.add_argument("--baseline", default=None, help="this bench's JSON from another build, shown beside")
    args = ap.parse_args()
    base = {}
    if args.baseline:
        with open(args.baseline) as f:
            base = json.load(f)["batches"]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    vocab, batches, reps = (1000, (1, 8), 5) if args.smoke else (128256, (1, 8, 32, 128, 256), 50)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    res = {"meta": {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
                    "torch": torch.__version__, "vocab": vocab,
                    "baseline": os.path.basename(args.baseline) if args.baseline else None,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
           "batches": {}}
    g = torch.Generator(device=device).manual_seed(0)
    for b in batches:
        logits = (torch.randn(b, vocab, generator=g, device=device) * 3).to(dtype)
        row = {"greedy_ms": ms_per_call(lambda logits=logits: argmax_rows(logits).tolist(), device, reps)}
        for name, p in KINDS.items():
            seqs = [Sequence([1], p, sample_seed=i) for i in range(b)]
            row[name + "_ms"] = ms_per_call(lambda seqs=seqs, logits=logits: next_tokens(seqs, logits), device, reps)
            row[name + "_vs_greedy"] = row[name + "_ms"] / row["greedy_ms"]
        was = base.get(str(b), {})
        for n in ["greedy", *KINDS]:
            if n + "_ms" in was:
                row[n + "_vs_baseline"] = row[n + "_ms"] / was[n + "_ms"]
        res["batches"][str(b)] = row
        print(f"B={b:>4}: greedy {row['greedy_ms']:.3f} ms | " + " | ".join(
            f"{n} {row[n + '_ms']:.3f} ({row[n + '_vs_greedy']:.1f}x"
            + (f"; base {was[n + '_ms']:.3f}, {row[n + '_vs_baseline']:.2f}" if n + "_ms" in was else "") + ")"
            for n in KINDS), flush=True)
    res["profile"] = {}
    for b in (1, 128 if 128 in batches else batches[-1]):
        logits = (torch.randn(b, vocab, generator=g, device=device) * 3).to(dtype)
        seqs = [Sequence([1], KINDS["top_k+top_p"], sample_seed=i) for i in range(b)]
        res["profile"][str(b)] = profile(lambda seqs=seqs, logits=logits: next_tokens(seqs, logits), device)
        print(f"profile B={b} (top_k+top_p): " + "; ".join(f"{r['name'][:40]} {r['us']:.0f} us x{r['calls']}"
                                                       for r in res["profile"][str(b)][:8]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"JSON in {args.out}")


if __name__ == "__main__":
    main()
