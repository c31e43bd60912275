"""The transparency log: add() -> future index, batched sequencing, signed checkpoints, proofs, audit.

One sequencer thread owns every write. Producers enqueue entries; the sequencer takes a batch (up to
`batch_size` entries, waiting at most `batch_wait_ms` after the first one for more), hashes it into
the tree, and writes leaves and every tree node the batch completes in ONE storage transaction.
Futures resolve only after that commit returns, so a resolved index is durable and already
integrated: sequencing and integration are the same step, and no entry is ever sequenced but not
yet in the tree. Proofs read O(log n) stored complete-subtree nodes.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from fieldprint.atomic import sweep_temporaries
from fieldprint.canon import is_int
from fieldprint.errors import EntryError, LogError
from fieldprint.ledger.entry import MAX_ENTRY_BYTES
from fieldprint.ledger.futures import EntryFuture, resolve_batch, wait_all
from fieldprint.ledger.merkle import append_leaf, border_ids, border_root, leaf_hash
from fieldprint.ledger.note import Checkpoint, Signer, sign_note
from fieldprint.ledger.published import (
    published_path,
    read_checkpoint_file,
    write_checkpoint_file,
)
from fieldprint.ledger.reader import LogAudit, LogReader, audit_storage, leaf_span
from fieldprint.ledger.storage.base import STORED_MIN_LEVEL, LogStorage

__all__ = ["EntryFuture", "LogAudit", "LogReader", "TransparencyLog", "check_entry", "wait_all"]

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


@dataclass(slots=True)
class _Command:
    kind: str  # "checkpoint" | "flush" | "extend" | "audit"
    future: Future
    payload: Sequence = ()  # extend: the entries; audit: the checkpoints to check against


class TransparencyLog(LogReader):
    """An RFC 9162 transparency log over a LogStorage, signing C2SP checkpoints (LogReader's reads too)."""

    def __init__(
        self,
        storage: LogStorage,
        signer_key: str,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
        checkpoint_interval_s: float | None = DEFAULT_CHECKPOINT_INTERVAL_S,
        published: str | None = None,
        create: bool = True,
    ) -> None:
        if not is_int(batch_size) or batch_size < 1:
            raise LogError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not batch_wait_ms >= 0:
            raise LogError(f"batch_wait_ms must be >= 0, got {batch_wait_ms!r}")
        if checkpoint_interval_s is not None and not checkpoint_interval_s > 0:
            raise LogError(f"checkpoint_interval_s must be > 0 or None, got {checkpoint_interval_s!r}")
        signer = Signer.parse(signer_key)  # NoteError on a malformed key, before touching storage
        self._storage, self._signer_key, self._published = storage, signer_key, published
        self.origin, self._verifier_key = signer.name, signer.verifier_key()
        self._where = getattr(storage, "path", type(storage).__name__)
        stored = storage.get_meta("verifier_key")
        if stored is None:
            self._refuse_new_unless(create)
            storage.set_meta("origin", self.origin)
            storage.set_meta("verifier_key", self._verifier_key)
        elif stored != self._verifier_key:
            raise LogError(f"this log was created with verifier key {stored}; open it with the matching signer key")
        self._size = storage.size()
        self._border = self._get_nodes(border_ids(self._size))  # recovery: the right border of the tree
        self._root = border_root(self._border)
        latest = storage.latest_checkpoint()
        if self._check_published(self._size) is None and latest is not None and published is not None:
            write_checkpoint_file(published, latest[1])  # a lost checkpoint file is published again
        self._batch_size, self._batch_wait = batch_size, batch_wait_ms / 1000.0
        self._interval = checkpoint_interval_s
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

    def _refuse_new_unless(self, create: bool) -> None:
        """A storage holding no log is a new log only if the caller creates one and nothing was published."""
        if not create:
            raise LogError(f"{self._where} holds no log (empty or new) although this log exists; "
                           f"restore its database from a backup. Nothing was written")
        if self._published is not None and read_checkpoint_file(self._published, self._verifier_key, self.origin):
            raise LogError(f"{self._where} holds no log but the log published a checkpoint ({self._published}): "
                           f"its database was replaced or emptied. Restore it from a backup. Nothing was written")

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
        create: bool = True,
    ) -> TransparencyLog:
        """Open the SQLite log at `path` for writing (create it if `create`); its origin is the key's name.

        One process writes a log at a time (an OS lock on `<path>.lock`); the latest checkpoint is
        also published to `<path>.checkpoint` and the database must extend it (see published.py).
        A `postgresql://` URL opens the log shared by many processes there instead (storage/postgres.py).
        """
        from fieldprint.ledger.storage.sqlite import SQLiteStorage

        if _is_postgres(path):
            from fieldprint.ledger.storage.postgres import open_log

            return open_log(path, signer_key, batch_size=batch_size, batch_wait_ms=batch_wait_ms,
                            checkpoint_interval_s=checkpoint_interval_s, durability=durability, create=create)
        Signer.parse(signer_key)
        path, published = os.fspath(path), published_path(path)
        if not _holds_data(path) and (not create or os.path.exists(published)):
            why = f"the log published a checkpoint ({published})" if os.path.exists(published) else "this log exists"
            raise LogError(f"the log database {path} is missing or empty but {why}: restore it from a backup. "
                           f"Nothing was written")
        sweep_temporaries(os.path.dirname(os.path.abspath(published)))  # checkpoint files a killed writer left
        storage = SQLiteStorage(path, durability=durability)
        try:
            return cls(storage, signer_key, batch_size=batch_size, batch_wait_ms=batch_wait_ms,
                       checkpoint_interval_s=checkpoint_interval_s, published=published, create=create)
        except BaseException:
            storage.close()
            raise

    @staticmethod
    def open_readonly(path: str | os.PathLike, verifier_key: str) -> LogReader:
        """Open the log at `path` (SQLite file or `postgresql://` URL) for reading with only its verifier key."""
        if _is_postgres(path):
            from fieldprint.ledger.storage.postgres import open_reader

            return open_reader(path, verifier_key)
        return LogReader.open(path, verifier_key)

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

    def _command(self, kind: str, payload: Sequence = ()):
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
            item = self._queue.get_nowait()
        except queue.Empty:
            self._storage.release_lease()  # idle: a shared log's other processes need not wait for our lease
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
            resolve_batch(self._resolved, [f for _, f in batch if not f.done()], [err] * len(batch))
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
            resolve_batch(self._resolved, futures, [exc] * len(futures))
            return
        resolve_batch(self._resolved, futures, range(start, start + len(futures)))

    def _integrate(self, entries: Sequence[bytes]) -> int:
        """Hash entries into a copy of the border and commit leaves + completed nodes at once."""
        hashes = [leaf_hash(e) for e in entries]
        with self._storage.sequencer_turn(self._size, self._root) as head:
            if (head.size, head.root) != (self._size, self._root):
                self._adopt(head.size, head.root)  # a shared log: another process integrated since our last turn
            start, border, emitted = self._size, list(self._border), []
            for i, h in enumerate(hashes):
                append_leaf(border, start + i, h, emitted)
            nodes = [n for n in emitted if n[0] >= STORED_MIN_LEVEL]
            self._storage.append(start, entries, hashes, nodes)
            root = border_root(border)
            head.advance(start + len(entries), root)
        self._border, self._size, self._root = border, start + len(entries), root  # only after the commit returned
        return start

    def _adopt(self, size: int, root: bytes | None) -> None:
        """Continue from the committed head (size, root): read its border, check it gives that root."""
        border = self._get_nodes(border_ids(size))
        if root is not None and border_root(border) != root:
            raise LogError(f"the stored tree of {self._where} at size {size} does not give the root of the log's "
                           f"tree head; nothing was written. Run audit() and restore the database from a backup")
        self._size, self._border, self._root = size, border, border_root(border)

    def _run_command(self, cmd: _Command) -> None:
        if not cmd.future.set_running_or_notify_cancel():
            return
        try:
            if cmd.kind == "checkpoint":
                result = self._make_checkpoint()
            elif cmd.kind == "audit" and self._storage.shared:  # other processes write on: audit one snapshot
                with self._storage.snapshot():
                    result = audit_storage(self._storage, self._storage.size(), self.origin, self._verifier_key, cmd.payload)
            elif cmd.kind == "audit":
                result = audit_storage(self._storage, self._size, self.origin, self._verifier_key, cmd.payload)
            elif cmd.kind == "extend":
                start = self._size
                for lo in range(0, len(cmd.payload), BULK_CHUNK):
                    try:
                        self._integrate(cmd.payload[lo : lo + BULK_CHUNK])
                    except LogError as exc:
                        raise LogError(f"{exc}; {leaf_span(start, self._size)} of this extend() were "
                                       f"integrated before the failure, the rest were not") from None
                result = range(start, self._size)
            else:
                result = None
        except Exception as exc:
            cmd.future.set_exception(exc)
        else:
            cmd.future.set_result(result)

    def _make_checkpoint(self) -> Checkpoint:
        committed = self._storage.size() if self._storage.shared else self._size
        if committed > self._size:
            self._adopt(committed, None)  # sign the latest committed tree, not this process's last turn
        size, root = self._size, border_root(self._border)
        note = sign_note(Checkpoint.body(self.origin, size, root), self._signer_key)
        self._storage.add_checkpoint(size, note)
        if self._published is not None:  # only once the database holds it: the file never runs ahead
            write_checkpoint_file(self._published, note)
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
                resolve_batch(self._resolved, [item[1]], [err])

    # --- reading (LogReader's methods, over what this log has integrated) -----------------------

    @property
    def size(self) -> int:
        """Number of durably integrated entries (on a shared log: by every process, as committed now)."""
        return self._storage.size() if self._storage.shared else self._size

    def audit(self, against: Sequence[Checkpoint] = ()) -> LogAudit:
        """Re-verify the whole stored log from its entries: every leaf, node and checkpoint.

        It runs on the sequencer, so it sees one quiescent log: adds queue up while it runs.
        `against`: checkpoints saved elsewhere (already verified); each must be a prefix of this log.
        """
        return self._command("audit", against)

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

    def __enter__(self) -> TransparencyLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_postgres(path: str | os.PathLike) -> bool:
    return isinstance(path, str) and path.startswith(("postgresql://", "postgres://"))


def _holds_data(path: str) -> bool:
    """Whether an SQLite database exists at `path` with any content (in the file or its -wal)."""
    return any(os.path.isfile(p) and os.path.getsize(p) > 0 for p in (path, path + "-wal"))
