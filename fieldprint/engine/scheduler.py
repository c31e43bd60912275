"""Continuous batching: which sequences run in the next step, and how many new tokens each brings.

Policy (nano-vllm's, with chunked prefill): a step is either a prefill step or a decode step.
Waiting sequences are admitted in arrival order while the step's token budget and the batch limit
allow; a prompt longer than the budget is prefilled in chunks over several steps, and the last
chunk's logits give its first token. When nothing waits (or nothing more fits), every running
sequence decodes one token. When a decode finds no free block, the most recently admitted running
sequence is preempted: its blocks are freed, and it goes back to the head of the queue to be
recomputed (prompt and output so far) when room returns; a half-prefilled sequence queued behind it
gives its blocks back if the head needs them. Admission is FIFO and preempted work goes first, so
no request starves.
"""

from __future__ import annotations

from collections import deque

from fieldprint.engine.kv_cache import BlockManager
from fieldprint.engine.sequence import Sequence, Status
from fieldprint.errors import EngineError


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs, self.budget = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()

    def add(self, seq: Sequence) -> None:
        usable = (self.blocks.num_blocks - 1) * self.blocks.block_size
        if len(seq) + seq.params.max_tokens > usable:
            raise EngineError(f"a request of {len(seq)} prompt tokens + {seq.params.max_tokens} new ones cannot fit "
                              f"the KV cache ({usable} tokens) even alone; shorten it")
        self.waiting.append(seq)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> tuple[list[Sequence], list[int]]:
        """The next step's sequences and new-token counts (prefill step if any prompt work fits)."""
        seqs, counts, budget = [], [], self.budget
        # An admitted sequence joins `running` at once; a chunked one ends the loop: counting running suffices.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(len(seq) - seq.num_cached, budget)
            if not self.blocks.can_grow(seq.block_table, seq.num_cached + n):
                self._reclaim_behind(seq, seq.num_cached + n)
            if not self.blocks.can_grow(seq.block_table, seq.num_cached + n):
                break
            self.blocks.grow(seq.block_table, seq.num_cached + n)
            seqs.append(seq)
            counts.append(n)
            budget -= n
            if seq.num_cached + n < len(seq):
                break  # a chunk: the rest of this prompt comes next step, before anyone behind it
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
        if seqs:
            return seqs, counts
        bs = self.blocks.block_size
        for seq in list(self.running):
            if len(seq.block_table) * bs >= len(seq):
                # Most steps: its last block has room for the new token. (A sequence preempted above
                # has no blocks, so it never passes here.) Checked inline: at B=128 the calls below
                # for every sequence cost more than the rest of the step's scheduling.
                continue
            # preempt() marks a sequence WAITING: the status answers "still running?" in O(1)
            while seq.status is Status.RUNNING and not self.blocks.can_grow(seq.block_table, len(seq)):
                self.preempt(self.running[-1])
            if seq.status is Status.RUNNING:
                self.blocks.grow(seq.block_table, len(seq))
        return list(self.running), [1] * len(self.running)

    def _reclaim_behind(self, head: Sequence, num_tokens: int) -> None:
        """Free the blocks of partly prefilled sequences queued behind `head` (latest first) until it fits.

        A preempted sequence goes back ahead of a half-prefilled one; if the latter kept its blocks,
        the head might never fit again and every later step would be empty.
        """
        for seq in reversed(self.waiting):
            if seq is head or self.blocks.can_grow(head.block_table, num_tokens):
                return
            if seq.block_table:
                self.blocks.release(seq.block_table)
                seq.num_cached = 0

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it is recomputed from its tokens when it runs again."""
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.num_cached = 0
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.waiting.appendleft(seq)

    def decode_fits(self) -> bool:
        """Whether every running sequence could take one more token than it has without a preemption
        (the stepper's placeholder for a token in flight, then the next step's own)."""
        # A running sequence's blocks hold all its tokens but at most the last drawn one, so it needs at
        # most two blocks more: with that many free per sequence, no count is needed (most steps).
        if self.blocks.num_free >= 2 * len(self.running):
            return True
        bs, need = self.blocks.block_size, 0
        for seq in self.running:
            need += max(0, -(-(len(seq) + 1) // bs) - len(seq.block_table))
        return need <= self.blocks.num_free

    def hold(self, seqs: list[Sequence]) -> None:
        """Take running sequences out of the next steps (their tokens in flight are their last); they keep
        their blocks until finish(). One pass: a whole batch may end at the same step."""
        if seqs:
            held = set(map(id, seqs))
            self.running = deque(s for s in self.running if id(s) not in held)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)
        seq.status = Status.FINISHED
