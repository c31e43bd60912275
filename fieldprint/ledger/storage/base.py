"""The storage interface a transparency log needs: append-only leaves, complete tree nodes, checkpoints.

Each leaf row holds the entry and its leaf hash. Complete-subtree nodes are stored only from level
STORED_MIN_LEVEL up: a node below it covers at most 2**STORED_MIN_LEVEL leaves and is re-hashed from
their stored leaf hashes when a proof needs it, which makes appends write about one row per entry
(instead of three) while a proof still reads O(log n) rows.

One writer at a time (a log's sequencer thread: in the one process holding SQLite's writer lock, or
in whichever process holds a shared backend's sequencer lease, see `sequencer_turn`) calls `append`
and `add_checkpoint`; any thread, and read-only opens in other processes, may read, and
`snapshot()` gives a reader one consistent view across many calls (the audit needs that).
`append` is one atomic, durable transaction: when it returns, the leaves, the nodes they complete
and nothing else are stored; when it raises, nothing is. A backend (SQLite embedded, PostgreSQL at
scale) implements exactly this and passes the same tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext

NodeRow = tuple[int, int, bytes]  # (level, index, hash)
STORED_MIN_LEVEL = 4


class TreeHead:
    """The committed (size, root) a sequencer's turn starts from; advance() sets the one it commits."""

    def __init__(self, size: int, root: bytes | None) -> None:
        self.size, self.root = size, root  # root None: stored by a bare append, not computed by a log

    def advance(self, size: int, root: bytes) -> None:
        """Record the head the turn's appends lead to."""
        self.size, self.root = size, root


class LogStorage(ABC):
    """Durable storage for one transparency log."""

    shared = False  # True when processes other than this one's sequencer may grow the log (PostgreSQL)

    def sequencer_turn(self, size: int, root: bytes) -> AbstractContextManager[TreeHead]:
        """One sequencer's turn to integrate a batch: yields the committed tree head.

        The caller appends from that head and calls advance(); the turn commits both as one. With one
        writer per log (SQLite's writer lock) the head is the caller's own and there is nothing to do;
        a shared backend takes its sequencer lease here and commits only if the head is unchanged.
        """
        return nullcontext(TreeHead(size, root))

    def release_lease(self) -> None:
        """Let another process sequence now (this one has nothing queued); no-op with one writer."""
        return None

    @abstractmethod
    def get_meta(self, key: str) -> str | None:
        """A metadata value (origin, verifier key), or None when unset."""

    @abstractmethod
    def set_meta(self, key: str, value: str) -> None:
        """Durably set a metadata value."""

    @abstractmethod
    def size(self) -> int:
        """Number of stored leaves (the integrated tree size)."""

    @abstractmethod
    def append(self, start: int, entries: Sequence[bytes], leaf_hashes: Sequence[bytes], nodes: Sequence[NodeRow]) -> None:
        """Store entries (with their leaf hashes) at start.. and the nodes they complete, in one transaction."""

    @abstractmethod
    def add_checkpoint(self, size: int, note: str) -> None:
        """Durably store a signed checkpoint note for tree size `size`."""

    @abstractmethod
    def entry(self, index: int) -> bytes | None:
        """The entry at `index`, or None when absent."""

    @abstractmethod
    def leaves(self, start: int, end: int) -> Iterator[tuple[int, bytes, bytes]]:
        """(index, entry, stored leaf hash) for start <= index < end, in index order."""

    @abstractmethod
    def leaf_hashes(self, ranges: Sequence[tuple[int, int]]) -> dict[int, bytes]:
        """{index: stored leaf hash} for every index in the half-open ranges given."""

    @abstractmethod
    def nodes(self, ids: Sequence[tuple[int, int]]) -> list[bytes]:
        """Hashes of stored nodes (level >= STORED_MIN_LEVEL) in the order asked; LogError if absent."""

    @abstractmethod
    def node_range(self, level: int, start: int, end: int) -> dict[int, bytes]:
        """{index: hash} of the stored nodes at `level` with start <= index < end."""

    @abstractmethod
    def node_count(self) -> dict[int, int]:
        """{level: number of stored nodes} (lets an audit spot nodes that should not exist)."""

    @abstractmethod
    def checkpoints(self) -> list[tuple[int, str]]:
        """Every stored (size, note), by increasing size."""

    @abstractmethod
    def latest_checkpoint(self) -> tuple[int, str] | None:
        """The stored (size, note) of largest size, or None."""

    @abstractmethod
    def snapshot(self) -> AbstractContextManager[None]:
        """A context in which this thread's reads all see one committed state of the log."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; further calls fail."""
