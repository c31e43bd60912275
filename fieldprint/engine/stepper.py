"""The step loop: schedule a step, run it, draw its tokens, append them, finish who is done.

With overlap (the default), a step is queued on the device before the tokens of the step before
are read: the host schedules, builds inputs and launches while the device computes (vLLM's async
scheduling, SGLang's overlap scheduler). On the GPU the device otherwise idled about 1 ms of every
3.3 ms decode step at B=128 while the host worked (benchmarks/e2e_bench.py, timeline section).

How a step goes ahead of its input tokens: until the step before's tokens are read, each sequence
that goes on holds token 0 as a placeholder, so that lengths, positions, slots and block growth
count it, and the step's input id for it is copied on the device from the draw (runner.Feed). A
sequence whose token in flight is its last by length leaves the running set first; one that stops
on a token has run one step more, whose token is dropped and whose K/V its finish does not count
(num_cached goes back). Placeholders never outlive step(). When the next decode step might have to
preempt (too few free blocks), the step before is read first: a preempted sequence gives its blocks
away, and if its token in flight ended it, its K/V would be gone. Tensor-parallel ranks take their
inputs from the host, so there the engine steps in order (overlap off).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fieldprint.engine.runner import Feed, ModelRunner
from fieldprint.engine.scheduler import Scheduler
from fieldprint.engine.sequence import Sequence, Status


@dataclass(slots=True)
class Queued:
    """A step queued on the device whose drawn tokens the host has not read yet."""

    seqs: list[Sequence]  # the sequences that drew a token in it (their prompt complete)
    cached: list[int]  # each one's num_cached after the step
    tokens: torch.Tensor  # their tokens on the device: the next step's input ids
    host: torch.Tensor  # the same on the host (pinned on CUDA), complete once `event` is
    event: torch.cuda.Event | None
    decode: bool  # one token for every sequence of the step


class Stepper:
    """Steps the scheduler's sequences through the runner.

    finish_reason(seq, token): why seq ends with the token just appended (None: it goes on; it may
    drop the token, as an end-of-turn token is). on_finish(seq): what a finished sequence needs
    beyond leaving the scheduler (a K/V commit, an anchor set unpinned), called before its blocks
    are freed. marks: a context manager per phase name (a profiler's record_function), or None.
    """

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, finish_reason: Callable[[Sequence, int], str | None],
                 on_finish: Callable[[Sequence], None], *, overlap: bool = True, max_rows: int = 256,
                 marks: Callable[[str], contextlib.AbstractContextManager] | None = None) -> None:
        self.runner, self.scheduler = runner, scheduler
        self.finish_reason, self.on_finish = finish_reason, on_finish
        self.overlap = overlap and runner.tp is None  # other ranks take their input ids from the host
        self.max_rows = max_rows
        self.marks = marks or (lambda _name: contextlib.nullcontext())
        self.queued: Queued | None = None  # the step whose tokens are not read yet
        self.launched: Queued | None = None  # the step the last step() call launched, if any (benchmarks)
        self._pinned: list[torch.Tensor] = []  # two host buffers the tokens come back in, used in turn

    @property
    def idle(self) -> bool:
        return self.queued is None and self.scheduler.idle

    def step(self) -> list[Sequence]:
        """Queue the next step, then read the one before (overlap) or this one; return who finished."""
        prev, self.queued, self.launched = self.queued, None, None
        done = []
        if prev is not None and not self.scheduler.decode_fits():
            # The next decode step may preempt, and a preempted sequence gives its blocks away: if its
            # token in flight then ended it, its K/V would be gone. Read first, as steps in order do.
            with self.marks("append"):
                done = self._read(prev, {})
            prev = None
        pending = self._placeholders(prev) if prev is not None else {}
        try:
            nxt = self._launch(prev, pending)
        except BaseException:
            for s in pending:
                s.output_ids.pop()
            self._read(prev, {})
            raise
        with self.marks("append"):
            done += self._read(prev, pending)
            if nxt is not None and (not self.overlap or all(s.is_finished for s in nxt.seqs)):
                done += self._read(nxt, {})  # nothing left to overlap with: read it now
            else:
                self.queued = nxt
        return done

    def drain(self) -> list[Sequence]:
        """Read the queued step, if any (its sequences may finish)."""
        prev, self.queued = self.queued, None
        return self._read(prev, {})

    def _placeholders(self, prev: Queued) -> dict[Sequence, int]:
        """Before prev's tokens are read: a placeholder for each sequence that goes on (-> its row in
        prev's draw); a sequence whose token is its last by length is held out of the next step."""
        out, last = {}, []
        limit = self.runner.config.max_model_len
        for row, s in enumerate(prev.seqs):
            if s.status is not Status.RUNNING:
                continue
            if len(s.output_ids) + 1 >= s.params.max_tokens or len(s) + 1 >= limit:
                last.append(s)
                continue
            s.output_ids.append(0)
            out[s] = row
        self.scheduler.hold(last)
        return out

    def _launch(self, prev: Queued | None, pending: dict[Sequence, int]) -> Queued | None:
        """Schedule a step, queue its forward pass and draw; None if nothing ran or drew a token."""
        with self.marks("schedule"):
            seqs, counts = self.scheduler.schedule()
        if not seqs:
            return None
        decode = all(n == 1 and s.num_cached > 0 for s, n in zip(seqs, counts))
        # Only running sequences hold placeholders, and a step with any of them is a decode step.
        rows = [i for i, s in enumerate(seqs) if s in pending]
        feed = Feed(prev.tokens, rows, [pending[seqs[i]] for i in rows]) if rows else None
        with self.marks("forward:decode" if decode else "forward:prefill"):
            logits = self.runner.forward(seqs, counts, feed)
        ready = []
        for i, (s, n) in enumerate(zip(seqs, counts)):
            s.num_cached += n
            if s.num_cached == len(s):
                ready.append(i)
        if not ready:
            return None
        drew = [seqs[i] for i in ready]
        with self.marks("sample"):
            # a decode step samples every row: no gather of [B, vocab] logits (65 MB at B=128 with 128k tokens)
            tokens = self.runner.draw(drew, logits if len(ready) == len(seqs) else logits[ready])
            host, event = tokens, None
            if tokens.is_cuda:
                if not self._pinned or self._pinned[0].numel() < len(drew):
                    with torch.inference_mode(False):  # filled later whether or not a caller is in inference mode
                        self._pinned = [torch.empty(max(self.max_rows, len(drew)), dtype=torch.int64, pin_memory=True)
                                        for _ in range(2)]
                self._pinned.reverse()  # not the buffer of the step still unread (there is at most one)
                host = self._pinned[0][: len(drew)]
                host.copy_(tokens, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
        self.launched = Queued(drew, [s.num_cached for s in drew], tokens, host, event, decode)
        return self.launched

    def _read(self, step: Queued | None, pending: dict[Sequence, int]) -> list[Sequence]:
        """Read a queued step's tokens: append them (over their placeholders), finish who is done."""
        if step is None:
            return []
        if step.event is not None:
            step.event.synchronize()
        done = []
        for s, cached, tok in zip(step.seqs, step.cached, step.host.tolist()):
            if s.is_finished:
                continue  # it finished at the step before (or was abandoned): this token is dropped
            if s in pending:
                s.output_ids[-1] = tok
            else:
                s.output_ids.append(tok)
            reason = self.finish_reason(s, tok)
            if reason:
                s.finish_reason = reason
                # A step queued after this one may have cached this token: its K/V is not the output's.
                s.num_cached = min(s.num_cached, cached)
                done.append(s)
        # Every token of the step is out before any finish's work: a K/V commit may wait on the
        # committer's queue (back-pressure), and the other sequences' tokens must not wait with it.
        for s in done:
            self.on_finish(s)
            self.scheduler.finish(s)
        return done
