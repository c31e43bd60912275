"""The step loop (fieldprint/engine/stepper.py) on a tiny random model on the CPU: each step queued
before the step before is read gives what steps in order give, through chunked prompts, stops on a
token, preemption and the model's length limit; a failing or abandoned step leaves nothing behind."""

from __future__ import annotations

import random

import pytest

from fieldprint.engine.scheduler import Scheduler
from fieldprint.engine.sequence import SamplingParams, Sequence, Status
from fieldprint.engine.stepper import Stepper


def _requests(vocab: int, n: int, seed: int, sampled: bool = False) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, 60))] for _ in range(n)]


def _serve(runner, prompts, overlap: bool, max_batched: int = 64, limit: int | None = None, sampled: bool = False):
    """Every prompt at once, stepped until idle: (tokens, finish reason, cached count at finish) each,
    and the preemptions. A sequence stops on a token divisible by 11, or at max_tokens."""
    sched = Scheduler(runner.blocks, max_num_seqs=32, max_num_batched_tokens=max_batched)
    limit = limit or runner.config.max_model_len
    params = [SamplingParams(max_tokens=3 + i % 17, ignore_eos=True,
                             **({"temperature": 0.9, "top_k": 20, "seed": i} if sampled and i % 2 else {}))
              for i in range(len(prompts))]
    seqs = [Sequence(p, q) for p, q in zip(prompts, params)]  # the prompt lists themselves: callers key on them
    cached = {}

    def reason(s: Sequence, tok: int) -> str | None:
        if tok % 11 == 0:
            return "stop"
        return "length" if len(s.output_ids) >= s.params.max_tokens or len(s) >= limit else None

    stepper = Stepper(runner, sched, reason, lambda s: cached.__setitem__(s.seq_id, s.num_cached), overlap=overlap)
    for s in seqs:
        sched.add(s)
    for _ in range(10_000):
        if stepper.idle:
            break
        stepper.step()
    assert stepper.idle and runner.blocks.num_free == runner.blocks.num_blocks - 1
    return [(s.output_ids, s.finish_reason, cached[s.seq_id]) for s in seqs], sum(s.preemptions for s in seqs)


def _at_max_tokens(runner, prompts, max_tokens, on_finish=lambda s: None, **kw):
    """(scheduler, sequences, stepper): each prompt queued to end at its max_tokens."""
    sched = Scheduler(runner.blocks, max_num_seqs=8, max_num_batched_tokens=256)
    seqs = [Sequence(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in zip(prompts, max_tokens)]
    stepper = Stepper(runner, sched, lambda s, t: "length" if len(s.output_ids) >= s.params.max_tokens else None,
                      on_finish, **kw)
    for s in seqs:
        sched.add(s)
    return sched, seqs, stepper


@pytest.mark.parametrize("case", ["chunked", "preempted", "stopped in flight", "sampled"])
def test_overlapped_steps_give_what_steps_in_order_give(tiny_model, make_runner, case):
    lm, _ = tiny_model("llama")
    # "preempted": 25 blocks of 4 tokens for 12 sequences of up to 79 tokens: decode steps run out of
    # blocks. "stopped in flight": 40 blocks, where a sequence's first token, drawn in a prefill step,
    # stops it; a decode step queued before that token was read would have preempted it, giving its
    # blocks (and the K/V its finish commits) away.
    pool = {"preempted": 100, "stopped in flight": 160}.get(case, 2048)
    runner = make_runner(lm, cpu_cache_tokens=pool)
    prompts = _requests(lm.args.vocab_size, 12, seed=9 if case == "stopped in flight" else len(case))
    kw = {"max_batched": 16 if case == "chunked" else 64, "sampled": case == "sampled"}
    in_order, pre_a = _serve(runner, prompts, overlap=False, **kw)
    overlapped, pre_b = _serve(runner, prompts, overlap=True, **kw)
    assert overlapped == in_order
    # every finished sequence's K/V count: its tokens but the last, which no step has run
    assert all(c == len(p) + len(out) - 1 for (out, _, c), p in zip(overlapped, prompts))
    reasons = {r for _, r, _ in overlapped}
    assert reasons == {"stop", "length"}, reasons
    if case != "chunked" and case != "sampled":
        assert pre_a > 0 and (pre_b > 0 or case == "stopped in flight")


def test_a_sequence_whose_last_token_is_in_flight_runs_no_step_after_it(tiny_model, make_runner, monkeypatch):
    """A sequence ending at max_tokens or at the model's length limit is known to end before its last
    token is read: it is held out of the step queued meanwhile, so it runs one prefill step and one
    decode step per later token, and gets what steps in order give."""
    lm, _ = tiny_model("llama")
    runner = make_runner(lm, max_model_len=40)
    rng = random.Random(9)
    # four 4 tokens from the limit, four that end at max_tokens first
    prompts = [[rng.randrange(lm.args.vocab_size) for _ in range(n)] for n in [36] * 4 + [20] * 4]
    in_order, _ = _serve(runner, prompts, overlap=False, max_batched=512, limit=40)  # one prefill step each
    steps: dict[int, int] = {}
    forward = runner.forward

    def counting(seqs, counts, feed=None):
        for q in seqs:
            steps[id(q.prompt_ids)] = steps.get(id(q.prompt_ids), 0) + 1
        return forward(seqs, counts, feed)

    monkeypatch.setattr(runner, "forward", counting)
    overlapped, _ = _serve(runner, prompts, overlap=True, max_batched=512, limit=40)
    assert overlapped == in_order
    ends = [(r, len(p) + len(out)) for (out, r, _), p in zip(overlapped, prompts)]
    assert ("length", 40) in ends and any(r == "length" and n < 40 for r, n in ends), ends
    for (out, r, _), p in zip(overlapped, prompts):
        if r == "length":
            assert steps[id(p)] == len(out), (steps[id(p)], len(out))


def test_a_failing_step_leaves_no_placeholder_and_the_next_one_goes_on(tiny_model, make_runner, monkeypatch):
    lm, _ = tiny_model("llama")
    runner = make_runner(lm)
    _, seqs, stepper = _at_max_tokens(runner, _requests(lm.args.vocab_size, 3, seed=4), [12] * 3)
    for _ in range(3):
        stepper.step()
    before = [list(s.output_ids) for s in seqs]
    forward = runner.forward

    def broken(*args, **kw):
        raise RuntimeError("device lost")

    monkeypatch.setattr(runner, "forward", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        stepper.step()
    # the step before's tokens were read and appended; no placeholder stands in for anything
    assert [len(s.output_ids) for s in seqs] == [len(b) + 1 for b in before] and stepper.queued is None
    monkeypatch.setattr(runner, "forward", forward)
    while not stepper.idle:
        stepper.step()
    assert all(len(s.output_ids) == 12 and s.status is Status.FINISHED for s in seqs)
    assert runner.blocks.num_free == runner.blocks.num_blocks - 1


def test_sequences_finished_while_a_step_is_queued_are_dropped_from_it(tiny_model, make_runner):
    """An abandoned request (the engine finishes it in the scheduler) may still be in the queued step:
    reading that step skips it, and its blocks are free."""
    lm, _ = tiny_model("llama")
    runner = make_runner(lm)
    sched, seqs, stepper = _at_max_tokens(runner, _requests(lm.args.vocab_size, 2, seed=5), [20] * 2)
    for _ in range(3):
        stepper.step()
    assert stepper.queued is not None and seqs[0] in stepper.queued.seqs
    kept = list(seqs[0].output_ids)
    sched.finish(seqs[0])
    while not stepper.idle:
        stepper.step()
    assert seqs[0].output_ids == kept and len(seqs[1].output_ids) == 20
    assert runner.blocks.num_free == runner.blocks.num_blocks - 1


@pytest.mark.parametrize("overlap", [False, True])
def test_every_token_of_a_step_is_out_before_any_finish_work(tiny_model, make_runner, overlap):
    """A finish's work (a K/V commit may block on the committer's queue) runs after every token of
    its step is appended: the sequences that go on, and the others ending there, do not wait on it."""
    lm, _ = tiny_model("llama")
    runner = make_runner(lm)
    seen = []
    _, seqs, stepper = _at_max_tokens(runner, _requests(lm.args.vocab_size, 4, seed=6), (5, 5, 5, 9),
                                      lambda s: seen.append([len(q.output_ids) for q in seqs]), overlap=overlap)
    while not stepper.idle:
        stepper.step()
    # the three ending at 5 tokens: each finish sees all three done and the fourth at 5 tokens
    assert seen[:3] == [[5, 5, 5, 5]] * 3 and seen[3] == [5, 5, 5, 9], seen
