"""Asynchronous committer: DQP codes and ledger entries for K/V state, off the forward pass.

On a GPU, submit() only enqueues work: the quantizer runs on a side CUDA stream (after an event
that orders it behind the forward pass's writes), its codes are copied non-blocking into pinned
host memory, and a background thread waits for that copy, digests the codes with BLAKE3 and
adds a StateEntry to the transparency log. The forward thread never synchronizes; it can only
block on back-pressure, when `max_pending` commits, or `max_pending_bytes` of their codes, are
already queued. On a CPU the same
background thread quantizes with the reference path. Every failure is kept and raised to the
caller by flush() as a CommitError: nothing fails silently, and a state that fails (NaN/Inf,
log refusal) is never half-committed. Receipts and failures are kept per session, so a caller
that serves several sessions flushes each one on its own.

Hashing runs in child processes when the states come from a GPU: an eager forward pass is
bound by Python launching kernels, and a hashing thread in the same interpreter takes the GIL
back after every BLAKE3 call, which measurably slowed decoding (benchmarks/commit_bench.py).
The children (fieldprint/engine/digest_pool.py, `digest_workers` of them) read the codes from
shared memory and split each commit's hashing evenly; only short messages cross over. A worker
silent for `digest_timeout` seconds (plus one per 20 MiB of the commit) fails that commit and
is replaced, and flush(timeout) bounds the whole wait, so neither can hang the caller.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from fieldprint.canon import check_label, is_int, parse_digest
from fieldprint.dqp import (
    DTYPE_NAMES,
    QuantizedState,
    check_finite,
    inverse_scales,
    quantize,
    stack_digest,
    state_header,
)
from fieldprint.dqp_profile import KINDS, DQPProfile
from fieldprint.engine.digest_pool import DIGEST_SIZE, DigestPool
from fieldprint.errors import CommitError, DQPError, EntryError, FieldprintError
from fieldprint.ledger.entry import StateEntry
from fieldprint.memory.state import STATE_TYPES

StateKey = tuple[int, str]  # (layer, "K" | "V")

# What the engine logs besides the memory's own state types: the K/V of anchors (packed into the
# anchor pool) and a session's own K/V. A commit is a memory state or one of these, nothing else.
KV_STATE_TYPES = frozenset({"anchor_kv", "session_kv"})
COMMIT_STATE_TYPES = frozenset(STATE_TYPES) | KV_STATE_TYPES


@dataclass(slots=True)
class CommitResult:
    """What one commit wrote: the log index, the stack digest and every per-state digest."""

    session: str
    index: int  # leaf index in the transparency log
    entry: bytes  # the canonical StateEntry bytes that were logged
    digest: str  # stack digest over all (layer, kind) states
    profile: str  # profile digest the codes were made with
    states: dict[StateKey, str]  # per-(layer, kind) DQP digest
    blocks: dict[StateKey, list[bytes]]  # per-(layer, kind) block digests (empty lists when turned off)


@dataclass(slots=True)
class CommitTicket:
    """Handle returned by submit(): the future receipt, when the inputs may be overwritten, and the codes."""

    future: Future
    codes: dict[StateKey, torch.Tensor] = field(default_factory=dict)  # each state's codes ([T, H, D + 1] rows
    # for per-row V), valid once quantized; views into `stacks`, one [N, T, H, D (+1)] tensor per stacked input
    stacks: list[torch.Tensor] = field(default_factory=list)
    _event: object = None  # torch.cuda.Event on GPU, threading.Event on CPU

    def wait_quantized(self) -> None:
        """Order the caller after the quantizer (GPU: a stream wait, no host sync): the inputs may be
        overwritten and `codes` read on the caller's stream from then on."""
        if isinstance(self._event, threading.Event):
            self._event.wait()
        elif self._event is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(self._event)
            for codes in self.stacks:  # made on the side stream: not reused while this stream reads them
                codes.record_stream(stream)


@dataclass(slots=True)
class _Paged:
    """A paged sequence's K or V as submit_paged queues it: pools [L, blocks, page, H, D], its block table."""

    pool: torch.Tensor
    table: torch.Tensor  # int32 block ids on the pool's device
    length: int


@dataclass(slots=True)
class _Job:
    session: str
    state_type: str
    parents: tuple[str, ...]
    taint: tuple[str, ...]
    time_ns: int
    state_id: str | Callable[[dict[StateKey, list[bytes]]], str] | None
    groups: list[list[StateKey]]  # keys of each stacked tensor, in stack order
    dtypes: list[str]  # source dtype of each group
    future: Future
    inputs: list[torch.Tensor] = field(default_factory=list)  # CPU path: [N, T, H, D] states
    ticket: CommitTicket | None = None  # CPU path: its codes are filled here (on a GPU the ticket alone holds them)
    host_codes: list[torch.Tensor] = field(default_factory=list)  # GPU path: pinned [N, T, H, D (+1: rows)] codes
    host_bad: torch.Tensor | None = None
    copied: object = None  # torch.cuda.Event recorded after the copies
    quantized: threading.Event | None = None
    nbytes: int = 0  # its codes' size, counted against max_pending_bytes while it is queued or committing


def default_digest_workers() -> int:
    """Digest processes a Committer starts unless told: a quarter of the cores, 1 to 8."""
    # 4 on the 16-core GPU host, where 4 workers meet the throughput goal with per-block digests
    # (benchmarks/quant_bench.py); the serving process and its data loading keep the rest.
    return max(1, min(8, (os.cpu_count() or 1) // 4))


def _check_meta(session: object, state_type: object, parents: object, taint: object, state_id: object,
                time_ns: object) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Check a submit's entry fields as StateEntry.encode() will, so a bad one fails submit(), not a later flush()."""

    def labels(values: object, what: str) -> tuple[str, ...]:
        if isinstance(values, (str, bytes)) or not isinstance(values, (tuple, list)):
            raise CommitError(f"nothing was queued: {what} must be a tuple or list, "
                              f"got {type(values).__name__} {values!r}")
        return tuple(values)

    try:
        check_label(session, "session")
        check_label(state_type, "state_type")
        if state_type not in COMMIT_STATE_TYPES:
            raise EntryError(f"unknown state_type {state_type!r}; use one of {sorted(COMMIT_STATE_TYPES)}")
        parents, taint = labels(parents, "parents"), labels(taint, "taint")
        for parent in parents:
            parse_digest(parent)
        for source in taint:
            check_label(source, "taint source")
        if state_id is not None and not callable(state_id):
            parse_digest(state_id)
    except EntryError as e:
        raise CommitError(f"nothing was queued: {e}") from e
    if time_ns is not None and (not is_int(time_ns) or not 0 <= time_ns < 2**63):
        raise CommitError("nothing was queued: time_ns must be a non-negative int of Unix nanoseconds (< 2**63), "
                          f"got {time_ns!r}")
    return parents, taint


def _codes_bytes(x: torch.Tensor | _Paged) -> int:
    """The DQP codes a queued stack holds: a byte per value and one more per row (V's per-row exponent)."""
    if isinstance(x, _Paged):
        layers, _, _, heads, dim = x.pool.shape
        return layers * x.length * heads * (dim + 1)
    return x.numel() // x.shape[-1] * (x.shape[-1] + 1)


def _sort_key(key: StateKey) -> tuple[int, int]:
    return key[0], KINDS.index(key[1]) if key[1] in KINDS else len(KINDS)


class Committer:
    """Commits K/V stacks (one StateEntry per submit) to a transparency log in the background."""

    def __init__(
        self,
        log: object,
        profile: DQPProfile,
        *,
        max_pending: int | None = 4,
        max_pending_bytes: int | None = None,
        keep_receipts: bool = True,
        digest_threads: int = 1,
        block_digests: bool = True,
        digest_process: bool | None = None,
        digest_workers: int | None = None,
        digest_timeout: float = 60.0,
    ) -> None:
        if max_pending is not None and (not is_int(max_pending) or max_pending < 1):
            raise CommitError(f"max_pending must be None or an int >= 1, got {max_pending!r}")
        if max_pending_bytes is not None and (not is_int(max_pending_bytes) or max_pending_bytes < 0):
            raise CommitError(f"max_pending_bytes must be None or a non-negative int, got {max_pending_bytes!r}")
        if digest_workers is None:
            digest_workers = default_digest_workers()
        if digest_workers < 1 or digest_threads < 1:
            raise CommitError(f"digest_workers and digest_threads must be >= 1, got {digest_workers} and {digest_threads}")
        if not digest_timeout > 0:
            raise CommitError(f"digest_timeout must be a positive number of seconds, got {digest_timeout!r}")
        self.log = log
        self.profile = profile
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_pending or 0)  # 0: no count limit
        # The codes of the queued and the committing jobs, in bytes; one job is always let in, however large.
        self._max_bytes = max_pending_bytes
        self._room = threading.Condition()
        self._pending_bytes = 0
        # Held to check closed and enqueue, and to set closed (as the transparency log does): a job is
        # either queued before close() stops the worker, and then committed or failed, or refused.
        self._state_lock = threading.Lock()
        self._lock = threading.Lock()  # guards the three collections below
        self._failures: list[tuple[str, BaseException]] = []  # (session, error), in the order they failed
        self._outstanding: dict[Future, str] = {}  # unresolved commit -> its session
        self._receipts: list[CommitResult] = []
        self._inv: dict[tuple[tuple[StateKey, ...], torch.device], torch.Tensor] = {}
        self._side: torch.cuda.Stream | None = None
        self._digest_threads = digest_threads  # BLAKE3's own threads for the whole-state digest
        self._block_digests = block_digests  # per-block digests in receipts (one hash call per block)
        # False: receipts reach callers through their tickets only, and flush() returns none; a
        # long-running engine would otherwise keep every receipt it never flushes. Failures are kept either way.
        self._keep_receipts = keep_receipts
        self._use_process = digest_process  # None: child processes for GPU states, this thread for CPU ones
        self._workers = digest_workers  # digest processes sharing each commit's hashing
        self._digest_timeout = digest_timeout  # + 1 s per 20 MiB: a worker silent for longer is stuck, its commit fails
        self._proc: DigestPool | None = None
        self.shm_fallbacks = 0  # commits hashed in this process because /dev/shm lacked room (benchmarks report it)
        self._headers: dict[tuple, bytes] = {}
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="fieldprint-committer", daemon=True)
        self._worker.start()

    # -- forward-thread side ---------------------------------------------------------------
    def submit(self, states: Mapping[StateKey, torch.Tensor], *, session: str, **meta: object) -> CommitTicket:
        """Queue one K/V stack {(layer, 'K'|'V'): [T, H, D]} for commit as one StateEntry.

        Never waits on the GPU. The inputs must not be written in place until
        ticket.wait_quantized(). Keyword arguments: state_type, parents, taint, state_id (a digest,
        or a function of the per-state block digests that returns one, called before the entry is
        logged), time_ns, timeout (seconds to wait for queue room before raising CommitError).
        """
        if not states:
            raise CommitError("submit() needs at least one (layer, kind) state")
        keys = sorted(states, key=_sort_key)
        return self._submit([([k], states[k]) for k in keys], session, **meta)

    def submit_stack(
        self, k: torch.Tensor, v: torch.Tensor, *, session: str, layers: list[int] | None = None, **meta: object
    ) -> CommitTicket:
        """Queue a whole sequence's K/V, each [L, T, H, D] (strided views are fine): two launches in all."""
        if k.dim() != 4 or v.dim() != 4 or k.shape != v.shape:
            raise CommitError(f"submit_stack wants K and V of one shape [L, T, H, D], got {tuple(k.shape)} and {tuple(v.shape)}")
        layers = list(range(k.shape[0])) if layers is None else list(layers)
        if len(layers) != k.shape[0] or len(set(layers)) != len(layers):
            raise CommitError(f"layers {layers} must name each of the {k.shape[0]} stacked layers once")
        return self._submit([([(l, "K") for l in layers], k), ([(l, "V") for l in layers], v)], session, **meta)

    def submit_paged(self, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: list[int], length: int, *,
                     session: str, **meta: object) -> CommitTicket:
        """Queue the first `length` tokens of a paged sequence's K/V (pools [L, blocks, page, H, D]) as one stack.

        On a GPU the quantizer reads the blocks in place through the table on the side stream: no
        gathered copy. The blocks must not be written until ticket.wait_quantized() (a stream
        wait). On a CPU the tokens are gathered here, and the blocks are free at once.
        """
        for pool in (k_pool, v_pool):
            if not isinstance(pool, torch.Tensor) or pool.dim() != 5 or pool.shape != k_pool.shape:
                raise CommitError(f"submit_paged wants K and V pools of one shape [L, blocks, page, H, D], "
                                  f"got {tuple(getattr(k_pool, 'shape', ()))} and {tuple(getattr(v_pool, 'shape', ()))}")
        n, blocks, page = k_pool.shape[:3]
        if (not isinstance(block_table, list) or not all(is_int(b) and 0 <= b < blocks for b in block_table)
                or not is_int(length) or not 0 < length <= len(block_table) * page):
            raise CommitError(f"submit_paged wants a list of block ids below {blocks} holding {length!r} tokens "
                              f"({page} per block), got {block_table!r}")
        layers = list(range(n))
        keys = [[(l, "K") for l in layers], [(l, "V") for l in layers]]
        if k_pool.device.type == "cuda":
            table = torch.tensor(block_table, dtype=torch.int32).to(k_pool.device, non_blocking=True)
            return self._submit([(keys[0], _Paged(k_pool, table, length)), (keys[1], _Paged(v_pool, table, length))],
                                session, **meta)
        index = torch.tensor(block_table)
        return self._submit([(ks, pool[:, index].flatten(1, 2)[:, :length]) for ks, pool in zip(keys, (k_pool, v_pool))],
                            session, **meta)

    def _submit(
        self,
        groups: list[tuple[list[StateKey], torch.Tensor]],
        session: str,
        *,
        state_type: str = "observation",
        parents: tuple[str, ...] = (),
        taint: tuple[str, ...] = (),
        state_id: str | Callable[[dict[StateKey, list[bytes]]], str] | None = None,
        time_ns: int | None = None,
        timeout: float | None = None,
    ) -> CommitTicket:
        if self._closed:  # early refusal; the check that counts is made again under the state lock
            raise CommitError("committer is closed; open a new one")
        parents, taint = _check_meta(session, state_type, parents, taint, state_id, time_ns)
        shape = (self.profile.num_kv_heads, self.profile.head_dim)
        for keys, x in groups:
            if len({self.profile.per_row(layer, kind) for layer, kind in keys}) > 1:  # DQPError for a key the profile lacks
                raise CommitError(f"states {keys} stacked in one tensor mix per-row and fixed scales")
            t, dims = (x.pool, (5,)) if isinstance(x, _Paged) else (x, (3, 4))
            if not isinstance(t, torch.Tensor) or t.dtype not in DTYPE_NAMES or t.dim() not in dims or tuple(t.shape[-2:]) != shape:
                raise CommitError(f"state {keys[0]} must be a bf16/fp16/fp32 [T, {shape[0]}, {shape[1]}] tensor, "
                                  f"got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        groups = [(keys, x if isinstance(x, _Paged) or x.dim() == 4 else x.unsqueeze(0)) for keys, x in groups]
        sources = [x.pool if isinstance(x, _Paged) else x for _, x in groups]
        devices = {x.device for x in sources}
        if len(devices) != 1:
            raise CommitError(f"all states of one submit must live on one device, got {sorted(map(str, devices))}")
        (dev,) = devices
        job = _Job(session, state_type, parents, taint, time.time_ns() if time_ns is None else time_ns,
                   state_id, [keys for keys, _ in groups], [DTYPE_NAMES[x.dtype] for x in sources], Future(),
                   nbytes=sum(_codes_bytes(x) for _, x in groups))
        ticket = CommitTicket(job.future)
        if dev.type == "cuda":
            self._launch_gpu(job, groups, dev, ticket)
        else:
            job.inputs = [x for _, x in groups]
            job.ticket = ticket
            job.quantized = threading.Event()
            ticket._event = job.quantized
        full = CommitError(f"committer still full after {timeout}s (max_pending {self._queue.maxsize or None}, "
                           f"max_pending_bytes {self._max_bytes}); flush() or raise them")
        deadline = None if timeout is None else time.monotonic() + timeout
        left = lambda: None if deadline is None else max(0.0, deadline - time.monotonic())  # noqa: E731
        # Blocking on a full queue under the state lock is safe: the worker drains the queue without it.
        if not self._state_lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            raise full
        try:
            if self._closed:
                raise CommitError("committer is closed; open a new one")
            if not self._reserve(job.nbytes, left()):
                job.future.set_exception(CommitError("not queued: committer was full"))
                raise full
            with self._lock:
                self._outstanding[job.future] = session
            job.future.add_done_callback(self._forget)
            try:
                self._queue.put(job, timeout=left())
            except queue.Full:
                self._free(job.nbytes)
                job.future.set_exception(CommitError("not queued: committer was full"))
                raise full from None
        finally:
            self._state_lock.release()
        return ticket

    def _reserve(self, nbytes: int, timeout: float | None) -> bool:
        """Count a job's codes against max_pending_bytes, waiting for room (False: none came in time)."""
        with self._room:
            fits = lambda: self._max_bytes is None or not self._pending_bytes or (  # noqa: E731
                self._pending_bytes + nbytes <= self._max_bytes)
            if not self._room.wait_for(fits, timeout):
                return False
            self._pending_bytes += nbytes
            return True

    def _free(self, nbytes: int) -> None:
        with self._room:
            self._pending_bytes -= nbytes
            self._room.notify_all()

    def _forget(self, f: Future) -> None:
        with self._lock:
            self._outstanding.pop(f, None)

    def _inverse_scales(self, keys: list[StateKey], dev: torch.device) -> torch.Tensor:
        inv = self._inv.get((tuple(keys), dev))
        if inv is None:
            e = np.stack([self.profile.exponents(layer, kind) for layer, kind in keys])
            inv = self._inv[(tuple(keys), dev)] = torch.from_numpy(inverse_scales(e)).to(dev)
        return inv

    def _launch_gpu(self, job: _Job, groups: list, dev: torch.device, ticket: CommitTicket) -> None:
        from fieldprint.kernels.quant import quantize_async, quantize_paged

        if self._side is None:
            self._side = torch.cuda.Stream(device=dev)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(dev))
        offset = 0
        with torch.cuda.stream(self._side):
            self._side.wait_event(ready)
            # Allocated on the side stream: memory from the forward stream's pool could be handed
            # back to the forward pass while the side stream still writes it.
            bad = torch.zeros(sum(len(keys) for keys, _ in groups), dtype=torch.int32, device=dev)
            device_codes = []
            for keys, x in groups:
                inv = None if self.profile.per_row(*keys[0]) else self._inverse_scales(keys, dev)
                counts = bad[offset : offset + len(keys)]
                # The allocator must not hand the inputs' memory out before this stream read them.
                if isinstance(x, _Paged):
                    x.table.record_stream(self._side)
                    codes, _ = quantize_paged(x.pool, x.table, x.length, inv, bad=counts)
                else:
                    x.record_stream(self._side)
                    codes, _ = quantize_async(x, inv, bad=counts)
                offset += len(keys)
                device_codes.append(codes)
                for i, key in enumerate(keys):
                    ticket.codes[key] = codes[i]
            read = torch.cuda.Event()  # the inputs are read: the forward pass may overwrite them after this
            read.record(self._side)
            for codes in device_codes:
                host = torch.empty(codes.shape, dtype=torch.int8, pin_memory=True)
                host.copy_(codes, non_blocking=True)
                job.host_codes.append(host)
            job.host_bad = torch.empty(bad.shape, dtype=torch.int32, pin_memory=True)
            job.host_bad.copy_(bad, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._side)
        job.copied = copied
        ticket._event, ticket.stacks = read, device_codes

    # -- background side ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._commit(job)
            except BaseException as e:  # kept and raised on flush: never silent
                self._fail(job, e)
            finally:
                if job is not None:
                    self._free(job.nbytes)
                self._queue.task_done()

    def _fail(self, job: _Job, e: BaseException) -> None:
        err = e if isinstance(e, CommitError) else CommitError(f"commit of session {job.session!r} failed: {e}")
        if err is not e:
            err.__cause__ = e
        with self._lock:
            self._failures.append((job.session, e))
        if job.quantized is not None:
            job.quantized.set()
        if not job.future.done():
            job.future.set_exception(err)

    def _codes(self, job: _Job) -> list[torch.Tensor]:
        if job.copied is not None:
            job.copied.synchronize()  # waits on this thread only; the forward stream runs on
            flat = [key for keys in job.groups for key in keys]
            for (layer, kind), n in zip(flat, job.host_bad.tolist()):
                if n:
                    raise DQPError(f"layer {layer} {kind} of session {job.session!r} holds {n} NaN/Inf value(s); nothing was committed")
            return job.host_codes
        try:
            out = []
            for keys, x in zip(job.groups, job.inputs):
                for i, (layer, kind) in enumerate(keys):
                    check_finite(x[i], f"layer {layer} {kind} of session {job.session!r}")
                out.append(torch.stack([quantize(x[i], self.profile, layer, kind).codes for i, (layer, kind) in enumerate(keys)]))
                job.ticket.stacks.append(out[-1])
                job.ticket.codes.update((key, out[-1][i]) for i, key in enumerate(keys))
            return out
        finally:
            job.inputs = []
            job.quantized.set()

    def _header(self, layer: int, kind: str, dtype: str, codes_shape: tuple[int, int, int]) -> bytes:
        key = (layer, kind, dtype, codes_shape)
        header = self._headers.get(key)
        if header is None:  # built once per shape: the worker's Python time is the forward pass's GIL time
            e = self.profile.fixed(layer, kind)
            t, h, d = codes_shape
            header = self._headers[key] = state_header(dtype, layer, kind, self.profile.block_size,
                                                       (t, h, d - (e is None)), e)
        return header

    def _commit(self, job: _Job) -> None:
        codes = self._codes(job)
        use_process = self._use_process if self._use_process is not None else job.copied is not None
        if use_process and self._proc is not None and self._proc.broken:
            self._proc.close()  # a worker died in an earlier commit (that commit failed): start afresh
            self._proc = None
        if use_process and self._proc is None:
            self._proc = DigestPool(self._workers, timeout=self._digest_timeout)
        # Too little shared memory for this commit: hash it here instead (slower for the forward
        # pass, never wrong).
        bs = self.profile.block_size
        if use_process and not self._proc.can_take(sum(c.numel() + c.shape[0] * -(-c.shape[1] // bs) * DIGEST_SIZE for c in codes)):
            use_process = False
            self.shm_fallbacks += 1
        parts, digests, blocks = [], {}, {}
        if use_process:
            groups = [([self._header(key[0], key[1], dtype, tuple(group.shape[1:])) for key in keys], group)
                      for keys, group, dtype in zip(job.groups, codes, job.dtypes)]
            results = iter(self._proc.digest(groups, self._block_digests, self._digest_threads, self.profile.block_size))
            for keys in job.groups:
                for key in keys:
                    digests[key], blocks[key] = next(results)
                    parts.append((key[0], key[1], digests[key]))
        else:
            for keys, group, dtype in zip(job.groups, codes, job.dtypes):
                for i, (layer, kind) in enumerate(keys):
                    qs = QuantizedState(group[i], self.profile.fixed(layer, kind), dtype, layer, kind, self.profile.block_size)
                    d = qs.digest(blocks=self._block_digests, threads=self._digest_threads)
                    digests[(layer, kind)], blocks[(layer, kind)] = d, qs.blocks
                    parts.append((layer, kind, d))
        job.host_codes = []
        stack = stack_digest(parts)  # raises DQPError if one (layer, kind) came twice
        state_id = job.state_id(blocks) if callable(job.state_id) else job.state_id or stack
        entry = StateEntry(
            state_id=state_id, state_type=job.state_type, digest=stack, profile=self.profile.digest,
            parents=job.parents, taint=job.taint, session=job.session, time_ns=job.time_ns,
        ).encode()
        added = self.log.add(entry)

        def done(f: Future) -> None:
            try:
                index = f.result()
            except BaseException as e:
                self._fail(job, e)
                return
            receipt = CommitResult(job.session, index, entry, stack, self.profile.digest, digests, blocks)
            if self._keep_receipts:
                with self._lock:
                    self._receipts.append(receipt)
            job.future.set_result(receipt)

        added.add_done_callback(done)

    # -- caller side -------------------------------------------------------------------------
    def flush(self, session: str | None = None, *, timeout: float | None = None) -> list[CommitResult]:
        """Wait for the session's queued commits (all sessions' if None); return their receipts in log order.

        Raises CommitError naming that session's failed commits (its .failures holds (session,
        error) pairs, its .receipts the commits that did succeed); other sessions' results stay
        for their own flush(). `timeout` bounds the whole wait; when it runs out, CommitError says
        so and the commits keep going in the background: flush() again later collects them.
        """
        if session is not None:
            try:
                check_label(session, "session")
            except EntryError as e:
                raise CommitError(f"flush(session=...) takes a session name or None: {e}") from e
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            pending = [f for f, s in self._outstanding.items() if session in (None, s)]
        for f in pending:  # every queued job's future resolves, committed or failed: the worker runs until close() flushed
            try:
                f.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except FieldprintError:
                pass  # recorded in _failures by _fail
            except TimeoutError:
                raise CommitError(f"flush timed out after {timeout}s with commits still pending; they go on in the "
                                  "background: call flush() again to collect their receipts and failures") from None
        with self._lock:
            failures = [(s, e) for s, e in self._failures if session in (None, s)]
            receipts = sorted((r for r in self._receipts if session in (None, r.session)), key=lambda r: r.index)
            self._failures = [(s, e) for s, e in self._failures if session not in (None, s)]
            self._receipts = [r for r in self._receipts if session not in (None, r.session)]
        if failures:
            lines = "; ".join(f"session {s!r}: {type(e).__name__}: {e}" for s, e in failures)
            err = CommitError(f"{len(failures)} commit(s) failed and were not logged: {lines}")
            err.failures = failures
            err.receipts = receipts  # the commits that did succeed
            raise err from failures[0][1]
        return receipts

    def close(self) -> None:
        """Refuse new submits, flush every session, then stop the background thread (raises CommitError if anything failed)."""
        with self._state_lock:  # a submit holding it finishes queueing first; any later one is refused
            if self._closed:
                return
            self._closed = True
        try:
            self.flush()
        finally:
            self._queue.put(None)
            self._worker.join()
            if self._proc is not None:
                self._proc.close()

    def __enter__(self) -> Committer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["COMMIT_STATE_TYPES", "KV_STATE_TYPES", "Committer", "CommitResult", "CommitTicket", "default_digest_workers"]
