"""The future TransparencyLog.add() returns, resolved a batch at a time under the log's condition."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence


def wait_all(futures: Iterable[EntryFuture]) -> list[int]:
    """Wait for every future and return their indices (raises the first failure)."""
    return [f.result() for f in futures]


_PENDING = object()
_logger = logging.getLogger("fieldprint.ledger.log")


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

    __slots__ = ("_callbacks", "_cond", "_value")

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

    def add_done_callback(self, fn: Callable[[EntryFuture], object]) -> None:
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


def resolve_batch(cond: threading.Condition, futures: Sequence[EntryFuture], values: Sequence[object]) -> None:
    """Resolve a batch of futures under one lock acquisition, then run their callbacks."""
    with cond:
        for f, v in zip(futures, values):
            f._value = v
        cond.notify_all()
    for f in futures:
        if f._callbacks:
            for fn in f._callbacks:
                _call(fn, f)
