"""Generation end to end: anchors vs none, vs HF generate, the bandwidth floor, nano-vllm's protocol.

Drives ModelRunner + Scheduler with token ids through the engine's step loop (stepper.py; the Engine
class itself needs a tokenizer and a memory; random weights have neither). Random bf16 weights,
configs written out in engine_bench.py.

1. Llama-3.2-1B: B requests of 512 random prompt tokens and 128 new tokens each, B = 1/8/32/128,
   without anchors and with one 2k-token int8 anchor set shared by the batch; each finished
   sequence's K/V goes through the asynchronous Committer, as a session's turn does (--no-commit:
   off). tokens/s = B x 128 / time from submission to the last token; how long the commits take
   to finish after it is reported beside. Goal (issue): anchors / none >= 0.95.
2. HF transformers generate on the same weights (SDPA, static cache; torch.compile only with
   --hf-compile) at B = 1/8/32, same lengths. Goal: ours >= 3x.
3. Batch-1 decode step (median over the run's decode steps, host work included) vs the bandwidth
   floor: (weight bytes + K/V bytes read at the mean context) / bandwidth, for 4.27e12 B/s and for
   a measured device-to-device copy. Goal: <= 1.3x.
   Beside it, sampled generation (temperature 0.8, top-k 50, top-p 0.95, a seed per request) vs
   greedy at the same batches: what the sampler costs per token.
4. nano-vllm's throughput protocol: 256 requests, input and output lengths uniform in 100..1024
   (seed 0), all submitted at once, Qwen3-0.6B shapes: output tokens/s, p50/p99 time to first
   token and inter-token latency.
Beside them: the overlap section (each step queued before the step before is read, the engine's
default, against steps one after the other, with anchors, interleaved pairs), the profile section
(kernels per decode step) and the timeline section (each decode step's host phases and the device's
busy and idle time; each prefill's host launch time against the device time of what it launched;
--traces DIR keeps the profiler's traces).
    python benchmarks/e2e_bench.py [--smoke] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from engine_bench import (
    BLOCK,
    AnchorBench,
    build_pair,
    kv_bytes_per_token,
    log,
    make_runner,
    median_ms,
    meta,
    random_ids,
    sync,
    wall_s,
    weight_bytes,
)

from fieldprint.engine.anchors import commit_sequence
from fieldprint.engine.kv_cache import cdiv
from fieldprint.engine.runner import ModelRunner, RunnerConfig
from fieldprint.engine.scheduler import Scheduler
from fieldprint.engine.sequence import SamplingParams, Sequence
from fieldprint.engine.stepper import Stepper

FULL = {"model": "llama-3.2-1b", "batches": (1, 8, 32, 128), "hf_batches": (1, 8, 32), "prompt": 512, "new": 128,
        "anchors": 2048, "anchor_states": 8, "repeats": 5, "hf_repeats": 3, "protocol_model": "qwen3-0.6b",
        "protocol_requests": 256, "protocol_lengths": (100, 1024), "max_num_seqs": 256, "max_num_batched_tokens": 8192}
SMOKE = {"model": "tiny-llama", "batches": (1, 2, 4, 8), "hf_batches": (1, 2), "prompt": 24, "new": 6,
         "anchors": 48, "anchor_states": 3, "repeats": 1, "hf_repeats": 1, "protocol_model": "tiny-qwen3",
         "protocol_requests": 12, "protocol_lengths": (8, 24), "max_num_seqs": 8, "max_num_batched_tokens": 64}
GOALS = {"anchors_vs_none": 0.95, "vs_hf": 3.0, "step_vs_floor": 1.3}


def ms(xs: list[float], q: float) -> float | None:
    """The q-th percentile of durations in seconds, in milliseconds (None for no samples)."""
    return float(np.percentile(xs, q)) * 1e3 if xs else None


def serve(runner: ModelRunner, sched: Scheduler, seqs: list[Sequence], committer=None, session: str = "bench",
          marks: bool = False, overlap: bool = True) -> dict:
    """Submit every sequence at once and step until all finish; per-token times and step times.

    The loop is the engine's (fieldprint/engine/stepper.py): each step queued before the step
    before's tokens are read (overlap; off: one after the other), finish at max_tokens (commit the
    K/V, unpin the set, free the blocks). A token's time is when the host reads it. marks: name each
    step's phases for a profiler's timeline (timeline_section).
    """
    t0 = time.perf_counter()
    for s in seqs:
        sched.add(s)
        if s.anchor_key:
            runner.anchor_pool.pin(s.anchor_key)
    times: dict[int, list[float]] = {s.seq_id: [] for s in seqs}

    def finish_reason(s: Sequence, tok: int) -> str | None:
        times[s.seq_id].append(time.perf_counter())
        return "length" if len(s.output_ids) >= s.params.max_tokens else None

    def on_finish(s: Sequence) -> None:
        if committer is not None:
            commit_sequence(committer, runner, s.block_table, s.num_cached, session=session, state_type="session_kv")
        if s.anchor_key:
            runner.anchor_pool.unpin(s.anchor_key)

    stepper = Stepper(runner, sched, finish_reason, on_finish, overlap=overlap, max_rows=max(256, len(seqs)),
                      marks=torch.profiler.record_function if marks else None)
    decode_steps: list[tuple[int, float]] = []
    steps = 0
    while not stepper.idle:
        start = time.perf_counter()
        done = stepper.step()
        launched = stepper.launched
        if launched is None and not done and stepper.queued is None and not sched.idle:
            raise SystemExit("the scheduler returned an empty step with requests pending")
        steps += 1
        if launched is not None and launched.decode:
            decode_steps.append((len(launched.seqs), time.perf_counter() - start))
    last = max(t[-1] for t in times.values())
    if committer is not None:
        committer.flush(session)
    done = time.perf_counter()  # the last submits (queue back-pressure) and the flush
    outputs = sum(len(s.output_ids) for s in seqs)
    ttft = [t[0] - t0 for t in times.values()]
    itl = [b - a for t in times.values() for a, b in zip(t, t[1:])]
    return {"seconds": last - t0, "output_tokens": outputs, "tok_s": outputs / (last - t0), "steps": steps,
            "commit_after_s": done - last, "tok_s_commit_done": outputs / (done - t0),
            "ttft_s": ttft, "itl_s": itl, "decode_steps": decode_steps,
            "preemptions": sum(s.preemptions for s in seqs)}


SAMPLED = {"temperature": 0.8, "top_p": 0.95, "top_k": 50}


def requests(rng: random.Random, n: int, prompt: int, new: int, vocab: int, anchor=None, sampled: bool = False,
             ) -> list[Sequence]:
    """n requests of random prompt tokens, greedy (or sampled with SAMPLED, each seeded) and ignoring EOS."""
    return [Sequence(random_ids(rng, prompt, vocab),
                     SamplingParams(max_tokens=new, ignore_eos=True, **(SAMPLED | {"seed": i} if sampled else {})),
                     anchor_key=anchor.key if anchor else None, anchor_len=len(anchor.tokens) if anchor else 0)
            for i in range(n)]


def sampling_section(runner, sched, p, rng) -> dict:
    """Sampled generation (temperature, top-k and top-p, each request seeded) against greedy,
    no anchors, as interleaved pairs after an untimed one: what sampling costs per token."""
    out, vocab = {}, runner.args.vocab_size
    for b in p["batches"]:
        runs = {"greedy": [], "sampled": []}
        for r in range(p["repeats"] + 1):
            for label in ("greedy", "sampled") if r % 2 == 0 else ("sampled", "greedy"):
                run = serve(runner, sched, requests(rng, b, p["prompt"], p["new"], vocab, sampled=label == "sampled"))
                if r:  # the first pair is untimed
                    runs[label].append(run["tok_s"])
        ratios = [s / g for s, g in zip(runs["sampled"], runs["greedy"])]
        out[str(b)] = {"greedy_tok_s": statistics.median(runs["greedy"]), "sampled_tok_s": statistics.median(runs["sampled"]),
                       "pair_ratios": ratios, "sampled_vs_greedy": statistics.median(ratios)}
        log(f"  B={b:>4}: greedy {out[str(b)]['greedy_tok_s']:>9.0f} tok/s  sampled {out[str(b)]['sampled_tok_s']:>9.0f}"
            f"  ratio {out[str(b)]['sampled_vs_greedy']:.3f} ({SAMPLED})")
    return out


def overlap_section(runner, sched, p, rng, cs) -> dict:
    """Each step queued before the step before is read (the engine's default) against steps one after
    the other, with the anchor set, as interleaved pairs after an untimed one: tokens/s and the
    decode step's p50."""
    out, vocab = {}, runner.args.vocab_size
    for b in p["batches"]:
        runs = {"in_order": [], "overlap": []}
        for r in range(p["repeats"] + 1):
            for label in ("in_order", "overlap") if r % 2 == 0 else ("overlap", "in_order"):
                run = summarize(serve(runner, sched, requests(rng, b, p["prompt"], p["new"], vocab, cs),
                                      overlap=label == "overlap"))
                if r:  # the first pair is untimed
                    runs[label].append(run)
        row = {label: median_run(rs) for label, rs in runs.items()}
        row["pair_ratios"] = [o["tok_s"] / i["tok_s"] for o, i in zip(runs["overlap"], runs["in_order"])]
        row["overlap_vs_in_order"] = statistics.median(row["pair_ratios"])
        out[str(b)] = row
        log(f"  B={b:>4}: in order {row['in_order']['tok_s']:>9.0f} tok/s (step {row['in_order']['decode_step_ms_p50']:.3f} ms)"
            f"  overlapped {row['overlap']['tok_s']:>9.0f} (step {row['overlap']['decode_step_ms_p50']:.3f} ms)"
            f"  ratio {row['overlap_vs_in_order']:.3f}")
    return out


def warm(runner: ModelRunner, sched: Scheduler, max_batch: int, rng: random.Random, anchor=None,
         prompt: int = 8) -> None:
    """Capture every decode graph up to `max_batch` and compile the kernels before anything is timed.

    Requests asking for 1..max_batch tokens finish one per step, so the batch shrinks through
    every bucket size; then one request of the timed prompt length with and without the anchor set
    (the prefill kernel's variants: the first timed run with anchors once took 10x its pair's time).
    """
    vocab = runner.args.vocab_size
    seqs = [Sequence(random_ids(rng, 8, vocab), SamplingParams(max_tokens=i + 1, ignore_eos=True))
            for i in range(max_batch)]
    serve(runner, sched, seqs)
    serve(runner, sched, requests(rng, 1, prompt, 3, vocab))
    if anchor is not None:
        serve(runner, sched, requests(rng, 2, prompt, 3, vocab, anchor))


def summarize(run: dict) -> dict:
    """A run's figures without the per-token lists (those stay out of the JSON)."""
    steps = [t for _, t in run["decode_steps"]]
    out = {k: v for k, v in run.items() if k not in ("ttft_s", "itl_s", "decode_steps")}
    out.update(decode_step_ms_p50=ms(steps, 50), ttft_ms_p50=ms(run["ttft_s"], 50), ttft_ms_p99=ms(run["ttft_s"], 99),
               itl_ms_p50=ms(run["itl_s"], 50), itl_ms_p99=ms(run["itl_s"], 99))
    return out


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (all of them kept under 'runs_tok_s')."""
    ranked = sorted(runs, key=lambda r: r["tok_s"])
    best = dict(ranked[len(ranked) // 2])
    best["runs_tok_s"] = [r["tok_s"] for r in runs]
    return best


# -- sections --------------------------------------------------------------------------------------
def matmul_flops(device: torch.device) -> float:
    """Measured bf16 (fp32 on the CPU) GEMM rate in FLOP/s: the attention work's best case."""
    n = 8192 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / (median_ms(lambda: a @ b, device, 10, warmup=2) / 1e3)


def anchor_bound(args, b: int, p, none_s: float, flops: float, bandwidth: float) -> dict:
    """The best anchors/none ratio any kernel could reach: the none run's time plus the work anchors add
    at the measured GEMM rate and copy bandwidth. Every prompt token attends to all A anchor keys
    (QK and PV: 4 FLOPs per query head, key and dimension), and so does every decode step of every
    sequence, which also reads the set's int8 K/V at least once per layer."""
    a, per_key = p["anchors"], 4 * args.num_heads * args.head_dim * args.num_layers
    prefill_s = b * p["prompt"] * a * per_key / flops
    step_s = max(b * a * per_key / flops, a * kv_bytes_per_token(args, 1) / bandwidth)
    extra = prefill_s + p["new"] * step_s
    return {"bound": none_s / (none_s + extra), "prefill_s": prefill_s, "decode_step_s": step_s}


def anchors_section(runner, sched, bench, cs, p, rng, commit: bool) -> dict:
    out = {}
    vocab = runner.args.vocab_size
    flops, bandwidth = matmul_flops(runner.device), copy_bandwidth(runner.device)
    log(f"  GEMM {flops / 1e12:.1f} TFLOP/s, copy {bandwidth / 1e12:.2f} TB/s: the bound on anchors / none")
    for b in p["batches"]:
        # Interleaved pairs, the order alternating: two runs of one configuration minutes apart
        # differed by up to 15%, as much as the effect measured; a pair's runs are seconds apart.
        runs = {"none": [], "anchors": []}
        # An untimed pair first: decode graphs are captured per (batch, context, anchor) bucket, and
        # kernels compiled per split count, on first use; a server pays that once, not per request.
        for anchor in (None, cs):
            serve(runner, sched, requests(rng, b, p["prompt"], p["new"], vocab, anchor))
        for r in range(p["repeats"]):
            pair = (("none", None), ("anchors", cs))
            for label, anchor in pair if r % 2 == 0 else pair[::-1]:
                seqs = requests(rng, b, p["prompt"], p["new"], vocab, anchor)
                runs[label].append(summarize(serve(runner, sched, seqs, bench.committer if commit else None,
                                                   session=f"b{b}-{label}-{r}")))
        row = {label: median_run(rs) for label, rs in runs.items()}
        row["pair_ratios"] = [a["tok_s"] / n["tok_s"] for a, n in zip(runs["anchors"], runs["none"])]
        row["anchors_vs_none"] = statistics.median(row["pair_ratios"])
        row["bound"] = anchor_bound(runner.args, b, p, row["none"]["seconds"], flops, bandwidth)
        out[str(b)] = row
        log(f"  B={b:>4}: none {row['none']['tok_s']:>9.0f} tok/s  anchors {row['anchors']['tok_s']:>9.0f} tok/s  "
            f"ratio {row['anchors_vs_none']:.3f} (median of {len(row['pair_ratios'])} interleaved pairs, "
            f"{min(row['pair_ratios']):.3f}-{max(row['pair_ratios']):.3f}; bound {row['bound']['bound']:.3f})  "
            f"(commits done {row['anchors']['commit_after_s']:.2f} s after)")
    return out


def hf_section(hf, p, device, ours: dict, compile_: bool) -> dict:
    """HF generate (static cache) at the same lengths; ours is the no-anchor run at the same batch."""
    out = {}
    vocab = hf.config.vocab_size
    for b in p["hf_batches"]:
        ids = torch.randint(0, vocab, (b, p["prompt"]), device=device)
        kw = {"attention_mask": torch.ones_like(ids), "do_sample": False, "cache_implementation": "static",
              "pad_token_id": 0, "disable_compile": not compile_}
        with torch.inference_mode():
            hf.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm: cache allocation, kernels
            runs = []
            for _ in range(p["hf_repeats"]):  # its batch-1 figures vary run to run: a median of three
                gen, t = wall_s(lambda ids=ids, kw=kw: hf.generate(input_ids=ids, max_new_tokens=p["new"],
                                                                   min_new_tokens=p["new"], **kw), device)
                runs.append((gen.shape[1] - p["prompt"]) * b / t)
        hf_tok_s = statistics.median(runs)
        mine = ours[str(b)]["none"]["tok_s"]
        out[str(b)] = {"hf_tok_s": hf_tok_s, "hf_runs_tok_s": runs, "ours_tok_s": mine, "ours_vs_hf": mine / hf_tok_s}
        log(f"  B={b:>4}: HF generate {hf_tok_s:>9.0f} tok/s  ours {mine:>9.0f}  (x{mine / hf_tok_s:.2f})")
    return out


def copy_bandwidth(device: torch.device) -> float:
    """Measured device-to-device copy bandwidth in B/s (a read and a write per byte)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / (median_ms(lambda: dst.copy_(src), device, 10, warmup=2) / 1e3)


def floor_section(lm, runs: dict, p, bandwidth: float, device: torch.device) -> dict:
    """Batch-1 decode step of the runs above vs the bytes a step must read at least."""
    measured = copy_bandwidth(device)
    wb = weight_bytes(lm)
    mean_ctx = p["prompt"] + p["new"] / 2
    out = {"weight_bytes": wb, "mean_context": mean_ctx, "bandwidth_assumed": bandwidth, "bandwidth_copy": measured}
    for label, anchors in (("none", 0), ("anchors", p["anchors"])):
        kv = mean_ctx * kv_bytes_per_token(lm.args, lm.dtype.itemsize) + anchors * kv_bytes_per_token(lm.args, 1)
        step = runs["1"][label]["decode_step_ms_p50"]
        floor = (wb + kv) / bandwidth * 1e3
        floor_copy = (wb + kv) / measured * 1e3
        out[label] = {"kv_bytes": kv, "step_ms": step, "floor_ms": floor, "floor_copy_ms": floor_copy,
                      "step_vs_floor": step / floor, "step_vs_floor_copy": step / floor_copy}
        log(f"  B=1 {label:8}: step {step:.3f} ms, floor {floor:.3f} ms at {bandwidth / 1e12:.2f} TB/s "
            f"(x{step / floor:.2f}), {floor_copy:.3f} ms at the measured copy {measured / 1e12:.2f} TB/s "
            f"(x{step / floor_copy:.2f})")
    return out


def greedy_step(runner: ModelRunner, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
    """Append each sequence's greedy token (the engine's sampler) and run one decode step of the batch."""
    for s, tok in zip(seqs, runner.sample(seqs, logits)):
        s.output_ids.append(tok)
    logits = runner.forward(seqs, [1] * len(seqs))
    for s in seqs:
        s.num_cached += 1
    return logits


def profile_section(runner: ModelRunner, p, rng: random.Random, cs=None, steps: int = 20) -> dict:
    """Where a decode step's GPU time goes, at batch 1 and at the largest batch: kernels by time per
    step (torch.profiler, CUDA graphs replayed as in serving), with and without the anchor set."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for b in sorted({1, max(p["batches"])}):
        for label, anchor in (("none", None), ("anchors", cs)):
            seqs = requests(rng, b, p["prompt"], steps + 2, runner.args.vocab_size, anchor)
            for s in seqs:
                runner.blocks.grow(s.block_table, len(s) + steps + 2)
            try:
                logits = runner.forward(seqs, [len(s) for s in seqs])
                for s in seqs:
                    s.num_cached = len(s)
                logits = greedy_step(runner, seqs, logits)  # the step's graph is captured outside the profile
                sync(runner.device)
                cuda = runner.device.type == "cuda"  # the CPU (--smoke) reports operators' own CPU time instead
                with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
                    for _ in range(steps):
                        logits = greedy_step(runner, seqs, logits)
                    sync(runner.device)
            finally:
                for s in seqs:
                    runner.blocks.release(s.block_table)
            spent = (lambda e: e.device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
            rows = sorted(((e.key, spent(e) / steps, e.count / steps) for e in prof.key_averages() if spent(e) > 0),
                          key=lambda r: -r[1])
            total = sum(r[1] for r in rows)
            name = label if b == 1 else f"b{b}_{label}"
            out[name] = {"batch": b, "gpu_us_per_step": total, "kernels_per_step": sum(r[2] for r in rows),
                         "top": [{"kernel": k[:120], "us_per_step": t, "calls_per_step": c} for k, t, c in rows[:15]]}
            log(f"  B={b} {label}: {total:.0f} us of kernels per step in {out[name]['kernels_per_step']:.0f} "
                "launches; top:")
            for k, t, c in rows[:12]:
                log(f"    {t:8.1f} us {c:5.0f}x  {k[:100]}")
    return out


PHASES = ("schedule", "forward:decode", "sample", "append")
GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")


def step_timeline(trace: dict) -> list[dict]:
    """Each decode step of a profiled serve() (a Chrome trace with its phase marks), in us: the
    host's time in each phase, and the device's busy and idle time between the step's first mark and
    its last (busy: the union of the kernels, copies and memsets running in that window), and the
    host's time in cudaGraphLaunch (0 on the CPU)."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    marks = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"] in PHASES + ("forward:prefill",)),
                   key=lambda e: e["ts"])
    gpu = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_WORK)
    launches = [(e["ts"], e["dur"]) for e in events if e.get("cat") == "cuda_runtime" and e["name"] == "cudaGraphLaunch"]
    steps, current = [], []
    for e in marks:
        if e["name"] == "schedule" and current:
            steps.append(current)
            current = []
        current.append(e)
    steps.append(current)
    out = []
    for step in steps:
        names = [e["name"] for e in step]
        if names != list(PHASES):  # a prefill step, or the last (nothing left to append)
            continue
        lo, hi = step[0]["ts"], step[-1]["ts"] + step[-1]["dur"]
        busy, edge = 0.0, lo
        for a, b in gpu:  # sorted by start: the union of the intervals clipped to [lo, hi]
            a, b = max(a, edge), min(b, hi)
            if b > a:
                busy += b - a
                edge = b
        row = {name: e["dur"] for name, e in zip(names, step)}
        first = next((a for a, b in gpu if a >= lo), hi)
        row.update(wall=hi - lo, gpu_busy=busy, gpu_idle=hi - lo - busy, host_lead=min(first, hi) - lo,
                   graph_launch=sum(d for t, d in launches if lo <= t < hi))  # host time in cudaGraphLaunch
        out.append(row)
    return out


def prefill_timeline(trace: dict) -> list[dict]:
    """Each prefill forward of a profiled serve(), in us: the host's time launching it (the
    forward:prefill mark), its launches, and the device's time on the kernels those launches queued
    (busy: their durations summed; span: first start to last end; after: how long the device still ran
    once the host had finished launching). busy close to the host's time means the launches, not the
    GPU, set the prefill's pace."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    marks = [e for e in events if e.get("cat") == "user_annotation" and e["name"] == "forward:prefill"]
    # Runtime and driver API launches: cuBLAS and Triton kernels come through the driver's cuLaunchKernel(Ex)
    # (a first version counted the runtime's alone, 22 of a prefill's launches; e2e_bench_prefill_timeline.json).
    launches = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and "Launch" in e["name"]]
    work = {e["args"]["correlation"]: e for e in events
            if e.get("cat") in GPU_WORK and "correlation" in e.get("args", {})}
    out = []
    for m in marks:
        lo, hi = m["ts"], m["ts"] + m["dur"]
        mine = [e for e in launches if lo <= e["ts"] < hi]
        kernels = [work[c] for c in (e.get("args", {}).get("correlation") for e in mine) if c in work]
        end = max((k["ts"] + k["dur"] for k in kernels), default=hi)
        out.append({"host_us": m["dur"], "launches": len(mine), "device_busy_us": sum(k["dur"] for k in kernels),
                    "device_span_us": end - min((k["ts"] for k in kernels), default=end),
                    "device_after_us": max(0.0, end - hi)})
    return out


def timeline_section(runner, sched, p, rng, cs, steps: int = 24, keep: str | None = None) -> dict:
    """Where a decode step's wall time goes, at batch 1 and at the largest batch, without and with the
    anchor set: serve() under torch.profiler (host and device activity), each step split into the host's
    phases (schedule, forward: inputs and graph launch, sample: the draw and the token read-back,
    append) and the device's busy and idle time. Medians over the decode steps; profiling slows the
    host a little, the same for both. keep: a folder for the raw traces."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    out = {}
    for b in sorted({1, max(p["batches"])}):
        for label, anchor in (("none", None), ("anchors", cs)):
            seqs = requests(rng, b, p["prompt"], steps, runner.args.vocab_size, anchor)
            with profile(activities=activities) as prof:
                serve(runner, sched, seqs, marks=True)
            if keep:
                os.makedirs(keep, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(keep or tmp, f"timeline_b{b}_{label}.json")
                prof.export_chrome_trace(path)
                with open(path) as f:
                    trace = json.load(f)
                rows, prefills = step_timeline(trace), prefill_timeline(trace)
            if not rows:
                raise SystemExit(f"timeline: no decode step found in the trace of B={b} {label}")
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            name = f"b{b}_{label}"
            out[name] = {"batch": b, "decode_steps": len(rows), "median_us": med, "prefill": prefills}
            log(f"  B={b:>4} {label:8}: step {med['wall']:7.0f} us = device busy {med['gpu_busy']:7.0f} + idle "
                f"{med['gpu_idle']:6.0f} (first kernel after {med['host_lead']:5.0f}); host: schedule "
                f"{med['schedule']:5.0f}, forward {med['forward:decode']:5.0f} (graph launch {med['graph_launch']:4.0f}), "
                f"sample {med['sample']:6.0f}, "
                f"append {med['append']:5.0f}")
            for i, pf in enumerate(prefills):
                log(f"    prefill {i}: host {pf['host_us']:7.0f} us, {pf['launches']} launches; device busy "
                    f"{pf['device_busy_us']:7.0f}, span {pf['device_span_us']:7.0f}, after the host {pf['device_after_us']:6.0f}")
    return out


def protocol_section(p, device, dtype) -> dict:
    """nano-vllm's bench.py: 256 requests, lengths uniform in 100..1024, all at once; no anchors, no commits."""
    lo, hi = p["protocol_lengths"]
    n = p["protocol_requests"]
    hf, lm = build_pair(p["protocol_model"], device, dtype)
    del hf  # only its weights are needed, and ours hold them
    gc.collect()
    prng = random.Random(0)
    lens = [(prng.randint(lo, hi), prng.randint(lo, hi)) for _ in range(n)]
    need = sum(cdiv(i + o, BLOCK) * BLOCK for i, o in lens)
    # An anchor pool as the engine sizes it by default, though unused: its (empty) anchor routing is
    # part of every captured decode step.
    runner = make_runner(lm, seq_tokens=need, max_model_len=2 * hi, anchor_tokens=RunnerConfig().max_anchor_len,
                         anchor_sets=1)
    sched = Scheduler(runner.blocks, max_num_seqs=p["max_num_seqs"], max_num_batched_tokens=p["max_num_batched_tokens"])
    vocab = lm.args.vocab_size
    make = lambda: [Sequence(random_ids(prng, i, vocab), SamplingParams(max_tokens=o, ignore_eos=True))  # noqa: E731
                    for i, o in lens]
    # The same lengths once untimed: every (batch, context) bucket's decode graph the run meets is
    # captured and every kernel variant compiled, as a server that has run a while has them
    log(f"{p['protocol_model']}: the workload once untimed (graphs, kernels)")
    serve(runner, sched, make())
    seqs = make()
    log(f"{p['protocol_model']}: {n} requests, {sum(i for i, _ in lens)} prompt and {sum(o for _, o in lens)} output tokens")
    run = summarize(serve(runner, sched, seqs))
    run.update(model=p["protocol_model"], requests=n, lengths=[lo, hi], prompt_tokens=sum(i for i, _ in lens))
    log(f"  {run['tok_s']:.0f} output tok/s in {run['seconds']:.2f} s; TTFT p50 {run['ttft_ms_p50']:.0f} ms, "
        f"p99 {run['ttft_ms_p99']:.0f} ms; ITL p50 {run['itl_ms_p50']:.2f} ms, p99 {run['itl_ms_p99']:.2f} ms; "
        f"{run['preemptions']} preemptions")
    del runner, lm
    return run


def print_table(res: dict) -> None:
    print("\n== e2e_bench ==")
    print(f"{'what':44}{'value':>12}{'goal':>10}  met")

    def row(what: str, value: float, goal: float | None = None, lower: bool = False) -> None:
        met = "" if goal is None else ("yes" if (value <= goal if lower else value >= goal) else "NO")
        print(f"{what:44}{value:>12.3f}{'' if goal is None else format(goal, '>10.2f')}  {met}")

    for b, r in res.get("anchors", {}).items():
        row(f"B={b} tokens/s anchors / none", r["anchors_vs_none"], GOALS["anchors_vs_none"])
        row("  the best any kernel could do (bound)", r["bound"]["bound"])
    for b, r in res.get("sampling", {}).items():
        row(f"B={b} tokens/s sampled / greedy", r["sampled_vs_greedy"])
    for b, r in res.get("hf", {}).items():
        row(f"B={b} tokens/s ours / HF generate", r["ours_vs_hf"], GOALS["vs_hf"])
    for label in ("none", "anchors"):
        f = res.get("floor", {}).get(label)
        if f:
            row(f"B=1 decode step / floor ({label})", f["step_vs_floor"], GOALS["step_vs_floor"], lower=True)
            row(f"B=1 decode step / copy floor ({label})", f["step_vs_floor_copy"], GOALS["step_vs_floor"], lower=True)
    pr = res.get("protocol")
    if pr:
        row(f"{pr['model']}, {pr['requests']} requests: output tok/s", pr["tok_s"])
        for key, what in (("ttft", "time to first token"), ("itl", "inter-token latency")):
            for q in ("p50", "p99"):
                row(f"  {what} {q} (ms)", pr[f"{key}_ms_{q}"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny configs on the CPU: checks the script in seconds")
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-commit", action="store_true", help="no K/V commit of finished sequences in section 1")
    ap.add_argument("--hf-compile", action="store_true", help="let HF generate torch.compile its static-cache forward")
    ap.add_argument("--bandwidth", type=float, default=4.27e12, help="B/s for the decode floor (default 4.27e12)")
    ap.add_argument("--model", default=None, help="model of sections 1-3 (default llama-3.2-1b; e.g. llama-3-8b)")
    ap.add_argument("--skip", default="",
                    help="comma-separated sections to skip: anchors, overlap, sampling, profile, timeline, hf, protocol")
    ap.add_argument("--traces", default=None, help="a folder to keep the timeline section's profiler traces in")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "e2e_bench.json"))
    args = ap.parse_args()
    p = dict(SMOKE if args.smoke else FULL)
    p["model"] = args.model or p["model"]
    skip = set(filter(None, args.skip.split(",")))
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    res = {"meta": meta(device, args.smoke), "params": p, "goals": GOALS, "commit": not args.no_commit,
           "hf_compile": args.hf_compile}
    log(f"e2e_bench: {res['meta']}")
    t0 = time.time()

    def save() -> None:
        res["seconds"] = time.time() - t0
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    rng = random.Random(0)
    log(f"{p['model']}: building HF and our model on {device} ({dtype})")
    hf, lm = build_pair(p["model"], device, dtype)
    per_seq = cdiv(p["prompt"] + p["new"], BLOCK) * BLOCK
    runner = make_runner(lm, seq_tokens=max(max(p["batches"]) * per_seq, p["anchors"]) + 256 * BLOCK,
                         max_model_len=p["prompt"] + p["new"], anchor_tokens=p["anchors"], anchor_sets=1)
    sched = Scheduler(runner.blocks, max_num_seqs=p["max_num_seqs"], max_num_batched_tokens=p["max_num_batched_tokens"])
    with tempfile.TemporaryDirectory(prefix="e2e-bench-") as folder:
        bench = AnchorBench(runner, folder, p["anchors"], rng)
        try:
            (cs, compile_s) = bench.compile(p["anchors"], p["anchor_states"])
            res["anchor_set"] = {"tokens": len(cs.tokens), "compile_s": compile_s, "profile": bench.profile.digest}
            log(f"{p['model']}: anchor set of {len(cs.tokens)} tokens compiled in {compile_s:.2f} s; warming graphs")
            warm(runner, sched, max(p["batches"]), rng, cs, p["prompt"])
            log(f"{p['model']}: {p['prompt']}-token prompts, {p['new']} new tokens, commit "
                f"{'off' if args.no_commit else 'on'}")
            if "anchors" not in skip:
                res["anchors"] = anchors_section(runner, sched, bench, cs, p, rng, not args.no_commit)
                save()
            if "overlap" not in skip:
                log(f"{p['model']}: steps queued before the step before is read vs one after the other")
                res["overlap"] = overlap_section(runner, sched, p, rng, cs)
                save()
            if "sampling" not in skip:
                log(f"{p['model']}: sampled generation vs greedy")
                res["sampling"] = sampling_section(runner, sched, p, rng)
                save()
            if "profile" not in skip:
                log(f"{p['model']}: where a decode step's GPU time goes")
                res["profile"] = profile_section(runner, p, rng, cs)
                save()
            if "timeline" not in skip:
                log(f"{p['model']}: where a decode step's wall time goes")
                res["timeline"] = timeline_section(runner, sched, p, rng, cs, keep=args.traces)
                save()
        finally:
            bench.close()
    if "anchors" in res:  # the floor and HF generate compare with its runs
        log(f"{p['model']}: batch-1 decode step vs the bandwidth floor")
        res["floor"] = floor_section(lm, res["anchors"], p, args.bandwidth, device)
        save()
    if "hf" not in skip and "anchors" in res:
        log(f"{p['model']}: HF generate (static cache{', torch.compile' if args.hf_compile else ', eager'})")
        res["hf"] = hf_section(hf, p, device, res["anchors"], args.hf_compile)
        save()
    del hf, lm, runner, sched, bench
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    sync(device)
    if "protocol" not in skip:
        res["protocol"] = protocol_section(p, device, dtype)
        save()
    print_table(res)
    log(f"e2e_bench done in {time.time() - t0:.0f} s; JSON in {args.out}")


if __name__ == "__main__":
    main()
