"""The engine's host work per step, side by side, on the CPU (no GPU needed; times are this host's).

1. A decode step's inputs (`ModelRunner.inputs`, one packed buffer) at B = 1/8/128, 512 tokens of
   context, graph-bucketed as on CUDA, without and with a 2k-token anchor set shared by the batch;
   and the host's whole scheduling work per decode step: `Scheduler.schedule()` (a block for each
   sequence every 16 tokens), `inputs()` and the token bookkeeping, over 64 consecutive steps.
2. Stop strings: the whole output decoded after every token vs `tail_has_stop`, at 64 and 512 output
   tokens (SmolLM2's tokenizer; real text and random ids).
3. Streaming text: the whole output decoded per token vs `StreamText.update`, per token of a
   512-token stream.
    python benchmarks/host_bench.py [--only inputs|text] [--out FILE]
The figures before this commit's predecessors came from `--only inputs` run in a checkout of the
older commit (results/host_bench_before.json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import timeit

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from engine_bench import build_pair, log, make_runner, meta, random_ids  # noqa: E402

from fieldprint.engine import loader  # noqa: E402
from fieldprint.engine.scheduler import Scheduler  # noqa: E402
from fieldprint.engine.sequence import SamplingParams, Sequence  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog, and then Grüße aus Köln, 東京の天気は晴れ. " * 40)
STOPS = ("\nUser:", "</answer>")


def us(fn, number: int) -> float:
    """Best of three timings of `number` calls, in microseconds per call."""
    return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6


def inputs_section() -> dict:
    _, lm = build_pair("tiny-llama", torch.device("cpu"), torch.float32)
    runner = make_runner(lm, seq_tokens=200_000, max_model_len=4096, anchor_tokens=4096)
    runner.use_graphs = True  # plan the step as CUDA would: padded to its batch and context buckets
    # A 2k-token anchor set shared by the batch: what anchors add to a step's inputs (its routing rows).
    shared = runner.anchor_pool.reserve("shared", 2048) if hasattr(runner, "anchor_pool") else None
    rng, out = random.Random(0), {}
    for b in (1, 8, 128):
        out[str(b)] = {}
        for label, key in (("inputs_us", None), ("inputs_anchors_us", "shared" if shared else None)):
            if label == "inputs_anchors_us" and key is None:
                continue  # an older tree without anchor sets in its runner
            seqs = [Sequence(random_ids(rng, 512, lm.args.vocab_size), SamplingParams(max_tokens=64), anchor_key=key,
                             anchor_len=2048 if key else 0) for _ in range(b)]
            for s in seqs:
                runner.blocks.grow(s.block_table, 513)
                s.num_cached = 512
                s.output_ids.append(1)
            out[str(b)][label] = us(lambda seqs=seqs, b=b: runner.inputs(seqs, [1] * b), 20 if b > 8 else 200)
            for s in seqs:
                runner.blocks.release(s.block_table)
        log(f"  decode inputs B={b:>3}: {out[str(b)]['inputs_us']:8.1f} us" + (
            f", with a shared 2k anchor set {out[str(b)]['inputs_anchors_us']:8.1f} us" if shared else ""))
    return out


def steps_section(steps: int = 64) -> dict:
    """schedule() + inputs() + appending the token, per decode step, B = 1/8/128 after 512-token prompts."""
    _, lm = build_pair("tiny-llama", torch.device("cpu"), torch.float32)
    runner = make_runner(lm, seq_tokens=200_000, max_model_len=4096, anchor_tokens=4096)
    runner.use_graphs = True
    runner.anchor_pool.reserve("shared", 2048)
    rng, out = random.Random(1), {}
    for b in (1, 8, 128):
        out[str(b)] = {}
        for label, key in (("step_us", None), ("step_anchors_us", "shared")):
            sched = Scheduler(runner.blocks, max_num_seqs=256, max_num_batched_tokens=8192)
            seqs = [Sequence(random_ids(rng, 512, lm.args.vocab_size), SamplingParams(max_tokens=4 * steps), anchor_key=key,
                             anchor_len=2048 if key else 0) for _ in range(b)]
            for s in seqs:
                sched.add(s)
            while sched.waiting:  # the prompts, as prefill steps
                for s, n in zip(*sched.schedule()):
                    s.num_cached += n
            for s in seqs:
                s.output_ids.append(1)

            def decode_steps(sched=sched) -> None:
                for _ in range(steps):
                    batch, counts = sched.schedule()
                    runner.inputs(batch, counts)
                    for s in batch:
                        s.num_cached += 1
                        s.output_ids.append(1)

            out[str(b)][label] = us(decode_steps, 1) / steps
            for s in seqs:
                sched.finish(s)
        log(f"  decode step's host work B={b:>3}: {out[str(b)]['step_us']:8.1f} us, with a shared 2k anchor set "
            f"{out[str(b)]['step_anchors_us']:8.1f} us (schedule, inputs, bookkeeping)")
    return out


def text_sections() -> dict:
    from fieldprint.engine.engine import tail_has_stop  # here: --only inputs runs on older trees too

    folder, gguf = loader.resolve_source(loader.SMOLLM2)
    tok = loader.load_tokenizer(folder, gguf, loader._cache_dir(folder, gguf))
    special = frozenset(tok.all_special_ids)
    rng = random.Random(0)
    outputs = {"text": tok(TEXT, add_special_tokens=False)["input_ids"][:512],
               "random ids": [rng.randrange(200, 40000) for _ in range(512)]}
    stops, stream = {}, {}
    for kind, ids in outputs.items():
        for n in (64, 512):
            whole = us(lambda ids=ids, n=n: any(s in tok.decode(ids[:n], skip_special_tokens=True) for s in STOPS), 200)
            tail = us(lambda ids=ids, n=n: tail_has_stop(tok, ids[:n], STOPS, special), 200)
            stops[f"{kind}, {n}"] = {"whole_us": whole, "tail_us": tail, "tail_vs_whole": tail / whole}
            log(f"  stop check, {kind}, {n} tokens: whole {whole:7.1f} us, tail {tail:6.1f} us (x{tail / whole:.3f})")
        # a whole 512-token stream, per token: every prefix decoded whole vs one window update each
        whole = us(lambda ids=ids: [tok.decode(ids[:k], skip_special_tokens=True) for k in range(1, 513)], 1) / 512
        window = us(lambda ids=ids: _stream(tok, ids), 1) / 512
        stream[kind] = {"whole_us": whole, "window_us": window, "window_vs_whole": window / whole}
        log(f"  stream text, {kind}, per token of 512: whole {whole:7.1f} us, window {window:6.1f} us "
            f"(x{window / whole:.3f})")
    return {"stop_check": stops, "stream_text": stream}


def _stream(tok, ids: list[int]) -> str:
    from fieldprint.engine.engine import StreamText

    text = StreamText(tok)
    for k in range(1, len(ids) + 1):
        text.update(ids[:k])
    return text.text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "host_bench.json"))
    ap.add_argument("--only", choices=("inputs", "text"), help="one section (inputs: also runs against older commits)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = {"meta": meta(torch.device("cpu"), False)}
    log("host work per decode step (CPU)")
    if args.only != "text":
        res["inputs"] = inputs_section()
        res["steps"] = steps_section()
    if args.only != "inputs":
        res.update(text_sections())
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    log(f"JSON in {args.out}")


if __name__ == "__main__":
    main()
