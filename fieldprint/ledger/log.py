"""The transparency log: add() -> future index, batched sequencing, signed checkpoints, proofs, audit.

One sequencer thread owns every write. Producers enqueue entries; the sequencer takes a batch (up to
`batch_size` entries, waiting at most `batch_wait_ms` after the first one for more), hashes it into
the tree, and writes leaves and every tree node the batch completes in ONE storage transaction.
Futures resolve only after that commit returns, so a resolved index is durable and already
integrated: sequencing and integration are the same step, and no entry is ever sequenced but not
yet in the tree. Proofs read O(log n) stored complete-subtree nodes.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from fieldprint.canon import is_int
from fieldprint.errors import EntryError, LogError, NoteError
from fieldprint.ledger import merkle
from fieldprint.ledger.entry import MAX_ENTRY_BYTES
from fieldprint.ledger.merkle import (
    EMPTY_ROOT,
    NodeId,
    append_leaf,
    border_ids,
    border_root,
    leaf_hash,
    root_hash,
)
from fieldprint.ledger.note import Checkpoint, Signer, sign_note
from fieldprint.ledger.storage.base import STORED_MIN_LEVEL, LogStorage

DEFAULT_BATCH_SIZE = 1024
DEFAULT_BATCH_WAIT_MS = 1.0
DEFAULT_CHECKPOINT_INTERVAL_S = 1.0
BULK_CHUNK = 1 << 16  # entries per transaction on the bulk path
_STOP = object()


def check_entry(entry: object) -> bytes:
    """Return `entry` if it is bytes of at most MAX_ENTRY_BYTES, else raise EntryError."""
    if not isinstance(entry, bytes):
        raise EntryError(
            f"a log entry must be bytes, got {type(entry).__name__}; encode it first (e.g. fieldprint.ledger.entry.encode_entry)"
        )
    if len(entry) > MAX_ENTRY_BYTES:
        raise EntryError(
            f"a log entry is at most {MAX_ENTRY_BYTES} bytes, got {len(entry)}; log a digest of large content instead"
        )
    return entry


def wait_all(futures: Iterable["EntryFuture"]) -> list[int]:
    """Wait for every future and return their indices (raises the first failure)."""
    return [f.result() for f in futures]


_PENDING = object()
_logger = logging.getLogger(__name__)


class EntryFuture:
    """The future add() returns: result, exception, done, add_done_callback, cancel, cancelled, running.

    It has those methods of concurrent.futures.Future and no others, and is not a Future subclass:
    concurrent.futures.wait() and as_completed() do not accept it (use wait_all or result()).

    A concurrent.futures.Future builds a Condition per entry and takes its lock to resolve and to
    read it; at tens of thousands of entries per second those round trips were ~40% of the append
    path's CPU. These futures share their log's condition and are resolved a batch at a time, under
    one lock acquisition and one notify_all per batch. An added entry cannot be withdrawn, so
    cancel() always fails.
    """

    __slots__ = ("_cond", "_value", "_callbacks")

    def __init__(self, cond: threading.Condition) -> None:
        self._cond = cond
        self._value: object = _PENDING  # the leaf index, or the exception that failed the entry
        self._callbacks: list | None = None

    def done(self) -> bool:
        """True once the entry is durably sequenced or has failed."""
        return self._value is not _PENDING

    def _wait(self, timeout: float | None) -> object:
        if self._value is _PENDING:
            with self._cond:
                if not self._cond.wait_for(self.done, timeout):
                    raise TimeoutError(f"entry not sequenced within {timeout} s")
        return self._value

    def result(self, timeout: float | None = None) -> int:
        """The entry's leaf index once durable; raises what failed it, or TimeoutError."""
        value = self._wait(timeout)
        if isinstance(value, BaseException):
            raise value
        return value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """What failed the entry, or None once it is durably sequenced."""
        value = self._wait(timeout)
        return value if isinstance(value, BaseException) else None

    def add_done_callback(self, fn: Callable[["EntryFuture"], object]) -> None:
        """Call fn(self) once resolved (at once if it already is), on the resolving thread."""
        with self._cond:
            if self._value is _PENDING:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        _call(fn, self)

    def cancel(self) -> bool:
        """Refuse: the entry may already be in the batch being committed."""
        return False

    def cancelled(self) -> bool:
        """Never: see cancel()."""
        return False

    def running(self) -> bool:
        """True while the entry waits to be sequenced."""
        return not self.done()


def _call(fn, fut: EntryFuture) -> None:
    try:
        fn(fut)
    except Exception:  # as concurrent.futures does: a failing callback must not stop the sequencer
        _logger.exception("exception calling callback for %r", fut)


def _resolve(cond: threading.Condition, futures: Sequence[EntryFuture], values: Sequence[object]) -> None:
    """Resolve a batch of futures under one lock acquisition, then run their callbacks."""
    with cond:
        for f, v in zip(futures, values):
            f._value = v
        cond.notify_all()
    for f in futures:
        if f._callbacks:
            for fn in f._callbacks:
                _call(fn, f)


@dataclass(slots=True)
class AuditReport:
    """What an audit checked and every problem it found; `ok` when there are none."""

    size: int
    leaves_checked: int = 0
    nodes_checked: int = 0
    checkpoints_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the audit found no problem."""
        return not self.problems


@dataclass(slots=True)
class _Command:
    kind: str  # "checkpoint" | "flush" | "extend" | "audit"
    future: Future
    payload: Sequence[bytes] = ()


class TransparencyLog:
    """An RFC 9162 transparency log over a LogStorage, signing C2SP checkpoints."""

    def __init__(
        self,
        storage: LogStorage,
        signer_key: str,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
        checkpoint_interval_s: float | None = DEFAULT_CHECKPOINT_INTERVAL_S,
    ) -> None:
        if not is_int(batch_size) or batch_size < 1:
            raise LogError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not batch_wait_ms >= 0:
            raise LogError(f"batch_wait_ms must be >= 0, got {batch_wait_ms!r}")
        if checkpoint_interval_s is not None and not checkpoint_interval_s > 0:
            raise LogError(f"checkpoint_interval_s must be > 0 or None, got {checkpoint_interval_s!r}")
        signer = Signer.parse(signer_key)  # NoteError on a malformed key, before touching storage
        self._storage, self._signer_key = storage, signer_key
        self.origin, self._verifier_key = signer.name, signer.verifier_key()
        stored = storage.get_meta("verifier_key")
        if stored is None:
            storage.set_meta("origin", self.origin)
            storage.set_meta("verifier_key", self._verifier_key)
        elif stored != self._verifier_key:
            raise LogError(f"this log was created with verifier key {stored}; open it with the matching signer key")
        self._size = storage.size()
        self._border = self._get_nodes(border_ids(self._size))  # recovery: the right border of the tree
        self._batch_size, self._batch_wait = batch_size, batch_wait_ms / 1000.0
        self._interval = checkpoint_interval_s
        latest = storage.latest_checkpoint()
        self._last_cp_size, self._last_cp_time = (latest[0] if latest else -1), time.monotonic()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._resolved = threading.Condition()  # shared by this log's EntryFutures
        # Held to check closed/failed and enqueue, and to set closed/failed: an item is either queued
        # before the log stops taking items (and then sequenced or failed) or refused, never stranded.
        self._state_lock = threading.Lock()
        self._closed = False
        self._failure: BaseException | None = None
        self.periodic_checkpoint_error: Exception | None = None  # the last periodic checkpoint's failure; None after a success
        self._thread = threading.Thread(target=self._run, name="fieldprint-sequencer", daemon=True)
        self._thread.start()

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        signer_key: str,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
        checkpoint_interval_s: float | None = DEFAULT_CHECKPOINT_INTERVAL_S,
        durability: str = "full",
    ) -> "TransparencyLog":
        """Open (or create) the SQLite log at `path`; its origin is the signer key's name."""
        from fieldprint.ledger.storage.sqlite import SQLiteStorage

        Signer.parse(signer_key)
        storage = SQLiteStorage(path, durability=durability)
        try:
            return cls(storage, signer_key, batch_size=batch_size, batch_wait_ms=batch_wait_ms,
                       checkpoint_interval_s=checkpoint_interval_s)
        except BaseException:
            storage.close()
            raise

    # --- writing ---------------------------------------------------------------------------------

    def add(self, entry: bytes) -> EntryFuture:
        """Queue an entry; the future resolves to its leaf index once durably sequenced and integrated."""
        check_entry(entry)
        fut = EntryFuture(self._resolved)
        with self._state_lock:
            self._check_open()
            self._queue.put((entry, fut))
        return fut

    def extend(self, entries: Sequence[bytes]) -> range:
        """Bulk path: integrate many entries in large transactions and return their index range."""
        entries = [check_entry(e) for e in entries]
        return self._command("extend", entries)

    def flush(self) -> None:
        """Wait until every entry added before this call is durably integrated."""
        self._command("flush")

    def checkpoint(self) -> Checkpoint:
        """Sign, store and return a checkpoint of the current integrated tree."""
        return self._command("checkpoint")

    def _command(self, kind: str, payload: Sequence[bytes] = ()):
        if threading.current_thread() is self._thread:
            raise LogError(f"{kind}() called from a future's done-callback would wait on itself; call it elsewhere")
        fut: Future = Future()
        with self._state_lock:
            self._check_open()
            self._queue.put(_Command(kind, fut, payload))
        while True:  # every queued command is run or failed; the liveness check guards against a bug here
            try:
                return fut.result(timeout=1.0)
            except TimeoutError:
                if not self._thread.is_alive() and not fut.done():
                    raise LogError(f"{kind}() was never run: the log's sequencer is gone; reopen the log") from None

    def _check_open(self) -> None:
        if self._closed:
            raise LogError("the log is closed; open it again to add entries")
        if self._failure is not None:
            raise LogError(f"the log's sequencer stopped after an error: {self._failure!r}; reopen the log")

    # --- the sequencer thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._step():
                pass
        except BaseException as exc:  # keep the reason; fail everything still queued
            with self._state_lock:  # from here on add() and commands are refused, so the drain is complete
                self._failure = exc
            self._drain_failed(LogError(f"the log's sequencer stopped after an error: {exc!r}; reopen the log"))

    def _step(self) -> bool:
        timeout = None
        if self._interval is not None:
            timeout = max(0.0, self._last_cp_time + self._interval - time.monotonic())
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            self._periodic_checkpoint()
            return True
        batch: list[tuple[bytes, EntryFuture]] = []
        commands: list[_Command] = []
        try:
            running = self._collect(item, batch, commands)
            if running and batch and len(batch) < self._batch_size and self._batch_wait > 0:
                # Linger once for the whole batch (a sleep, not a blocking get per item: waking the
                # sequencer for every single arrival costs a thread switch per entry).
                time.sleep(self._batch_wait)
                running = self._collect(None, batch, commands)
            if batch:
                self._integrate_batch(batch)
            for cmd in commands:
                self._run_command(cmd)
        except BaseException as exc:  # items already taken off the queue must not be left pending
            err = LogError(f"the log's sequencer stopped after an error: {exc!r}; reopen the log")
            _resolve(self._resolved, [f for _, f in batch if not f.done()], [err] * len(batch))
            for cmd in commands:
                if not cmd.future.done() and cmd.future.set_running_or_notify_cancel():
                    cmd.future.set_exception(err)
            raise
        self._periodic_checkpoint()
        return running

    def _collect(self, item: object, batch: list, commands: list) -> bool:
        """Move queued items into batch/commands up to batch_size; False once the stop marker is seen."""
        while True:
            if item is _STOP:
                return False
            if item is not None:
                (commands.append if isinstance(item, _Command) else batch.append)(item)
                if len(batch) >= self._batch_size:
                    return True
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return True

    def _integrate_batch(self, batch: list[tuple[bytes, EntryFuture]]) -> None:
        futures = [f for _, f in batch]
        try:
            start = self._integrate([e for e, _ in batch])
        except Exception as exc:
            _resolve(self._resolved, futures, [exc] * len(futures))
            return
        _resolve(self._resolved, futures, range(start, start + len(futures)))

    def _integrate(self, entries: Sequence[bytes]) -> int:
        """Hash entries into a copy of the border and commit leaves + completed nodes at once."""
        start, border, emitted = self._size, list(self._border), []
        hashes = [leaf_hash(e) for e in entries]
        for i, h in enumerate(hashes):
            append_leaf(border, start + i, h, emitted)
        nodes = [n for n in emitted if n[0] >= STORED_MIN_LEVEL]
        self._storage.append(start, entries, hashes, nodes)
        self._border, self._size = border, start + len(entries)  # only after the commit returned
        return start

    def _get_nodes(self, ids: Sequence[NodeId]) -> list[bytes]:
        """Complete-node hashes: stored ones read directly, low ones re-hashed from <= 16 leaf hashes."""
        low = {nid for nid in ids if nid[0] < STORED_MIN_LEVEL}
        high = [nid for nid in ids if nid[0] >= STORED_MIN_LEVEL]
        found = dict(zip(high, self._storage.nodes(high)))
        if low:
            leaves = self._storage.leaf_hashes([(i << lvl, (i + 1) << lvl) for lvl, i in low])
            for lvl, i in low:
                try:
                    found[(lvl, i)] = root_hash([leaves[j] for j in range(i << lvl, (i + 1) << lvl)])
                except KeyError as exc:
                    raise LogError(f"leaf {exc.args[0]} is missing from storage; run audit()") from None
        return [found[nid] for nid in ids]

    def _run_command(self, cmd: _Command) -> None:
        if not cmd.future.set_running_or_notify_cancel():
            return
        try:
            if cmd.kind == "checkpoint":
                result = self._make_checkpoint()
            elif cmd.kind == "audit":
                result = self._audit()
            elif cmd.kind == "extend":
                start = self._size
                for lo in range(0, len(cmd.payload), BULK_CHUNK):
                    try:
                        self._integrate(cmd.payload[lo : lo + BULK_CHUNK])
                    except LogError as exc:
                        raise LogError(f"{exc}; entries {start}..{self._size - 1} of this extend() were "
                                       f"integrated before the failure, the rest were not") from None
                result = range(start, self._size)
            else:
                result = None
        except Exception as exc:
            cmd.future.set_exception(exc)
        else:
            cmd.future.set_result(result)

    def _make_checkpoint(self) -> Checkpoint:
        size, root = self._size, border_root(self._border)
        note = sign_note(Checkpoint.body(self.origin, size, root), self._signer_key)
        self._storage.add_checkpoint(size, note)
        self._last_cp_size, self._last_cp_time = size, time.monotonic()
        return Checkpoint(self.origin, size, root, note)

    def _periodic_checkpoint(self) -> None:
        if self._interval is None or time.monotonic() - self._last_cp_time < self._interval:
            return
        self._last_cp_time = time.monotonic()
        if self._size != self._last_cp_size:
            try:
                self._make_checkpoint()
            except Exception as exc:  # a failed periodic checkpoint must not stop sequencing; retried next period
                self.periodic_checkpoint_error = exc
            else:
                self.periodic_checkpoint_error = None  # the error describes the current state, not history

    def _drain_failed(self, err: LogError) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Command):
                if item.future.set_running_or_notify_cancel():
                    item.future.set_exception(err)
            elif isinstance(item, tuple):
                _resolve(self._resolved, [item[1]], [err])

    # --- reading ---------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of durably integrated entries."""
        return self._size

    @property
    def verifier_key(self) -> str:
        """The verifier key text that checks this log's checkpoints."""
        return self._verifier_key

    def latest_checkpoint(self) -> Checkpoint | None:
        """The stored checkpoint of largest size (signature re-verified), or None."""
        row = self._storage.latest_checkpoint()
        return None if row is None else Checkpoint.open(row[1], [self._verifier_key])

    def checkpoints(self) -> list[Checkpoint]:
        """Every stored checkpoint, by increasing size (signatures re-verified)."""
        return [Checkpoint.open(note, [self._verifier_key]) for _, note in self._storage.checkpoints()]

    def entry(self, index: int) -> bytes:
        """The entry stored at `index`."""
        self._check_index(index, self._size, "index")
        data = self._storage.entry(index)
        if data is None:
            raise LogError(f"entry {index} is missing from storage although the log has size {self._size}; run audit()")
        return data

    def root_hash(self, size: int | None = None) -> bytes:
        """Root hash of the tree of the first `size` entries (default: the whole log)."""
        size = self._size if size is None else size
        self._check_index(size, self._size + 1, "size")
        return merkle.subtree_root(size, self._get_nodes) if size else EMPTY_ROOT

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """Inclusion proof of entry `index` in the tree of `size` entries (0 <= index < size <= log size)."""
        self._check_index(size, self._size + 1, "size")
        self._check_index(index, size, "index")
        return merkle.inclusion_proof(index, size, self._get_nodes)

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        """Consistency proof from size1 to size2 (0 <= size1 <= size2 <= log size; empty from 0)."""
        self._check_index(size2, self._size + 1, "size2")
        self._check_index(size1, size2 + 1, "size1")
        return merkle.consistency_proof(size1, size2, self._get_nodes)

    @staticmethod
    def _check_index(value: object, bound: int, what: str) -> None:
        if not is_int(value) or not 0 <= value < bound:
            raise LogError(f"{what} must be an integer in [0, {bound}), got {value!r}")

    # --- audit -----------------------------------------------------------------------------------

    def audit(self) -> AuditReport:
        """Re-verify the whole stored log from its entries: every leaf, node and checkpoint.

        It runs on the sequencer, so it sees one quiescent log: adds queue up while it runs.
        """
        return self._command("audit")

    def _audit(self) -> AuditReport:
        size = self._size
        report = AuditReport(size)
        problems = report.problems
        stored = self._storage.size()
        if stored != size:
            problems.append(f"storage holds {stored} leaves but the log has integrated {size}")
        cps = self._storage.checkpoints()
        want = {s for s, _ in cps if 0 < s <= size}
        roots = {0: EMPTY_ROOT}
        pending: dict[int, list[tuple[int, bytes]]] = defaultdict(list)

        def check(level: int) -> None:
            rows = pending.pop(level, [])
            if not rows:
                return
            have = self._storage.node_range(level, rows[0][0], rows[-1][0] + 1)
            report.nodes_checked += len(rows)
            for idx, h in rows:
                got = have.get(idx)
                if got is None:
                    problems.append(f"node (level {level}, index {idx}) is missing")
                elif got != h:
                    problems.append(f"node (level {level}, index {idx}) does not match the hash recomputed from the entries")

        border: list[bytes] = []
        emitted: list[tuple[int, int, bytes]] = []
        expected = 0
        for idx, data, stored_hash in self._storage.leaves(0, size):
            if idx != expected:
                problems.append(f"leaves {expected}..{idx - 1} are missing; the tree above them cannot be recomputed")
                break
            h = leaf_hash(data)
            if h != stored_hash:
                problems.append(f"leaf {idx}: the stored leaf hash does not match the hash of the stored entry")
            append_leaf(border, idx, h, emitted)
            for level, i, nh in emitted:
                if level >= STORED_MIN_LEVEL:
                    pending[level].append((i, nh))
                    if len(pending[level]) >= 4096:
                        check(level)
            emitted.clear()
            expected += 1
            if expected in want:
                roots[expected] = border_root(border)
        else:
            if expected != size:
                problems.append(f"leaves {expected}..{size - 1} are missing")
        report.leaves_checked = expected
        for level in list(pending):
            check(level)
        for level, count in self._storage.node_count().items():
            want_count = (size >> level) if level >= STORED_MIN_LEVEL else 0
            if count != want_count:
                problems.append(f"level {level} stores {count} nodes, a tree of size {size} has {want_count} stored there")
        for s, note in cps:
            report.checkpoints_checked += 1
            try:
                cp = Checkpoint.open(note, [self._verifier_key])
            except NoteError as exc:
                problems.append(f"checkpoint stored for size {s} does not verify: {exc}")
                continue
            if cp.origin != self.origin or cp.size != s:
                problems.append(f"checkpoint stored for size {s} says origin {cp.origin!r} size {cp.size}")
            elif s > size:
                problems.append(f"checkpoint for size {s} is beyond the log's size {size}")
            elif s in roots and cp.root_hash != roots[s]:
                problems.append(f"checkpoint for size {s} has root {cp.root_hash.hex()}, the entries give {roots[s].hex()}")
        return report

    # --- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Integrate everything queued, stop the sequencer and close storage."""
        if self._closed:
            return
        if threading.current_thread() is self._thread:
            raise LogError("close() called from a future's done-callback would wait on itself; call it elsewhere")
        with self._state_lock:  # add() checks and enqueues under this lock: nothing can queue behind _STOP
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join()
        # Only if the sequencer failed can items remain (it drained them itself): fail any, never hang one.
        self._drain_failed(LogError("the log was closed before this entry was sequenced; nothing was written"))
        self._storage.close()

    def __enter__(self) -> "TransparencyLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
