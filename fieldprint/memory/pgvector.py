"""The vector index on PostgreSQL + pgvector: the `VectorStore` interface for many engines sharing one database.

Rows carry the version interval in which they are live (`added_in <= v < removed_in`), so the
contents of any version are one query away and history is never rewritten:

- `add` inserts rows live from a new version; a state id is live in one row only (a partial unique
  index): adding a live state again replaces its row (the id is a content address, so it is the
  same state; an engine killed between its vector add and its state commit leaves such a row);
- `set_promotable` ends the rows whose flag changes and inserts copies with the new flag;
- `rollback(v)` is a new version whose contents are those of `v`: it ends the rows added after `v`
  and re-inserts the rows that `v` held and that were ended since. Its cost follows what changed
  since `v`, not the size of the table.

Writers take the version counter's row lock, so versions are made one at a time across all engines
and a version's contents never change once it is committed; a writer that stops while holding it (a
stopped or hung process) loses its transaction after HEAD_IDLE_S between statements, and the others
go on (an add copies its rows in before it takes the lock, so no COPY runs under it). Search runs
on an HNSW index (cosine) over the live rows, with pgvector's iterative scan so that filters
(session, type, promotable) still return k rows when they are selective; `exact=True` bypasses the
index.

A rollback makes the whole store look like an earlier version, including other engines' writes made
since; `revert(v)` undoes only what version `v` did (what a writer whose transaction failed wants).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import numpy as np

from fieldprint.canon import check_label
from fieldprint.errors import EntryError, StateError
from fieldprint.memory.pg_store import DEFAULT_SCHEMA, PgConnection, psycopg, sql
from fieldprint.memory.vectors import Hit, check_rows, checked_state_ids
from fieldprint.postgres import execute_simple, redact, require_psycopg

# How long a writer holding the version counter's row lock may sit between two statements before the
# server ends its transaction (PgConnection.idle_bound): the writes under it are a few statements
# with nothing else in between.
HEAD_IDLE_S = 10.0


def _migrations(dim: int) -> tuple[str, ...]:
    # The index is created with the table: pgvector maintains HNSW on every insert, so there is no
    # unindexed tail to fold in later (what compact() does for LanceDB).
    return (f"""
CREATE TABLE vector_head (one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one), version BIGINT NOT NULL);
INSERT INTO vector_head (version) VALUES (0);
CREATE TABLE vector_versions (version BIGINT PRIMARY KEY, op TEXT NOT NULL, made_at TIMESTAMPTZ NOT NULL DEFAULT now());
INSERT INTO vector_versions (version, op) VALUES (0, 'create');
CREATE TABLE vectors (
    row_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    state_id TEXT NOT NULL, session TEXT NOT NULL, state_type TEXT NOT NULL, promotable BOOLEAN NOT NULL,
    embedding vector({dim}) NOT NULL, added_in BIGINT NOT NULL, removed_in BIGINT
);
CREATE UNIQUE INDEX vectors_live_state ON vectors (state_id) WHERE removed_in IS NULL;
CREATE INDEX vectors_live_session ON vectors (session) WHERE removed_in IS NULL;
CREATE INDEX vectors_live_type ON vectors (state_type) WHERE removed_in IS NULL;
CREATE INDEX vectors_added ON vectors (added_in);
CREATE INDEX vectors_removed ON vectors (removed_in) WHERE removed_in IS NOT NULL;
CREATE INDEX vectors_hnsw ON vectors USING hnsw (embedding vector_cosine_ops) WHERE removed_in IS NULL;
""",)


_ROW_COLUMNS = "state_id, session, state_type, promotable, embedding, added_in"


def _ensure_extension(db: psycopg.Connection, schema: str, name: str) -> None:
    # pgvector lives in one schema per database (public unless an administrator chose another); every
    # memory's schema finds its type through the search path.
    found = db.execute("SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
                       "WHERE e.extname = 'vector'").fetchone()
    if found is None:
        try:
            with db.transaction():  # IF NOT EXISTS alone races: two engines opening at once both try to create
                db.execute("SELECT pg_advisory_xact_lock(hashtextextended('fieldprint:pgvector', 0))")
                db.execute("CREATE EXTENSION IF NOT EXISTS vector SCHEMA public")
        except psycopg.Error as e:
            raise StateError(
                f"the vector store at {name} needs the pgvector extension and could not create it "
                f"({type(e).__name__}: {e.diag.message_primary or e}); install pgvector on the server "
                f"(Debian: postgresql-NN-pgvector) and have a superuser run CREATE EXTENSION vector in that database"
            ) from None
        found = ("public",)
    db.execute(sql.SQL("SET search_path TO {}, public, {}").format(sql.Identifier(schema), sql.Identifier(found[0])))


class PgVectorStore:
    """Vectors in PostgreSQL with pgvector: HNSW (cosine), filtered search, versions and rollback in SQL."""

    def __init__(self, url: str, dim: int = 384, schema: str = DEFAULT_SCHEMA, ef_search: int = 100,
                 m: int = 16, ef_construction: int = 64, build_memory_mb: int = 1024) -> None:
        if not isinstance(dim, int) or not 1 <= dim <= 16000:
            raise StateError(f"dim must be an integer from 1 to 16000 (pgvector's limit), got {dim!r}")
        self.dim = dim
        # HNSW knobs, pgvector's own: candidates kept per search (recall vs latency), and the graph's
        # degree, build width and build memory (used when build_index() rebuilds the index).
        self.ef_search, self.m, self.ef_construction = ef_search, m, ef_construction
        self.build_memory_mb = build_memory_mb
        require_psycopg(StateError)
        self._schema, self._name = schema, redact(url)  # what _on_connect needs before _pg exists
        self._staged_on = None  # the connection whose session has add()'s temporary table
        self._pg = PgConnection(url, schema, "vector store", on_connect=self._on_connect)
        self.path = self._pg.name
        try:
            self._pg.migrate("vectors", _migrations(dim))
            with self._pg.sql("read its vector size") as db:
                found = db.execute("SELECT atttypmod FROM pg_attribute WHERE attrelid = 'vectors'::regclass "
                                   "AND attname = 'embedding'").fetchone()[0]
            if found != dim:
                raise StateError(f"vector store at {self.path} (schema {schema}) holds {found}-d vectors, not "
                                 f"{dim}-d; use a matching embedder or another schema")
        except BaseException:
            self._pg.close()
            raise

    def _on_connect(self, db: psycopg.Connection) -> None:
        try:
            from pgvector.psycopg import register_vector
        except ImportError:
            raise StateError("the pgvector backend needs the pgvector package (psycopg's adapter for the vector "
                             "type): pip install 'fieldprint[postgres]'") from None
        _ensure_extension(db, self._schema, self._name)
        register_vector(db)
        # strict_order: iterative scans keep going until k rows pass the filters, best first.
        db.execute("SET hnsw.iterative_scan = strict_order")

    def _lock_head(self, db: psycopg.Connection) -> int:
        """The current version, its row locked until the transaction ends (bounded: HEAD_IDLE_S)."""
        return db.execute(f"SELECT version, {PgConnection.idle_bound(HEAD_IDLE_S)} FROM vector_head "
                          "FOR UPDATE").fetchone()[0]

    def _next_version(self, db: psycopg.Connection, op: str) -> int:
        # The head row's lock is held to commit: one writer at a time makes a version, in order; the
        # transaction's idle bound (HEAD_IDLE_S) is set by the same statement.
        return db.execute(f"WITH v AS (UPDATE vector_head SET version = version + 1 RETURNING version) "
                          f"INSERT INTO vector_versions (version, op) SELECT version, %s FROM v "
                          f"RETURNING version, {PgConnection.idle_bound(HEAD_IDLE_S)}", (op,)).fetchone()[0]

    def add(self, state_ids: Sequence[str], vectors: np.ndarray, sessions: Sequence[str],
            state_types: Sequence[str], promotable: Sequence[bool]) -> int:
        """Append rows; a state already live is re-indexed (its row replaced); return the version that holds them."""
        vectors = check_rows(self.dim, state_ids, vectors, sessions, state_types, promotable)
        if len(state_ids) == 0:
            return self.version()
        with self._pg.sql(f"add {len(state_ids)} rows") as db:
            if self._staged_on is not db:
                db.execute(f"CREATE TEMP TABLE IF NOT EXISTS vector_stage (state_id TEXT, session TEXT, "
                           f"state_type TEXT, promotable BOOLEAN, embedding vector({self.dim})) ON COMMIT DELETE ROWS")
                self._staged_on = db
            with db.transaction():
                # The rows go to a temporary table first, before the version counter is locked: a writer
                # stopped in the middle of a COPY leaves the server waiting for the rest with no timeout
                # armed, so under the lock only short statements run, which the idle bound covers.
                with db.cursor() as cur, cur.copy("COPY pg_temp.vector_stage FROM STDIN WITH (FORMAT BINARY)") as copy:
                    copy.set_types(["text", "text", "text", "bool", "vector"])
                    for row in zip(state_ids, sessions, state_types, promotable, vectors, strict=True):
                        copy.write_row((*row[:3], bool(row[3]), row[4]))
                version = self._next_version(db, "add")
                # A state id is a content address: a live row with it is the same state's row. On one
                # engine that only happens by mistake; among many it is what an engine killed between its
                # vector add and its state commit leaves behind, and the state's next add must not be
                # blocked by it.
                db.execute("UPDATE vectors SET removed_in = %s WHERE removed_in IS NULL AND state_id IN "
                           "(SELECT state_id FROM pg_temp.vector_stage)", (version,))
                db.execute(f"INSERT INTO vectors ({_ROW_COLUMNS}) SELECT state_id, session, state_type, promotable, "
                           f"embedding, %s FROM pg_temp.vector_stage", (version,))
        return version

    def search(self, query: np.ndarray, k: int, *, session: str | None = None, state_type: str | None = None,
               promotable_only: bool = False, exact: bool = False) -> list[Hit]:
        """The k rows nearest to `query` (cosine) that pass the filters, best first."""
        query = np.asarray(query, dtype=np.float32)
        if query.shape != (self.dim,) or not np.isfinite(query).all():
            raise StateError(f"query must be a finite vector of shape ({self.dim},), got {query.shape}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise StateError(f"k must be a positive integer, got {k!r}")
        where, params = ["removed_in IS NULL"], [query]
        try:
            if session is not None:
                where.append("session = %s")
                params.append(check_label(session, "session"))
            if state_type is not None:
                where.append("state_type = %s")
                params.append(check_label(state_type, "state type"))
        except EntryError as e:
            raise StateError(str(e)) from None
        if promotable_only:
            where.append("promotable")
        # The distance is computed once in the select list; ORDER BY on the same expression is what
        # lets the planner walk the HNSW index.
        query_sql = (f"SELECT state_id, embedding <=> %s AS distance, session, state_type, promotable FROM vectors "
                     f"WHERE {' AND '.join(where)} ORDER BY distance LIMIT %s")
        params.append(k)
        with self._pg.sql("search") as db, db.transaction():
            if exact:
                db.execute("SET LOCAL enable_indexscan = off")  # bitmap scans on the filters stay available
            else:
                db.execute(f"SET LOCAL hnsw.ef_search = {int(self.ef_search)}")
            rows = db.execute(query_sql, params).fetchall()
        return [Hit(sid, 1.0 - float(d), s, t, bool(p)) for sid, d, s, t, p in rows]

    def set_promotable(self, state_ids: Sequence[str], promotable: bool) -> int:
        """Set the promotable flag of live rows (a new version even if none changes); return it."""
        ids = checked_state_ids(state_ids)
        if not ids:
            return self.version()
        with self._pg.sql("update the promotable flag") as db, db.transaction():
            version = self._next_version(db, "set_promotable")
            # Literals: many ids make a large statement, and it runs under the version lock (execute_simple).
            execute_simple(db, "WITH ended AS (UPDATE vectors SET removed_in = {} WHERE removed_in IS NULL "
                                 "AND state_id = ANY({}::text[]) AND promotable <> {} RETURNING *) "
                                 f"INSERT INTO vectors ({_ROW_COLUMNS}) SELECT state_id, session, state_type, {{}}, "
                                 "embedding, {} FROM ended", version, ids, bool(promotable), bool(promotable), version)
        return version

    def version(self) -> int:
        """The current version."""
        with self._pg.sql("read its version") as db:
            return db.execute("SELECT version FROM vector_head").fetchone()[0]

    def rollback(self, version: int) -> int:
        """Make the contents those of `version` again, as a new version (history is kept); return it."""
        with self._pg.sql(f"roll back to version {version}") as db, db.transaction():
            head = self._lock_head(db)
            self._check_version(version, head)
            new = self._next_version(db, f"rollback to {version}")
            db.execute("UPDATE vectors SET removed_in = %s WHERE removed_in IS NULL AND added_in > %s", (new, version))
            db.execute(f"INSERT INTO vectors ({_ROW_COLUMNS}) SELECT state_id, session, state_type, promotable, "
                       f"embedding, %s FROM vectors WHERE added_in <= %s AND removed_in > %s AND removed_in < %s",
                       (new, version, version, new))
        return new

    def revert(self, version: int) -> int:
        """Undo only what `version` did (its rows ended, the rows it ended live again), as a new version."""
        with self._pg.sql(f"revert version {version}") as db, db.transaction():
            head = self._lock_head(db)
            self._check_version(version, head)
            new = self._next_version(db, f"revert {version}")
            db.execute("UPDATE vectors SET removed_in = %s WHERE removed_in IS NULL AND added_in = %s", (new, version))
            # Rows that `version` ended come back, unless a later version made their state live again.
            db.execute(f"INSERT INTO vectors ({_ROW_COLUMNS}) SELECT o.state_id, o.session, o.state_type, o.promotable, "
                       f"o.embedding, %s FROM vectors o WHERE o.removed_in = %s AND NOT EXISTS (SELECT 1 FROM vectors l "
                       f"WHERE l.state_id = o.state_id AND l.removed_in IS NULL)", (new, version))
        return new

    def sweep(self, stored: Callable[[list[str]], Collection[str]], older_than_s: float = 600.0) -> int:
        """End the live rows whose state `stored` does not know, made over `older_than_s` ago; return how many.

        An engine killed between its vector add and its state commit leaves such rows; searches skip
        them, this removes them (as one new version, so it can be reverted). The age guard keeps the
        rows of adds still in flight on other engines. `stored` is e.g. PostgresStateStore.stored.
        """
        with self._pg.sql("list old live rows") as db:
            rows = db.execute("SELECT v.state_id FROM vectors v JOIN vector_versions w ON w.version = v.added_in "
                              "WHERE v.removed_in IS NULL AND w.made_at < now() - make_interval(secs => %s)",
                              (float(older_than_s),)).fetchall()
        candidates = [r[0] for r in rows]
        unstored = []
        for lo in range(0, len(candidates), 1000):
            chunk = candidates[lo:lo + 1000]
            unstored += sorted(set(chunk) - set(stored(chunk)))
        if unstored:
            with self._pg.sql("sweep unstored rows") as db, db.transaction():
                version = self._next_version(db, "sweep")
                execute_simple(db, "UPDATE vectors SET removed_in = {} WHERE removed_in IS NULL AND "
                                     "state_id = ANY({}::text[])", version, unstored)
        return len(unstored)

    def _check_version(self, version: int, head: int) -> None:
        if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= head:
            raise StateError(f"vector store has no version {version!r}; known versions are 0..{head}")

    def build_index(self) -> None:
        """(Re)build the HNSW index with this store's m and ef_construction (after a bulk load, or to retune)."""
        with self._pg.sql("build the HNSW index") as db:
            # CONCURRENTLY: the other engines keep searching and adding while the graph is built (a plain
            # CREATE INDEX would lock them out for minutes); the new index then replaces the old one in a
            # short transaction. pgvector builds fast only while the graph fits in maintenance_work_mem.
            db.execute(f"SET maintenance_work_mem = '{int(self.build_memory_mb)}MB'")
            try:
                db.execute("DROP INDEX IF EXISTS vectors_hnsw_new")  # what an interrupted build left, invalid
                db.execute(f"CREATE INDEX CONCURRENTLY vectors_hnsw_new ON vectors USING hnsw "
                           f"(embedding vector_cosine_ops) WITH (m = {int(self.m)}, "
                           f"ef_construction = {int(self.ef_construction)}) WHERE removed_in IS NULL")
                with db.transaction():
                    db.execute("DROP INDEX IF EXISTS vectors_hnsw")
                    db.execute("ALTER INDEX vectors_hnsw_new RENAME TO vectors_hnsw")
            finally:
                if not db.broken:
                    db.execute("RESET maintenance_work_mem")

    def drop_index(self) -> None:
        """Drop the HNSW index before a bulk load (inserts then skip the graph); build_index() makes it again."""
        with self._pg.sql("drop the HNSW index") as db:
            db.execute("DROP INDEX IF EXISTS vectors_hnsw")

    def compact(self) -> None:
        """Refresh the planner's statistics (filtered searches pick their plan from them); keeps all history."""
        with self._pg.sql("analyze its table") as db:
            db.execute("ANALYZE vectors")

    def __len__(self) -> int:
        with self._pg.sql("count rows") as db:
            return db.execute("SELECT count(*) FROM vectors WHERE removed_in IS NULL").fetchone()[0]

    def close(self) -> None:
        """Close the connection; further calls raise StateError."""
        self._pg.close()
