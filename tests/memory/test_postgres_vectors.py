"""The vector store tests again, on pgvector; then what a shared, versioned store must add.

The interface tests of test_vectors.py run unchanged against PgVectorStore (a fresh schema each).
Beyond them: random sequences of adds, flag changes, rollbacks and reverts checked against a model
of what each version holds; filtered HNSW searches that still return k rows when the filter is
selective; and two engines writing one store.
"""

from __future__ import annotations

import numpy as np
import pytest
import test_vectors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pg import pg_dsn, seconds_blocked, stopped_writer  # noqa: F401,I001  (a fresh database per module)
from test_postgres_memory import Schemas, require_pgvector
from test_vectors import (  # noqa: F401  (collected here, against pgvector)
    sid,
    test_bad_rows_are_refused_and_nothing_is_stored,
    test_compact_keeps_rows_results_and_rollback_history,
    test_lance_store_implements_the_interface,
    test_search_finds_the_nearest_rows_with_filters,
    test_versions_and_rollback,
    unit_rows,
)

from fieldprint.errors import StateError
from fieldprint.memory.pgvector import PgVectorStore
from fieldprint.memory.vectors import VectorStore


@pytest.fixture(scope="module")
def url(pg_dsn):  # noqa: F811
    return require_pgvector(pg_dsn)


@pytest.fixture
def schemas(url):
    s = Schemas(url)
    yield s
    s.drop_all()


@pytest.fixture
def store(schemas, monkeypatch):
    schema = schemas.new()
    # test_vectors reopens its store by path; here that is the same schema of the same database.
    monkeypatch.setattr(test_vectors, "LanceVectorStore", lambda path: PgVectorStore(schemas.url, schema=schema))
    s = PgVectorStore(schemas.url, schema=schema)
    yield s
    s.close()


def test_the_store_is_a_vector_store(store):
    assert isinstance(store, PgVectorStore) and isinstance(store, VectorStore)


def test_filtered_hnsw_search_returns_k_rows_and_agrees_with_exact(store):
    n = 3000
    v = unit_rows(n, seed=3)
    sessions = [f"s{i % 100}" for i in range(n)]  # a session filter keeps 1% of the rows
    store.drop_index()  # a bulk load: one build beats 3,000 graph inserts
    store.add([sid(i) for i in range(n)], v, sessions, ["belief" if i % 7 else "summary" for i in range(n)],
              [i % 3 == 0 for i in range(n)])
    store.build_index()
    store.compact()
    queries = unit_rows(20, seed=4)
    recall = []
    for i, q in enumerate(queries):
        for kw in ({}, {"session": f"s{i}"}, {"promotable_only": True}, {"state_type": "summary", "session": f"s{i}"}):
            ann, exact = store.search(q, 10, **kw), store.search(q, 10, exact=True, **kw)
            # Iterative scans keep walking the graph until k rows pass the filter.
            assert len(ann) == len(exact) and [h.score for h in ann] == sorted((h.score for h in ann), reverse=True)
            recall.append(len({h.state_id for h in ann} & {h.state_id for h in exact}) / max(1, len(exact)))
            assert all(h.session == kw.get("session", h.session) and (h.promotable or not kw.get("promotable_only"))
                       for h in ann)
    assert np.mean(recall) >= 0.9, np.mean(recall)
    assert store.search(v[123], 1)[0].state_id == sid(123)


def test_a_bulk_load_without_the_index_then_building_it(store):
    v = unit_rows(500, seed=5)
    store.drop_index()
    store.add([sid(i) for i in range(500)], v, ["s"] * 500, ["belief"] * 500, [True] * 500)
    assert store.search(v[7], 1)[0].state_id == sid(7)  # exact meanwhile
    store.build_index()
    assert store.search(v[7], 1)[0].state_id == sid(7)


def test_two_engines_share_one_store(schemas):
    schema = schemas.new()
    a, b = PgVectorStore(schemas.url, schema=schema), PgVectorStore(schemas.url, schema=schema)
    v = unit_rows(4, seed=6)
    va = a.add([sid(0), sid(1)], v[:2], ["s"] * 2, ["belief"] * 2, [False] * 2)
    vb = b.add([sid(2)], v[2:3], ["s"], ["belief"], [False])
    assert vb > va and a.version() == b.version() == vb and len(a) == 3
    # Reverting a's add leaves b's row; a rollback to before it would not.
    a.revert(va)
    assert {h.state_id for h in b.search(v[0], 5)} == {sid(2)}
    a.rollback(0)
    assert len(b) == 0
    # Adding a live state again re-indexes it (one live row per state id); reverting that add brings back the old row.
    a.add([sid(1)], v[1:2], ["s"], ["belief"], [False])
    again = b.add([sid(1), sid(3)], v[[1, 3]], ["s"] * 2, ["belief"] * 2, [True] * 2)
    assert len(a) == 2 and [h.promotable for h in a.search(v[1], 1)] == [True]
    b.revert(again)
    assert len(a) == 1 and [h.promotable for h in a.search(v[1], 1)] == [False]
    a.close()
    b.close()


def test_a_writer_stopped_holding_the_version_lock_holds_the_others_up_for_seconds_not_forever(schemas):
    """A writer SIGSTOPped between two statements of an add, the version counter locked: after
    HEAD_IDLE_S (1 s in that process) the server ends its transaction, and another engine's add goes
    through, as version 1: the stopped writer's version was rolled back with everything else it did."""
    schema = schemas.new()
    a = PgVectorStore(schemas.url, schema=schema)
    code = f"""
import os, signal
from fieldprint.memory import pgvector
pgvector.HEAD_IDLE_S = 1.0
s = pgvector.PgVectorStore({schemas.url!r}, schema={schema!r})
with s._pg.sql("hold") as db, db.transaction():
    s._next_version(db, "add")
    print("stopping", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
"""
    with stopped_writer(code):
        waited, version = seconds_blocked(lambda: a.add([sid(1)], unit_rows(1), ["s"], ["belief"], [False]), 20)
    assert 0.3 < waited < 10 and version == 1 and len(a) == 1
    a.close()


def test_a_writer_stopped_while_it_sends_its_rows_holds_no_lock(schemas):
    """A writer SIGSTOPped in the middle of sending an add's rows (a COPY, where the server waits with
    no timeout armed): the others' adds go through at once, because the rows go in before the
    version counter is locked."""
    schema = schemas.new()
    a = PgVectorStore(schemas.url, schema=schema)
    code = f"""
import os, signal, psycopg
from fieldprint.memory import pgvector
def stop(self, row):
    print("stopping", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
psycopg.Copy.write_row = stop
s = pgvector.PgVectorStore({schemas.url!r}, schema={schema!r})
s.add(["blake3:" + "1" * 64], {unit_rows(1, seed=3).tolist()!r}, ["s"], ["belief"], [False])
"""
    with stopped_writer(code):
        waited, version = seconds_blocked(lambda: a.add([sid(2)], unit_rows(1), ["s"], ["belief"], [False]), 20)
    assert waited < 5 and version == 1 and len(a) == 1
    a.close()


def test_versions_are_checked(store):
    with pytest.raises(StateError, match="no version 1; known versions are 0..0"):
        store.revert(1)
    for bad in (-1, True, 1.0):
        with pytest.raises(StateError, match="no version"):
            store.rollback(bad)
    with pytest.raises(StateError, match="dim"):
        PgVectorStore("postgresql://nobody@127.0.0.1:1/x", dim=0)


# --- versions against a model --------------------------------------------------------------------------------------

N_IDS = 6
OPS = st.lists(st.one_of(
    st.tuples(st.just("add"), st.sets(st.integers(0, N_IDS - 1), min_size=1, max_size=3), st.booleans()),
    st.tuples(st.just("flag"), st.sets(st.integers(0, N_IDS - 1), min_size=1, max_size=3), st.booleans()),
    st.tuples(st.just("rollback"), st.integers(0, 30)),
    st.tuples(st.just("revert"), st.integers(0, 30)),
), min_size=1, max_size=12)


class VersionModel:
    """What each version holds: state -> (row value, the version its row was made in)."""

    def __init__(self) -> None:
        self.at = [{}]  # version -> contents

    def make(self, contents: dict) -> int:
        self.at.append(contents)
        return len(self.at) - 1

    def add(self, ids, promotable):
        now = dict(self.at[-1])
        new = len(self.at)
        for i in ids:
            now[i] = ((f"s{i % 2}", promotable), new)
        return self.make(now)

    def flag(self, ids, promotable):
        now, new = dict(self.at[-1]), len(self.at)
        for i in ids:
            if i in now and now[i][0][1] != promotable:
                now[i] = ((now[i][0][0], promotable), new)
        return self.make(now)

    def rollback(self, v):
        now, new = self.at[-1], len(self.at)
        return self.make({i: row if now.get(i) == row else (row[0], new) for i, row in self.at[v].items()})

    def revert(self, v):
        now, new = dict(self.at[-1]), len(self.at)
        before, after = self.at[v - 1] if v else {}, self.at[v]
        for i, row in list(now.items()):
            if row[1] == v:  # made by v and still live
                del now[i]
        for i, row in before.items():
            if after.get(i) != row and i not in now:  # ended by v, and not live again since
                now[i] = (row[0], new)
        return self.make(now)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_every_version_holds_what_the_model_says(schemas, ops):
    store = PgVectorStore(schemas.url, schema=schemas.new())
    model = VersionModel()
    v = unit_rows(N_IDS, seed=8)
    probe = unit_rows(1, seed=9)[0]
    try:
        for op in ops:
            if op[0] == "add":
                ids = sorted(op[1])  # a live id is re-indexed: its row is replaced
                got = store.add([sid(i) for i in ids], v[ids], [f"s{i % 2}" for i in ids], ["belief"] * len(ids),
                                [op[2]] * len(ids))
                want = model.add(ids, op[2])
            elif op[0] == "flag":
                got, want = store.set_promotable([sid(i) for i in sorted(op[1])], op[2]), model.flag(op[1], op[2])
            else:
                target = op[1] % len(model.at)
                got = getattr(store, op[0])(target)
                want = getattr(model, op[0])(target)
            assert got == want == store.version()
            hits = store.search(probe, N_IDS + 1, exact=True) if len(store) else []
            seen = {int(h.state_id[7:], 16): ((h.session, h.promotable), round(h.score, 4)) for h in hits}
            assert seen == {i: (row[0], round(float(v[i] @ probe), 4)) for i, row in model.at[-1].items()}, (op, ops)
    finally:
        store.close()


def test_engines_keep_searching_and_adding_while_the_index_is_rebuilt(schemas):
    import threading

    import psycopg

    schema = schemas.new()
    builder, engine = PgVectorStore(schemas.url, schema=schema), PgVectorStore(schemas.url, schema=schema)
    n = 4000
    v = unit_rows(n + 1, seed=10)
    builder.drop_index()
    builder.add([sid(i) for i in range(n)], v[:n], ["s"] * n, ["belief"] * n, [True] * n)
    build = threading.Thread(target=builder.build_index)
    build.start()
    with psycopg.connect(schemas.url) as db:
        while not db.execute("SELECT 1 FROM pg_stat_progress_create_index WHERE relid = %s::regclass",
                             (f"{schema}.vectors",)).fetchone():
            assert build.is_alive(), "the build ended before it was seen running"
            threading.Event().wait(0.005)
    # While the graph is being built, another engine searches and adds (a locked table would block both).
    assert engine.search(v[5], 1)[0].state_id == sid(5)
    engine.add([sid(n)], v[n:], ["s"], ["belief"], [True])
    assert build.is_alive()
    build.join(120)
    assert engine.search(v[n], 1)[0].state_id == sid(n) and len(engine) == n + 1
    builder.close()
    engine.close()
