"""The vector index over memory states: a small interface and its embedded LanceDB backend.

The interface (`VectorStore`) is what the rest of Fieldprint sees: add rows, top-k search with
filters (session, type, promotable only), a version number, rollback to an earlier version, and an
optional ANN index. Nothing LanceDB-specific crosses it, so a pgvector backend can slot in.

A row's `promotable` flag is an index-side filter kept in step by the Pacemaker; it is a hint for
narrowing the search, never authority: the promotion gate re-decides every state it is asked about.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol, runtime_checkable

import numpy as np

from fieldprint.canon import check_label, parse_digest
from fieldprint.errors import EntryError, StateError

FILTER_COLUMNS = ("session", "state_type", "promotable")
_NORM_TOLERANCE = 1e-3  # rows must be unit vectors (cosine and dot product then agree)


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result: the state, its cosine similarity to the query, and its filter columns."""

    state_id: str
    score: float
    session: str
    state_type: str
    promotable: bool


@runtime_checkable
class VectorStore(Protocol):
    """What any vector backend provides; versions are increasing integers and every write makes one."""

    dim: int

    def add(self, state_ids: Sequence[str], vectors: np.ndarray, sessions: Sequence[str],
            state_types: Sequence[str], promotable: Sequence[bool]) -> int:
        """Append rows (state ids must be new); return the version that contains them."""
        ...

    def search(self, query: np.ndarray, k: int, *, session: str | None = None, state_type: str | None = None,
               promotable_only: bool = False, exact: bool = False) -> list[Hit]:
        """The k rows nearest to `query` (cosine) that pass the filters, best first."""
        ...

    def set_promotable(self, state_ids: Sequence[str], promotable: bool) -> int:
        """Set the promotable flag of existing rows; return the new version."""
        ...

    def version(self) -> int:
        """The current version."""
        ...

    def rollback(self, version: int) -> int:
        """Make the contents those of `version` again; return the version that now holds them."""
        ...

    def build_index(self) -> None:
        """Build (or rebuild) an approximate nearest-neighbour index over the vectors."""
        ...

    def compact(self) -> None:
        """Merge many small appends (and fold new rows into the ANN index); keeps rollback history."""
        ...

    def __len__(self) -> int: ...


def _not_one_string(column, name: str) -> None:
    # A string is a sequence too: iterated, its characters would be refused one by one as odd ids.
    if isinstance(column, (str, bytes)):
        raise StateError(f"{name} must be a list with one item per row, not one string ({column[:80]!r})")


def checked_state_ids(state_ids: Sequence[str]) -> list[str]:
    """The ids as a list, each a tagged digest, or StateError naming the first that is not."""
    _not_one_string(state_ids, "state_ids")
    ids = list(state_ids)
    try:
        for sid in ids:
            parse_digest(sid)
    except EntryError as e:
        raise StateError(str(e)) from None
    return ids


def check_rows(dim: int, state_ids: Sequence[str], vectors: np.ndarray, sessions: Sequence[str],
               state_types: Sequence[str], promotable: Sequence[bool]) -> np.ndarray:
    """Validate a batch of rows for any backend; return the vectors as contiguous float32."""
    for name, column in (("state_ids", state_ids), ("sessions", sessions), ("state_types", state_types)):
        _not_one_string(column, name)
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise StateError(f"vectors must have shape (n, {dim}), got {vectors.shape}")
    n = vectors.shape[0]
    if not (len(state_ids) == len(sessions) == len(state_types) == len(promotable) == n):
        raise StateError(
            f"row columns disagree in length: {len(state_ids)} ids, {n} vectors, {len(sessions)} sessions, "
            f"{len(state_types)} types, {len(promotable)} promotable flags"
        )
    if len(set(state_ids)) != n:
        raise StateError("state ids in one add() must be unique")
    try:
        for sid in state_ids:
            parse_digest(sid)
        for s in sessions:
            check_label(s, "session")
        for t in state_types:
            check_label(t, "state type")
    except EntryError as e:
        raise StateError(str(e)) from None
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise StateError("vectors contain NaN or Inf")
    norms = np.linalg.norm(vectors, axis=1)
    if n and np.abs(norms - 1.0).max() > _NORM_TOLERANCE:
        raise StateError("vectors must be unit-norm (normalise embeddings before adding)")
    return vectors


@contextmanager
def _lance(path: str, what: str) -> Iterator[None]:
    # LanceDB and pyarrow fail with OSError, RuntimeError or ValueError (a read-only folder shows up as
    # all three, depending on the call); callers get one StateError that names the store and the cause.
    try:
        yield
    except (OSError, RuntimeError, ValueError) as e:
        read_only = (isinstance(e, OSError) and e.errno == errno.EROFS) or "Read-only file system" in str(e)
        hint = ("the folder is read-only: open the vector store where it can be written (an existing store "
                "can still be searched)" if read_only else "check the folder and that no other program changed it")
        raise StateError(f"the vector store at {path} could not {what} ({type(e).__name__}: {e}); {hint}") from e


def _quote(value: str) -> str:
    # Values reach here already validated as labels or digests (no quotes); doubling is belt and braces.
    return "'" + value.replace("'", "''") + "'"


class LanceVectorStore:
    """The embedded default: one LanceDB folder, one table; LanceDB's table versions give rollback."""

    TABLE = "states"

    def __init__(self, path: str | os.PathLike, dim: int = 384, keep_versions: timedelta = timedelta(days=3650),
                 nprobes: int | None = None, refine_factor: int | None = None) -> None:
        self.dim = dim
        # ANN tuning, LanceDB's own knobs (None = LanceDB's defaults): partitions probed, and how many
        # times k candidates are re-ranked with the full vectors.
        self.nprobes, self.refine_factor = nprobes, refine_factor
        self.keep_versions = keep_versions  # compact() prunes versions older than this; rollback needs them
        self.path = os.fspath(path)
        with _lance(self.path, "open"):
            self._open()

    def _open(self) -> None:
        import lancedb
        import pyarrow as pa

        self._db = lancedb.connect(self.path)
        self._schema = pa.schema([
            pa.field("state_id", pa.string(), nullable=False),
            pa.field("session", pa.string(), nullable=False),
            pa.field("state_type", pa.string(), nullable=False),
            pa.field("promotable", pa.bool_(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), self.dim), nullable=False),
        ])
        if self.TABLE in self._db.list_tables().tables:
            self._table = self._db.open_table(self.TABLE)
            found = self._table.schema.field("vector").type.list_size
            if found != self.dim:
                raise StateError(f"vector store at {self.path} holds {found}-d vectors, not {self.dim}-d; "
                                 f"use a matching embedder")
        else:
            self._table = self._db.create_table(self.TABLE, schema=self._schema)
        self._ensure_filter_indexes()

    def _ensure_filter_indexes(self) -> None:
        # Bitmap indexes on the filter columns: without them a filtered search scans every row first
        # (a session filter over 100k rows: ~200 ms without, ~15 ms with, on the 2-core CI machine).
        # Rows appended later are folded in by compact(); until then they are scanned, so results stay exact.
        from lancedb.index import Bitmap

        have = {tuple(ix.columns) for ix in self._table.list_indices()}
        for column in FILTER_COLUMNS:
            if (column,) not in have:
                self._table.create_index(column, config=Bitmap(), replace=True)

    def add(self, state_ids: Sequence[str], vectors: np.ndarray, sessions: Sequence[str],
            state_types: Sequence[str], promotable: Sequence[bool]) -> int:
        """Append rows (state ids must be new; the Pacemaker guarantees it); return the new version."""
        import pyarrow as pa

        vectors = check_rows(self.dim, state_ids, vectors, sessions, state_types, promotable)
        if len(state_ids) == 0:
            return self.version()
        flat = pa.array(vectors.reshape(-1), type=pa.float32())
        batch = pa.Table.from_arrays(
            [pa.array(list(state_ids), pa.string()), pa.array(list(sessions), pa.string()),
             pa.array(list(state_types), pa.string()), pa.array([bool(p) for p in promotable], pa.bool_()),
             pa.FixedSizeListArray.from_arrays(flat, self.dim)],
            schema=self._schema,
        )
        with _lance(self.path, "add rows"):
            self._table.add(batch)
        return self.version()

    def search(self, query: np.ndarray, k: int, *, session: str | None = None, state_type: str | None = None,
               promotable_only: bool = False, exact: bool = False) -> list[Hit]:
        """The k rows nearest to `query` (cosine) that pass the filters, best first."""
        query = np.asarray(query, dtype=np.float32)
        if query.shape != (self.dim,) or not np.isfinite(query).all():
            raise StateError(f"query must be a finite vector of shape ({self.dim},), got {query.shape}")
        if not isinstance(k, int) or k < 1:
            raise StateError(f"k must be a positive integer, got {k!r}")
        where = []
        try:
            if session is not None:
                where.append(f"session = {_quote(check_label(session, 'session'))}")
            if state_type is not None:
                where.append(f"state_type = {_quote(check_label(state_type, 'state type'))}")
        except EntryError as e:
            raise StateError(str(e)) from None
        if promotable_only:
            where.append("promotable = true")
        q = self._table.search(query, vector_column_name="vector").distance_type("cosine").limit(k)
        q = q.select(["state_id", "session", "state_type", "promotable", "_distance"])
        if where:
            q = q.where(" AND ".join(where), prefilter=True)
        if exact:
            q = q.bypass_vector_index()
        else:
            if self.nprobes:
                q = q.nprobes(self.nprobes)
            if self.refine_factor:
                q = q.refine_factor(self.refine_factor)
        with _lance(self.path, "search"):
            rows = q.to_arrow().to_pylist()
        return [Hit(r["state_id"], 1.0 - float(r["_distance"]), r["session"], r["state_type"], bool(r["promotable"]))
                for r in rows]

    def set_promotable(self, state_ids: Sequence[str], promotable: bool) -> int:
        """Set the promotable flag of existing rows; return the new version."""
        ids = checked_state_ids(state_ids)
        if ids:
            with _lance(self.path, "update the promotable flag"):
                self._table.update(where=f"state_id IN ({', '.join(_quote(s) for s in ids)})",
                                   values={"promotable": bool(promotable)})
        return self.version()

    def version(self) -> int:
        """The table's current version number."""
        return int(self._table.version)

    def rollback(self, version: int) -> int:
        """Restore the table to `version` (LanceDB writes that as a new version); return it."""
        known = {int(v["version"]) for v in self._table.list_versions()}
        if version not in known:
            raise StateError(f"vector store has no version {version}; known versions are {min(known)}..{max(known)}")
        with _lance(self.path, f"roll back to version {version}"):
            self._table.restore(version)
        return self.version()

    def build_index(self, num_partitions: int | None = None, num_sub_vectors: int | None = None) -> None:
        """Build an IVF-PQ index over the vectors (cosine); searches then use it unless exact=True."""
        n = len(self)
        if n < 256:
            raise StateError(f"an ANN index needs at least 256 rows to train, the store has {n}; search exactly instead")
        parts = num_partitions or max(1, round(n ** 0.5))
        from lancedb.index import IvfPq

        config = IvfPq(distance_type="cosine", num_partitions=parts, num_sub_vectors=num_sub_vectors or self.dim // 8)
        with _lance(self.path, "build the ANN index"):
            self._table.create_index("vector", config=config, replace=True)

    def compact(self) -> None:
        """Merge small fragments and update the index; versions newer than `keep_versions` are kept."""
        # Each add is a fragment and a flat scan visits every one: 2,000 one-row appends made an exact
        # search of 2,000 rows ~35x slower on the 2-core CI machine until compacted.
        with _lance(self.path, "compact"):
            self._table.optimize(cleanup_older_than=self.keep_versions)

    def __len__(self) -> int:
        return int(self._table.count_rows())
