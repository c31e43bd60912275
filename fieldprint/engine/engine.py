"""The engine: retrieve -> verify -> promote -> cache -> generate, with a receipt for every output.

    engine = Engine("smollm2", data_dir="./fieldprint-data")
    out = engine.generate("Plan my Saturday.", SamplingParams(max_tokens=64), anchors="hiking plans")[0]
    out.text, out.receipt            # verify_receipt(out.receipt, log_key) checks it offline

Per request, in order: the Pacemaker retrieves candidate states once (a query) or the caller names
them (state ids); the gate verifies each against the latest signed checkpoint and promotes it (or
not, and says why); the promoted states become an anchor set, compiled or reused and re-hash
checked before first use; the sequences then run on the continuous-batching scheduler. Hashing
and logging never wait inside the forward pass: session K/V goes through the asynchronous
committer and each generation entry is appended in the background.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from fieldprint.canon import is_int
from fieldprint.engine.anchors import (
    PROFILE_RECIPE,
    AnchorCompiler,
    CompiledSet,
    anchor_text,
    calibrate_profile,
    commit_sequence,
    split_prompt,
)
from fieldprint.engine.receipt import build_receipt, generation_entry
from fieldprint.engine.runner import ModelRunner, RunnerConfig
from fieldprint.engine.scheduler import Scheduler
from fieldprint.engine.sequence import SamplingParams, Sequence
from fieldprint.engine.stepper import Stepper
from fieldprint.engine.tp import TensorParallel
from fieldprint.errors import EngineError, FieldprintError

MAX_PROMPT_CHARS = 1 << 20


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine reads besides the model path and the data folder."""

    runner: RunnerConfig = field(default_factory=RunnerConfig)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    anchor_k: int = 4  # states a query retrieves before the gate decides
    commit_session_kv: bool = True
    overlap: bool = True  # queue each step before reading the step before's tokens (stepper.py)
    # Bytes of codes of the session K/V commits that may wait for their digests while the step loop goes
    # on (one commit goes in whatever its size): a burst of finishes that fits no longer holds the loop
    # until the digests catch up (with 4 commits queued, 128 sequences of Llama-3.2-1B ending at once
    # held it 0.62 s on the H200; docs/engine.md).
    commit_queue_bytes: int = 1 << 30
    # A session's next turn takes back the K/V its last turn computed, as far as its prompt starts with
    # the same tokens under the same anchor set, in whole blocks (kv_cache.BlockManager.keep): its
    # history is not computed again. Kept blocks count as free and go first when the pool runs short.
    reuse_session_kv: bool = True


@dataclass(slots=True)
class Output:
    """One finished generation."""

    text: str
    token_ids: list[int]
    finish_reason: str
    receipt: dict
    anchors: list[str]  # state ids that conditioned it, in order
    decisions: list[dict]  # the gate's decision for every candidate state
    cached_tokens: int = 0  # prompt tokens whose K/V came from the session's last turn (EngineConfig.reuse_session_kv)


@dataclass(slots=True)
class _Request:
    seq: Sequence
    prompt_text: str
    anchor_set: CompiledSet | None
    anchor_states: list
    decisions: list[dict]
    session: str | None
    cached_tokens: int = 0


class Engine:
    """Serves generations conditioned on verified, promoted memory, over one log and one memory."""

    def __init__(self, model: str = "smollm2", *, data_dir: str, config: EngineConfig | None = None,
                 memory=None, device: str | None = None, database: str | None = None, tp_size: int = 1) -> None:
        """`tp_size` > 1: the model split over that many devices (GPUs 0..tp_size-1, or CPU processes),
        one process each; this process is rank 0 and serves (fieldprint/engine/tp.py)."""
        from fieldprint.engine.commit import Committer
        from fieldprint.engine.loader import load_model
        from fieldprint.engine.memory import Memory, load_or_calibrate_profile

        self.config = config or EngineConfig()
        if not is_int(tp_size) or tp_size < 1:
            raise EngineError(f"tp_size must be a positive int, got {tp_size!r}")
        if not is_int(self.config.commit_queue_bytes) or self.config.commit_queue_bytes < 0:
            raise EngineError(f"commit_queue_bytes must be a non-negative int, got {self.config.commit_queue_bytes!r}")
        if not isinstance(self.config.reuse_session_kv, bool):
            raise EngineError(f"reuse_session_kv must be True or False, got {self.config.reuse_session_kv!r}")
        self.tp = self.committer = None
        self.memory = memory or Memory.open(data_dir, database=database)
        self.log = self.memory.log
        try:  # a failure leaves nothing running: no rank process, no committer thread, no open memory of ours
            if tp_size > 1:
                dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
                self.tp = TensorParallel(model, tp_size, dev, self.config.runner)
                device = str(self.tp.device)
            self.lm = load_model(model, device=device)
            self.runner = ModelRunner(self.lm, self.config.runner)
            if self.tp is not None:
                self.tp.attach(self.runner)
            int8 = self.config.runner.anchor_dtype == "int8"
            self.profile = load_or_calibrate_profile(data_dir, self.lm.model_id,
                                                     lambda: calibrate_profile(self.runner, "model"), PROFILE_RECIPE)
            self.committer = Committer(self.log, self.profile, keep_receipts=False,  # results come through tickets
                                       max_pending=None, max_pending_bytes=self.config.commit_queue_bytes)
            self.compiler = AnchorCompiler(self.runner, self.log, self.committer, self.profile if int8 else None,
                                           os.path.join(data_dir, "anchor-sets"))
        except BaseException:
            if self.committer is not None:
                self.committer.close()
            if self.tp is not None:
                self.tp.close()
            if memory is None:
                self.memory.close()
            raise
        self.scheduler = Scheduler(self.runner.blocks, max_num_seqs=self.config.max_num_seqs,
                                   max_num_batched_tokens=self.config.max_num_batched_tokens)
        tok = self.lm.tokenizer
        self.eos = {i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|eot_id|>"))
                    if isinstance(i, int) and i >= 0 and i != tok.unk_token_id}
        self._special = frozenset(tok.all_special_ids)  # read once: the tokenizer rebuilds the list per call
        self._sessions_of: dict[int, str] = {}  # running sequence -> its session (for the K/V commit)
        self._kv_tickets: dict[int, object] = {}
        self.stepper = Stepper(self.runner, self.scheduler, self._finish_reason, self._finished,
                               overlap=self.config.overlap, max_rows=self.config.max_num_seqs)

    # -- the request path --------------------------------------------------------------------
    def _messages(self, prompt) -> list[dict]:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise EngineError("the prompt is empty")
            if len(prompt) > MAX_PROMPT_CHARS:
                raise EngineError(f"the prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
            return [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list) or not prompt or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
                for m in prompt):
            raise EngineError("a prompt is a non-empty string or a list of {'role': system|user|assistant, 'content': str} messages")
        return prompt

    def _anchors(self, anchors, session: str | None, query_text: str) -> tuple[list, list[dict]]:
        """Retrieve (query or ids) -> verify + promote (the gate): the promoted states, and every decision."""
        if anchors is None:
            return [], []
        mem = self.memory
        mem.ensure_checkpoint()
        if isinstance(anchors, str):
            hits = mem.pacemaker.search(anchors or query_text, self.config.anchor_k)
            candidates, explicit = [h.state for h in hits], False
        elif isinstance(anchors, (list, tuple)) and all(isinstance(a, str) for a in anchors):
            candidates, explicit = [mem.store.get(a) for a in anchors], True
            missing = [a for a, s in zip(anchors, candidates) if s is None]
            if missing:
                raise EngineError(f"anchor state {missing[0]!r} is not in memory; add it first (engine.memory.pacemaker.add)")
        else:
            raise EngineError("anchors must be None, a query string, or a list of state ids")
        promoted, decisions = [], []
        for state in candidates:
            d = mem.gate.explain(state.state_id)
            if d.basis == "withdrawn" and not explicit:
                continue  # a withdrawn state left retrieval too: not even a candidate in the receipt
            decisions.append({"state_id": state.state_id, "anchor": d.anchor, "basis": d.basis,
                              "record_index": d.record_index, "why": d.sentence, "type": state.state_type,
                              "taint": sorted(state.label.taint), "text": state.text})
            if d.anchor:
                promoted.append(state)
            elif explicit:
                raise EngineError(f"state {state.state_id} was refused: {d.sentence}")  # the sentence says "not an anchor: why"
        return promoted, decisions

    def _request(self, prompt, params: SamplingParams, session: str | None, anchors) -> _Request:
        if not isinstance(params, SamplingParams):
            raise EngineError(f"params must be SamplingParams, got {type(params).__name__}")
        history = self.memory.session(session).history if session is not None else []  # EngineError if none
        messages = history + self._messages(prompt)
        states, decisions = self._anchors(anchors, session, messages[-1]["content"])
        cs = None
        if states:
            if messages[0]["role"] == "system":
                raise EngineError("with anchors the system message is the anchors; put standing instructions in an "
                                  "instruction state instead of a system message")
            cs = self.compiler.acquire([s.state_id for s in states], [s.text for s in states])
        prefix, own = split_prompt(self.lm.tokenizer, anchor_text([s.text for s in states]) if states else None, messages)
        limit = self.config.runner.max_model_len
        if len(own) + params.max_tokens > limit:
            raise EngineError(f"the prompt is {len(own)} tokens and asks for {params.max_tokens} more; "
                              f"the engine's max_model_len is {limit}")
        if len(prefix) + len(own) + params.max_tokens > self.lm.args.max_position:
            raise EngineError(f"{len(prefix)} anchor + {len(own)} prompt + {params.max_tokens} new tokens exceed the "
                              f"model's {self.lm.args.max_position} positions")
        if cs is not None and prefix != cs.tokens:
            raise EngineError("the anchor set's tokens differ from this chat's anchor prefix (a template change?)")
        seq = Sequence(own, params, anchor_key=cs.key if cs else None, anchor_len=len(prefix))
        return _Request(seq, messages[-1]["content"], cs, states, decisions, session)

    def _admit(self, reqs: list[_Request]) -> None:
        """Queue the requests, all or none (a refused one must not leave the others queued and pinned)."""
        admitted = []
        try:
            for r in reqs:
                self.scheduler.add(r.seq)
                if r.seq.anchor_key:
                    try:
                        self.runner.anchor_pool.pin(r.seq.anchor_key)
                    except BaseException:
                        self.scheduler.finish(r.seq)
                        raise
                admitted.append(r)
                if r.session is not None and self.config.reuse_session_kv:
                    r.cached_tokens = self._reuse_kv(r.seq, r.session)  # after admission: a refusal frees them with the rest
        except BaseException:
            self._abandon(admitted)
            raise
        for r in reqs:
            if r.session is not None:
                self._sessions_of[r.seq.seq_id] = r.session

    def _reuse_kv(self, seq: Sequence, session: str) -> int:
        """Give a session's new turn the blocks its last turn kept, as far as their tokens start its
        prompt (whole blocks, the same anchor set; at least one prompt token is left to compute, for the
        logits of the first new token); the rest are freed. Returns the tokens taken."""
        blocks = self.runner.blocks
        entry = blocks.take(session)
        if entry is None:
            return 0
        table, (anchor_key, tokens) = entry
        n = 0
        if anchor_key == seq.anchor_key:
            limit = min(len(tokens), len(seq.prompt_ids) - 1)
            same = next((i for i in range(limit) if tokens[i] != seq.prompt_ids[i]), limit)
            n = same // blocks.block_size
        seq.block_table.extend(table[:n])
        seq.num_cached = n * blocks.block_size
        blocks.release(table[n:])
        return seq.num_cached

    def _abandon(self, reqs: list[_Request]) -> None:
        """Take admitted, unfinished requests out of the scheduler and unpin their anchor sets."""
        for r in reqs:
            if not r.seq.is_finished:
                self.scheduler.finish(r.seq)
                self._sessions_of.pop(r.seq.seq_id, None)
                if r.seq.anchor_key:
                    self.runner.anchor_pool.unpin(r.seq.anchor_key)

    def step(self) -> list[Sequence]:
        """Run one scheduler step; return the sequences that finished (fieldprint/engine/stepper.py)."""
        return self.stepper.step()

    def _finished(self, s: Sequence) -> None:
        """A sequence is done: queue its session K/V commit, keep its whole blocks for the session's next
        turn, unpin its anchor set."""
        session = self._sessions_of.get(s.seq_id)
        self._commit_kv(s)
        if session is not None and self.config.reuse_session_kv:
            bs = self.runner.blocks.block_size
            n = s.num_cached // bs  # whole blocks of computed K/V (the table holds every cached token)
            self.runner.blocks.keep(session, s.block_table, n, (s.anchor_key, s.tokens[: n * bs]))
        if s.anchor_key:
            self.runner.anchor_pool.unpin(s.anchor_key)

    def _finish_reason(self, s: Sequence, tok: int) -> str | None:
        p = s.params
        if tok in self.eos and not p.ignore_eos:
            s.output_ids.pop()  # the end-of-turn token is not part of the answer
            return "stop"
        if p.stop and tail_has_stop(self.lm.tokenizer, s.output_ids, p.stop, self._special):
            return "stop"
        if len(s.output_ids) >= p.max_tokens or len(s) >= self.config.runner.max_model_len:
            return "length"
        return None

    def _finish(self, r: _Request) -> Output:
        s = r.seq
        tok = self.lm.tokenizer
        text = _cut_at_stop(tok.decode(s.output_ids, skip_special_tokens=True), s.params.stop)
        # A sampled request without a seed is logged with the one it drew: its output can be replayed too.
        params = s.params if s.sample_seed is None else replace(s.params, seed=s.sample_seed)
        entry = generation_entry(self.lm.model_id, self.lm.tokenizer_digest, r.anchor_set, s.prompt_ids, s.output_ids,
                                 text, params, r.session)
        future = self.log.add(entry)  # sequenced in the background; receipts are bound once it is
        receipt = build_receipt(self.memory, self.lm, r.anchor_set, r.anchor_states, r.decisions,
                                s.prompt_ids, s.output_ids, text, params, entry)
        receipt["_future"] = future
        if r.session is not None:
            ticket = self._kv_tickets.pop(s.seq_id, None)
            self.memory.record_turn(r.session, r.prompt_text, text, receipt, ticket.future if ticket else None)
        return Output(text, list(s.output_ids), s.finish_reason, receipt, [st.state_id for st in r.anchor_states], r.decisions,
                      r.cached_tokens)

    def _commit_kv(self, s: Sequence) -> None:
        """Queue a finished session turn's K/V for an asynchronous commit, read from its blocks."""
        session = self._sessions_of.pop(s.seq_id, None)
        if session is None or not self.config.commit_session_kv or s.num_cached == 0:
            return
        self._kv_tickets[s.seq_id] = commit_sequence(self.committer, self.runner, s.block_table, s.num_cached,
                                                     session=session, state_type="session_kv")

    def generate(self, prompts, params: SamplingParams | None = None, *, session: str | None = None,
                 anchors=None) -> list[Output]:
        """Generate for one prompt (a string or chat messages) or a list of them; one Output each."""
        params = params or SamplingParams()
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
        batch = [prompts] if single else prompts
        if not isinstance(batch, list) or not batch:
            raise EngineError("prompts must be a string, a list of chat messages, or a non-empty list of those")
        reqs = [self._request(p, params, session, anchors) for p in batch]
        self._admit(reqs)
        by_seq = {r.seq.seq_id: r for r in reqs}
        pending = set(by_seq)
        outputs = {}
        try:
            while pending:
                for s in self.step():
                    if s.seq_id in pending:
                        pending.discard(s.seq_id)
                        outputs[s.seq_id] = self._finish(by_seq[s.seq_id])
        except BaseException:
            self._abandon(reqs)  # nothing half-run stays in the scheduler or pinned
            raise
        return [outputs[r.seq.seq_id] for r in reqs]

    def stream(self, prompt, params: SamplingParams | None = None, *, session: str | None = None,
               anchors=None) -> Iterator[str | Output]:
        """Yield text pieces as tokens come, then the final Output (with its receipt)."""
        params = params or SamplingParams()
        req = self._request(prompt, params, session, anchors)
        self._admit([req])
        stops, decoded = params.stop, StreamText(self.lm.tokenizer)
        shown = ""
        try:
            while not req.seq.is_finished:
                self.step()
                if req.seq.is_finished:
                    break  # the final text (cut at a stop string) is known: the rest is yielded below
                text = _cut_at_stop(decoded.update(req.seq.output_ids), stops)
                text = text[: len(text) - _stop_prefix_len(text, stops)]  # may yet become a stop string
                if len(text) > len(shown) and not text.endswith("\ufffd") and text.startswith(shown):
                    yield text[len(shown):]
                    shown = text
        except BaseException:
            self._abandon([req])
            raise
        out = self._finish(req)
        if len(out.text) > len(shown) and out.text.startswith(shown):
            yield out.text[len(shown):]
        yield out

    # -- receipts, sessions ----------------------------------------------------------------------
    def bind(self, receipt: dict, timeout: float = 30.0) -> dict:
        """Wait until the generation entry is sequenced and add its inclusion proof to the receipt."""
        from fieldprint.engine.receipt import bind_receipt

        return bind_receipt(self.memory, receipt, timeout)

    def new_session(self, name: str) -> str:
        return self.memory.new_session(name)

    def rollback(self, session: str, turns: int = 1) -> dict:
        """Return `session` to before its last `turns` turns (to a committed turn); logged as a rollback entry."""
        self.committer.flush(session)
        out = self.memory.rollback(session, turns)
        self.runner.blocks.drop(session)  # its kept K/V belongs to the turns just withdrawn
        return out

    def close(self) -> None:
        errors = []
        for closer in (self.committer.close, self.memory.close, *((self.tp.close,) if self.tp else ())):
            try:
                closer()
            except FieldprintError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamText:
    """An output's text as its tokens come, decoding a short window per token, not the whole output
    (65-72 us against 6 us per token over a 512-token stream, benchmarks/host_bench.py): the window
    starts at the tokens of the previous piece, so that a token's text is read in context (a
    SentencePiece leading space, a character split over tokens), and the text grows only by whole
    characters. A window that changes the text it read before instead of extending it (a tokenizer
    that composes characters) falls back to decoding the whole output."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.text = tokenizer, ""
        self._start = self._read = 0  # the window: ids[_start:]; ids[_start:_read] were read before

    def update(self, ids: list[int]) -> str:
        """The text of `ids` (the whole output so far) up to its last whole character."""
        decode = lambda part: self.tokenizer.decode(part, skip_special_tokens=True)  # noqa: E731
        before, now = decode(ids[self._start : self._read]), decode(ids[self._start :])
        if now != before and not now.endswith("\ufffd"):
            if now.startswith(before):
                self.text += now[len(before) :]
            else:
                self.text = decode(ids)
            self._start, self._read = self._read, len(ids)
        return self.text


def tail_has_stop(tokenizer, ids: list[int], stops: tuple[str, ...], special: frozenset[int]) -> bool:
    """Whether the output's decoded text holds a stop string, checked after every token so that the
    newest token completes any stop found: only the tail is decoded (the whole output per token cost
    O(n^2): 0.2-0.3 ms per sequence and step at 512 tokens, benchmarks/host_bench.py, which at B=128
    is more than the decode step's GPU time).

    A stop of L characters (UTF-8: at most 4L bytes) spans at most 4L tokens that decode to text, since
    each yields at least a byte; skipped special tokens (`special`: the tokenizer's ids) add to the
    window. The window starts 4 tokens further back, so the stop never touches the tail's first token,
    whose decoding alone can differ (a SentencePiece leading space dropped, a split character's
    replacement mark)."""
    want = 4 * max(len(x) for x in stops) + 4
    n = want
    while n < len(ids) and n - sum(t in special for t in ids[-n:]) < want:
        n += want
    tail = tokenizer.decode(ids[-n:], skip_special_tokens=True)
    return any(x in tail for x in stops)


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """`text` up to its earliest stop string (the stop string is not part of the answer)."""
    cut = min((text.index(s) for s in stops if s in text), default=len(text))
    return text[:cut]


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins some stop string (held back while streaming)."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if s.startswith(text[-n:])), default=0)


__all__ = ["Engine", "EngineConfig", "Output", "SamplingParams"]
