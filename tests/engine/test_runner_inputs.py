"""The runner's step inputs: one packed buffer, and the bucketed shape a captured decode graph runs.

A graph is captured per (batch, context, anchor) bucket, so a step padded to its buckets must
compute exactly what the plain step computes for the real rows. Run here through the CPU path:
the same tables, lengths and anchor routing that the graph's kernels read.
"""

from __future__ import annotations

import pytest
import torch

from fieldprint.engine.runner import StepLayout, graph_bucket
from fieldprint.engine.sampling import argmax_rows, chunked_argmax
from fieldprint.errors import EngineError


def test_graph_bucket_is_the_next_power_of_two_within_its_bounds():
    assert [graph_bucket(n, 256) for n in (0, 1, 16, 17, 33, 128, 129, 256)] == [16, 16, 16, 32, 64, 128, 256, 256]
    assert graph_bucket(200, 160) == 160  # the cap need not be a power of two
    assert graph_bucket(3, 8, smallest=2) == 4


def test_the_layout_packs_every_input_16_byte_aligned_and_round_trips():
    x = StepLayout(tokens=3, seqs=5, width=7, sets=2, anchor_width=3)
    assert all(o % 16 == 0 for o in x.offsets)
    buf = torch.zeros(x.nbytes, dtype=torch.uint8)
    views = x.views(buf)
    assert [tuple(v.shape) for v in views] == [(3,), (3,), (3,), (5, 7), (5,), (6,), (2, 3), (2,), (5,)]
    for i, v in enumerate(views):
        v.fill_(i + 1)
    again = x.views(buf.numpy())
    assert all((a == i + 1).all() for i, a in enumerate(again)), "a view overlaps another"


def _anchor_set(runner, key: str, length: int, seed: int) -> None:
    """A set of `length` random K/V tokens in the anchor pool, pinned."""
    slot = runner.anchor_pool.reserve(key, length)
    g = torch.Generator().manual_seed(seed)
    c = runner.cache
    for t in (c.anchor_k, c.anchor_v):
        t[:, slot.blocks] = torch.randn(t[:, slot.blocks].shape, generator=g).to(t.dtype)
    runner.anchor_pool.pin(key)


def test_a_step_padded_to_its_graph_buckets_computes_what_the_plain_step_does(tiny_model, make_runner, engine_ops):
    lm, _ = tiny_model("llama-gqa3")
    runner = make_runner(lm)  # 4-token blocks, sequences up to 1024 tokens, anchor sets up to 256
    _anchor_set(runner, "a", 37, 1)
    _anchor_set(runner, "b", 90, 2)
    g = torch.Generator().manual_seed(0)
    seqs = [engine_ops.new_seq(torch.randint(0, 500, (n,), generator=g).tolist(), anchor_key=k, anchor_len=a)
            for n, k, a in ((21, "a", 37), (70, None, 0), (9, "b", 90))]
    engine_ops.step(runner, seqs, [len(s) for s in seqs])
    for s in seqs:
        s.output_ids.append(7)
        runner.blocks.grow(s.block_table, len(s))
    plain = runner.inputs(seqs, [1, 1, 1])
    runner.use_graphs = True  # plan as CUDA would; run below through the CPU path
    padded = runner.inputs(seqs, [1, 1, 1])
    assert plain.graph == 0 and padded.graph == 4 and padded.rows == 3
    assert padded.graph_key == (4, graph_bucket(18, runner.max_blocks), 4, graph_bucket(23, runner.max_anchor_blocks))
    assert (plain.layout.width, plain.layout.sets, plain.layout.anchor_width) == (18, 2, 23)
    ids, pos, slots, tables, lens, cu, atable, alens, which = padded.layout.views(padded.packed)
    assert ids[3] == 0 and slots[3] == 0 and lens[3] == 1 and which[3] == -1 and cu.tolist() == [0, 1, 2, 3, 4]
    assert pos[:3].tolist() == [37 + 21, 70, 90 + 9]
    padded.graph = 0  # what the captured graph computes, run eagerly
    with torch.inference_mode():
        want, got = runner.run(plain), runner.run(padded)
    assert got.shape[0] == 4
    # fp32 GEMMs over 4 rows instead of 3 sum in another order (observed 1.4e-5); a wrong table, length or
    # anchor row moves logits by whole units
    torch.testing.assert_close(got[:3], want, rtol=0, atol=1e-4)


def test_a_context_past_the_longest_graph_runs_eagerly(tiny_model, make_runner, engine_ops):
    lm, _ = tiny_model("llama")
    runner = make_runner(lm, max_model_len=32)
    runner.use_graphs = True
    short, long = engine_ops.new_seq(list(range(10, 30))), engine_ops.new_seq(list(range(10, 50)))
    for s in (short, long):
        runner.blocks.grow(s.block_table, len(s) + 1)
        s.num_cached = len(s)
        s.output_ids.append(3)
    assert runner.inputs([short], [1]).graph == 1
    assert runner.inputs([short, long], [1, 1]).graph == 0


def test_an_anchor_set_past_the_longest_graph_runs_eagerly(tiny_model, make_runner, engine_ops):
    lm, _ = tiny_model("llama")
    runner = make_runner(lm, max_anchor_len=32)
    runner.use_graphs = True
    _anchor_set(runner, "long", 40, 3)  # the pool holds it; no captured graph's anchor table is that wide
    _anchor_set(runner, "short", 30, 4)
    seqs = [engine_ops.new_seq(list(range(10, 30)), anchor_key=k, anchor_len=n) for k, n in (("short", 30), ("long", 40))]
    for s in seqs:
        runner.blocks.grow(s.block_table, len(s) + 1)
        s.num_cached = len(s)
        s.output_ids.append(3)
    assert runner.inputs(seqs[:1], [1]).graph == 1
    x = runner.inputs(seqs, [1, 1])
    assert x.graph == 0 and x.layout.anchor_width == 10  # eager, with the exact table width


def test_a_graph_steps_block_tables_follow_every_change_of_the_tables(tiny_model, make_runner, engine_ops):
    """Captured decode steps reuse the last step's table rows and rewrite only what changed: tables that
    grew a block, a table released and grown again to the same length with other blocks, another order."""
    lm, _ = tiny_model("llama")
    runner = make_runner(lm)  # 4-token blocks
    runner.use_graphs = True
    seqs = [engine_ops.new_seq(list(range(10, 10 + n))) for n in (5, 11, 3)]
    for s in seqs:
        runner.blocks.grow(s.block_table, len(s))
        s.num_cached = len(s) - 1

    def tables_of(batch):
        x = runner.inputs(batch, [1] * len(batch))
        assert x.graph, "planned as a captured decode step"
        return x.layout.views(x.packed)[3]

    def assert_rows(batch):
        t = tables_of(batch)
        for row, s in zip(t, batch):
            assert row[: len(s.block_table)].tolist() == s.block_table and not row[len(s.block_table) :].any()

    for _ in range(9):  # every sequence crosses block boundaries at its own step
        assert_rows(seqs)
        for s in seqs:
            s.output_ids.append(1)
            s.num_cached += 1
            runner.blocks.grow(s.block_table, len(s))
    assert_rows(seqs)
    a, b, c = seqs
    old = list(b.block_table)
    runner.blocks.release(b.block_table)
    runner.blocks.grow(c.block_table, len(c) + 2 * runner.blocks.block_size)  # takes blocks b gave back
    runner.blocks.grow(b.block_table, len(b))  # the same length as before, other blocks
    assert len(b.block_table) == len(old) and b.block_table != old
    assert_rows(seqs)
    assert_rows([c, a, b])
    assert_rows(seqs[:2])


def test_a_step_without_a_block_for_its_token_is_refused(tiny_model, make_runner, engine_ops):
    """A decode step whose table lacks the block for its new token is refused by name, whether it would
    run eagerly or in a graph (whose kept table rows hold 0, the padding target, past a table's end);
    so is a prefill step whose table lacks one for any of its tokens."""
    lm, _ = tiny_model("llama")
    runner = make_runner(lm)  # 4-token blocks
    ok, short = engine_ops.new_seq(list(range(10, 17))), engine_ops.new_seq(list(range(10, 18)))
    for s in (ok, short):
        runner.blocks.grow(s.block_table, len(s))
        s.num_cached = len(s)
        s.output_ids.append(3)  # token 7 of `ok` fits its second block; token 8 of `short` needs a third
    for graphs in (False, True):
        runner.use_graphs = graphs
        with pytest.raises(EngineError, match=f"sequence {short.seq_id} has no cache block for token 8"):
            runner.inputs([ok, short], [1, 1])
    runner.blocks.grow(short.block_table, len(short))
    assert runner.inputs([ok, short], [1, 1]).graph
    # A prefill step the same: a 9-token prompt over two blocks (8 tokens) is refused at token 8.
    fresh = engine_ops.new_seq(list(range(20, 29)))
    runner.blocks.grow(fresh.block_table, 8)
    with pytest.raises(EngineError, match=f"sequence {fresh.seq_id} has no cache block for token 8"):
        runner.inputs([fresh], [9])


def test_chunked_argmax_is_argmax_ties_and_tails_included():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4096 * 5 + 77, generator=g)
    x[1, 9000] = x[1, 4096 * 5 + 3] = 100.0  # a tie across chunks: the first index wins
    x[2, -1] = 100.0  # the maximum in the tail past the last whole chunk
    want = x.argmax(-1)
    assert want.tolist()[1:] == [9000, x.shape[1] - 1]
    assert chunked_argmax(x).tolist() == want.tolist()
    assert chunked_argmax(x[:, : 4096 * 5]).tolist() == x[:, : 4096 * 5].argmax(-1).tolist()  # no tail
    assert argmax_rows(x).tolist() == want.tolist()
    if torch.cuda.is_available():  # the chunked path is CUDA's
        assert argmax_rows(x.cuda()).tolist() == want.tolist()
