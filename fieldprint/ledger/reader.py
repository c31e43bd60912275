"""Reading a transparency log with only its public key: entries, checkpoints, proofs and the audit.

`LogReader.open(path, verifier_key)` opens the SQLite log read-only: it never writes the folder
(a read-only data folder works), takes no writer lock (it works beside the process that writes),
and cannot sign. `TransparencyLog` is a LogReader that also writes.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from fieldprint.canon import is_int
from fieldprint.errors import LogError, NoteError
from fieldprint.ledger import merkle
from fieldprint.ledger.merkle import (
    EMPTY_ROOT,
    NodeId,
    append_leaf,
    border_root,
    leaf_hash,
    root_hash,
)
from fieldprint.ledger.note import Checkpoint, Verifier
from fieldprint.ledger.published import (
    check_against,
    published_path,
    read_checkpoint_file,
)
from fieldprint.ledger.storage.base import STORED_MIN_LEVEL, LogStorage


@dataclass(slots=True)
class LogAudit:
    """What a log audit checked and every problem it found; `ok` when there are none."""

    size: int
    leaves_checked: int = 0
    nodes_checked: int = 0
    checkpoints_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the audit found no problem."""
        return not self.problems


def leaf_span(begin: int, end: int) -> str:
    """Name the leaves [begin, end) in a message: 'leaf 7' or 'leaves 7..9' (never a reversed range)."""
    if end - begin == 1:
        return f"leaf {begin}"
    return f"leaves {begin}..{end - 1}" if end > begin else "no leaves"


class LogReader:
    """A transparency log opened for reading: entries, checkpoints, proofs and audit; no add, no sign."""

    def __init__(self, storage: LogStorage, verifier_key: str, *, published: str | None = None) -> None:
        self.origin = Verifier.parse(verifier_key).name  # a C2SP log's key name is its origin
        self._storage, self._verifier_key, self._published = storage, verifier_key, published
        self._where = getattr(storage, "path", type(storage).__name__)
        stored = storage.get_meta("verifier_key")
        if stored is None:
            raise LogError(f"{self._where} holds no log (no verifier key is stored in it)")
        if stored != verifier_key:
            raise LogError(f"{self._where} is the log of verifier key {stored}, not of {verifier_key}")

    @classmethod
    def open(cls, path: str | os.PathLike, verifier_key: str) -> LogReader:
        """Open the SQLite log at `path` read-only, checking it with its verifier key."""
        from fieldprint.ledger.storage.sqlite import SQLiteStorage

        Verifier.parse(verifier_key)  # NoteError on a malformed key, before touching the file
        storage = SQLiteStorage(path, readonly=True)
        try:
            return cls(storage, verifier_key, published=published_path(path))
        except BaseException:
            storage.close()
            raise

    def _check_published(self, size: int) -> Checkpoint | None:
        """Refuse a database that does not extend the checkpoint file; return that checkpoint.

        The writer calls this at open: it must never sign on from a rolled-back or damaged database.
        A reader opens such a log anyway, so that its audit can say what is wrong.
        """
        if self._published is None:
            return None
        cp = read_checkpoint_file(self._published, self._verifier_key, self.origin)
        if cp is not None:
            check_against(self._where, size, lambda s: merkle.subtree_root(s, self._get_nodes) if s else EMPTY_ROOT,
                          cp, self._published)
        return cp

    # --- reading ---------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of entries stored now (a writer elsewhere may add more)."""
        return self._storage.size()

    @property
    def verifier_key(self) -> str:
        """The verifier key text that checks this log's checkpoints."""
        return self._verifier_key

    def latest_checkpoint(self) -> Checkpoint | None:
        """The stored checkpoint of largest size (signature and origin re-verified), or None."""
        row = self._storage.latest_checkpoint()
        return None if row is None else Checkpoint.open(row[1], [self._verifier_key], origin=self.origin)

    def checkpoints(self) -> list[Checkpoint]:
        """Every stored checkpoint, by increasing size (signatures and origin re-verified)."""
        return [Checkpoint.open(note, [self._verifier_key], origin=self.origin) for _, note in self._storage.checkpoints()]

    def checkpoint_at(self, size: int) -> Checkpoint | None:
        """The stored checkpoint for exactly `size` entries (verified), or None."""
        note = next((note for s, note in self._storage.checkpoints() if s == size), None)
        return None if note is None else Checkpoint.open(note, [self._verifier_key], origin=self.origin)

    def entry(self, index: int) -> bytes:
        """The entry stored at `index`."""
        size = self.size
        self._check_index(index, size, "index")
        data = self._storage.entry(index)
        if data is None:
            raise LogError(f"entry {index} is missing from storage although the log has size {size}; run audit()")
        return data

    def entries(self, start: int, end: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(index, entry) for start <= index < end (default: the log's size now), read in chunks."""
        end = self.size if end is None else end
        self._check_index(end, self.size + 1, "end")
        self._check_index(start, end + 1, "start")
        expected = start
        for index, data, _ in self._storage.leaves(start, end):
            if index != expected:
                raise LogError(f"entry {expected} is missing from storage although the log has size {end}; run audit()")
            yield index, data
            expected += 1
        if expected != end:
            raise LogError(f"entries {expected}..{end - 1} are missing from storage; run audit()")

    def root_hash(self, size: int | None = None) -> bytes:
        """Root hash of the tree of the first `size` entries (default: the whole log)."""
        size = self.size if size is None else size
        self._check_index(size, self.size + 1, "size")
        return merkle.subtree_root(size, self._get_nodes) if size else EMPTY_ROOT

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """Inclusion proof of entry `index` in the tree of `size` entries (0 <= index < size <= log size)."""
        self._check_index(size, self.size + 1, "size")
        self._check_index(index, size, "index")
        return merkle.inclusion_proof(index, size, self._get_nodes)

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        """Consistency proof from size1 to size2 (0 <= size1 <= size2 <= log size; empty from 0)."""
        self._check_index(size2, self.size + 1, "size2")
        self._check_index(size1, size2 + 1, "size1")
        return merkle.consistency_proof(size1, size2, self._get_nodes)

    @staticmethod
    def _check_index(value: object, bound: int, what: str) -> None:
        if not is_int(value) or not 0 <= value < bound:
            raise LogError(f"{what} must be an integer in [0, {bound}), got {value!r}")

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

    # --- audit -----------------------------------------------------------------------------------

    def audit(self, against: Sequence[Checkpoint] = ()) -> LogAudit:
        """Re-verify the whole stored log from its entries, in one consistent snapshot.

        `against`: checkpoints saved elsewhere (already verified); each must be a prefix of this log.
        """
        problems, published = [], []
        if self._published is not None:  # read before the snapshot: the writer publishes only what it committed
            try:
                cp = read_checkpoint_file(self._published, self._verifier_key, self.origin)
                published = [cp] if cp is not None else []
            except LogError as exc:
                problems.append(str(exc))
        with self._storage.snapshot():
            report = audit_storage(self._storage, self._storage.size(), self.origin, self._verifier_key,
                                   [*against, *published])
        report.problems[:0] = problems
        return report

    # --- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the storage."""
        self._storage.close()

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def audit_storage(
    storage: LogStorage, size: int, origin: str, verifier_key: str, against: Sequence[Checkpoint] = ()
) -> LogAudit:
    """Recompute every leaf hash, stored node and checkpoint root of the log's first `size` entries."""
    report = LogAudit(size)
    problems = report.problems
    stored = storage.size()
    if stored != size:
        problems.append(f"storage holds {stored} leaves but the log has integrated {size}")
    cps = storage.checkpoints()
    want = {s for s, _ in cps if 0 < s <= size} | {cp.size for cp in against if 0 < cp.size <= size}
    roots = {0: EMPTY_ROOT}
    pending: dict[int, list[tuple[int, bytes]]] = defaultdict(list)

    def check(level: int) -> None:
        rows = pending.pop(level, [])
        if not rows:
            return
        have = storage.node_range(level, rows[0][0], rows[-1][0] + 1)
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
    for idx, data, stored_hash in storage.leaves(0, size):
        if idx != expected:
            problems.append(f"{leaf_span(expected, idx)} missing; the tree above cannot be recomputed")
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
        if expected < size:
            problems.append(f"{leaf_span(expected, size)} missing")
    report.leaves_checked = expected
    for level in list(pending):
        check(level)
    for level, count in storage.node_count().items():
        want_count = (size >> level) if level >= STORED_MIN_LEVEL else 0
        if count != want_count:
            problems.append(f"level {level} stores {count} nodes, a tree of size {size} has {want_count} stored there")
    for s, note in cps:
        report.checkpoints_checked += 1
        try:
            cp = Checkpoint.open(note, [verifier_key], origin=origin)
        except NoteError as exc:
            problems.append(f"checkpoint stored for size {s} does not verify: {exc}")
            continue
        if cp.size != s:
            problems.append(f"checkpoint stored for size {s} says size {cp.size}")
        elif s > size:
            problems.append(f"checkpoint for size {s} is beyond the log's size {size}")
        elif s in roots and cp.root_hash != roots[s]:
            problems.append(f"checkpoint for size {s} has root {cp.root_hash.hex()}, the entries give {roots[s].hex()}")
    for cp in against:
        report.checkpoints_checked += 1
        if cp.size > size:
            problems.append(f"the log holds {size} entries but a checkpoint it must extend is for size {cp.size}: "
                            f"the log was rolled back or truncated")
        elif cp.size in roots and cp.root_hash != roots[cp.size]:
            problems.append(f"a checkpoint it must extend has root {cp.root_hash.hex()} for size {cp.size}, "
                            f"the entries give {roots[cp.size].hex()}: the log is not an extension of it")
    return report
