"""The continuous-batching scheduler over a real BlockManager, without a model.

`_step` plays the engine's part of a step (fieldprint/engine/engine.py, Engine.step): the scheduled
tokens become cached, a sequence whose tokens are all cached gets one new token, and a sequence that
reached max_tokens finishes. The token value is irrelevant to scheduling, so it is always 7.
"""

from __future__ import annotations

import pytest

from fieldprint.engine.kv_cache import BlockManager
from fieldprint.engine.scheduler import Scheduler
from fieldprint.engine.sequence import SamplingParams, Sequence, Status
from fieldprint.errors import EngineError


def _seq(prompt_len: int, max_tokens: int) -> Sequence:
    return Sequence(list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def _step(sched: Scheduler) -> tuple[list[Sequence], list[int], list[Sequence]]:
    """One step: (scheduled sequences, their new-token counts, sequences that finished)."""
    seqs, counts = sched.schedule()
    done = []
    for s, n in zip(seqs, counts):
        s.num_cached += n
        if s.num_cached == len(s):
            s.output_ids.append(7)
            if len(s.output_ids) >= s.params.max_tokens:
                sched.finish(s)
                done.append(s)
    return seqs, counts, done


def _run(sched: Scheduler, max_steps: int = 1000) -> list[Sequence]:
    """Step until idle; the finished sequences in finishing order. Fails if the scheduler stops making progress.

    A decode step that preempts every running sequence schedules nothing; the step after it must.
    """
    finished, empty = [], 0
    for _ in range(max_steps):
        if sched.idle:
            return finished
        seqs, _, done = _step(sched)
        empty = 0 if seqs else empty + 1
        assert empty < 2, f"two steps scheduled nothing while {len(sched.waiting)} wait and {len(sched.running)} run"
        finished += done
    pytest.fail(f"not idle after {max_steps} steps")


def test_admission_is_fifo_and_bounded_by_max_num_seqs():
    blocks = BlockManager(64, 4)
    sched = Scheduler(blocks, max_num_seqs=2, max_num_batched_tokens=1000)
    a, b, c = _seq(5, 3), _seq(9, 3), _seq(3, 3)
    for s in (a, b, c):
        sched.add(s)
    seqs, counts, _ = _step(sched)
    assert seqs == [a, b] and counts == [5, 9]  # whole prompts, in arrival order; c is over max_num_seqs
    assert list(sched.running) == [a, b] and list(sched.waiting) == [c]
    seqs, counts, _ = _step(sched)
    assert seqs == [a, b] and counts == [1, 1]  # a decode step: c still waits for a free seat
    _step(sched)  # a and b reach max_tokens
    assert a.is_finished and b.is_finished and list(sched.waiting) == [c]
    seqs, counts, _ = _step(sched)
    assert seqs == [c] and counts == [3]
    assert _run(sched) == [c]
    assert blocks.num_free == 63  # every block back (block 0 is never handed out)


def test_prefill_of_a_prompt_longer_than_the_budget_is_chunked_and_nobody_jumps_it():
    blocks = BlockManager(64, 4)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=16)
    long, short = _seq(40, 2), _seq(5, 2)
    sched.add(long)
    sched.add(short)
    plan = []
    for _ in range(3):
        seqs, counts, _ = _step(sched)
        plan.append([(s is long and "long" or "short", n) for s, n in zip(seqs, counts)])
    # 16 + 16 + 8 tokens of the long prompt; the short one joins only in the step the long one's last chunk leaves room in
    assert plan == [[("long", 16)], [("long", 16)], [("long", 8), ("short", 5)]]
    assert long.status is Status.RUNNING and long.output_ids == [7]  # the last chunk's logits gave its first token
    assert len(long.block_table) == 10  # 40 prompt tokens / 4 per block
    assert {s.seq_id for s in _run(sched)} == {long.seq_id, short.seq_id}
    assert blocks.num_free == 63


def test_preempted_sequence_goes_to_the_head_of_the_queue_and_completes():
    blocks = BlockManager(5, 4)  # 4 usable blocks = 16 tokens
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=1000)
    a, b, c = _seq(7, 8), _seq(7, 8), _seq(3, 2)
    sched.add(a)
    sched.add(b)
    seqs, _, _ = _step(sched)  # both prompts prefilled: 2 blocks each, the pool is full
    assert seqs == [a, b] and blocks.num_free == 0
    sched.add(c)  # arrives after them
    _step(sched)  # decode: 8 tokens each, still 2 blocks each
    seqs, _, _ = _step(sched)  # a's 9th token needs a third block: b (the last admitted) is preempted
    assert seqs == [a] and b.preemptions == 1 and b.num_cached == 0 and b.block_table == []
    assert list(sched.waiting) == [b, c]  # ahead of c, which arrived later
    b_output_so_far = list(b.output_ids)
    finished = _run(sched)
    assert finished[0] is a and {s.seq_id for s in finished} == {a.seq_id, b.seq_id, c.seq_id}
    assert b.output_ids[: len(b_output_so_far)] == b_output_so_far and len(b.output_ids) == 8  # recomputed, not restarted
    assert blocks.num_free == 4


def test_a_partly_prefilled_sequence_never_blocks_the_head_of_the_queue():
    # a runs; b's long prompt is prefilled in chunks and holds most of the pool; a then needs a block,
    # is preempted and goes back to the head of the queue, ahead of the half-prefilled b. The blocks
    # b holds must come back, or a can never be admitted again and every later step is empty.
    blocks = BlockManager(9, 4)  # 8 usable blocks = 32 tokens
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=8)
    a, b = _seq(12, 16), _seq(24, 4)
    sched.add(a)
    sched.add(b)
    finished = _run(sched, max_steps=200)
    assert {s.seq_id for s in finished} == {a.seq_id, b.seq_id}
    assert len(a.output_ids) == 16 and len(b.output_ids) == 4
    assert blocks.num_free == 8


def test_many_requests_on_a_small_pool_all_complete():
    blocks = BlockManager(9, 4)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=10)
    seqs = [_seq(3 + (5 * i) % 17, 2 + (3 * i) % 9) for i in range(12)]
    for s in seqs:
        sched.add(s)
    finished = _run(sched, max_steps=2000)
    assert sorted(s.seq_id for s in finished) == sorted(s.seq_id for s in seqs)
    assert all(len(s.output_ids) == s.params.max_tokens for s in seqs)
    assert blocks.num_free == 8


def test_a_request_that_could_never_fit_is_refused_at_add():
    blocks = BlockManager(5, 4)  # 16 usable tokens
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=100)
    with pytest.raises(EngineError, match="cannot fit the KV cache"):
        sched.add(_seq(10, 7))
    assert sched.idle and blocks.num_free == 4  # nothing queued, nothing taken
    exact = _seq(10, 6)  # 16 tokens: fits exactly
    sched.add(exact)
    assert _run(sched) == [exact]


def test_finish_of_a_waiting_sequence_releases_its_chunk_blocks():
    blocks = BlockManager(64, 4)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=8)
    s = _seq(30, 2)
    sched.add(s)
    _step(sched)  # one chunk of 8 tokens: s still waits but holds 2 blocks
    assert s.status is Status.WAITING and len(s.block_table) == 2
    sched.finish(s)  # the engine does this when a request is abandoned
    assert sched.idle and blocks.num_free == 63 and s.is_finished


def test_token_at_is_the_joined_token_list():
    from fieldprint.engine.sequence import SamplingParams, Sequence

    s = Sequence([5, 6, 7], SamplingParams())
    s.output_ids += [8, 9]
    assert [s.token_at(i) for i in range(len(s))] == s.tokens == [5, 6, 7, 8, 9]


def test_decode_fits_counts_the_blocks_the_next_tokens_need():
    blocks = BlockManager(num_blocks=6, block_size=4)  # 5 usable
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    a, b, c = _seq(8, 9), _seq(7, 9), _seq(6, 9)
    for s in (a, b):
        sched.add(s)
    _step(sched)  # both prefilled (2 blocks each) and one token each: 9 and 8 tokens
    assert blocks.num_free == 1 and (len(a), len(b)) == (9, 8)
    assert not sched.decode_fits()  # a's 10th and b's 9th token need a third block each: one is free
    sched.finish(b)
    sched.add(c)
    _step(sched)  # c prefilled into b's blocks, one token drawn: 7 tokens
    assert blocks.num_free == 1 and (len(a), len(c)) == (9, 7)
    assert sched.decode_fits()  # a needs the free block, c's 8th token fits its second


def test_kept_blocks_count_as_free_and_go_oldest_first_when_the_free_list_runs_out():
    blocks = BlockManager(9, 4)  # 8 blocks to hand out
    a, b, c = [], [], []
    blocks.grow(a, 12)
    blocks.grow(b, 12)
    first, second = list(a[:2]), list(b[:3])
    blocks.keep("a", a, 2, "a's tokens")  # a keeps its last block; two go under "a"
    blocks.keep("b", b, 5, "b's tokens")  # more than b has: all three
    assert len(a) == 1 and b == [] and blocks.num_free == 2 + 5 and len(blocks.free) == 2
    assert blocks.can_grow(c, 7 * 4) and not blocks.can_grow(c, 7 * 4 + 1)
    blocks.grow(c, 3 * 4)  # two from the free list, then "a" (kept first) is dropped for the third
    assert "a" not in blocks.kept and set(c) & set(first) and blocks.take("b") == (second, "b's tokens")
    assert blocks.take("b") is None and blocks.num_free == 1
    blocks.release(second)
    blocks.keep("c", c, 3, None)
    blocks.keep("c", [], 0, None)  # a new entry under a key frees the old one, kept or not
    blocks.drop("nobody")
    blocks.release(a)
    assert blocks.kept == {} and blocks.num_free == 8 and len(set(blocks.free)) == 8
    with pytest.raises(EngineError, match="the KV cache is full"):
        blocks.grow([], 9 * 4)
