"""The memory tests again, on PostgreSQL: the state store and the vector index both in one shared database.

The gate, Pacemaker and store-failure tests of test_policy.py and test_store_failures.py run here
unchanged, with `memory` (and every `make_memory` they call) opening PostgresStateStore and
PgVectorStore in a fresh schema; the log stays the embedded one. Where a test exercises SQLite
itself (its trigger syntax, a COMMIT it rolled back on its own, a file that is not a database, a
read-only mount), the PostgreSQL counterpart of the same promise is below it.
"""

from __future__ import annotations

import os
import threading
import uuid

import memory_harness
import pytest
import test_policy
import test_store_failures
from memory_harness import LOG_SIGNER, LOG_VERIFIER, OPS_VERIFIER, Clock, Memory
from pg import FreezingProxy, import_psycopg, pg_dsn, seconds_blocked, stopped_writer, unavailable  # noqa: F401  (pg_dsn: a fresh database per module)
from test_policy import (  # noqa: F401  (collected here, against PostgreSQL)
    test_a_checkpoint_of_another_origin_signed_by_a_configured_key_is_refused,
    test_a_failed_ledger_append_leaves_no_state_behind,
    test_a_log_without_checkpoints_verifies_nothing,
    test_add_many_commits_a_batch_and_launders_nothing_inside_it,
    test_anchor_search_returns_only_anchors,
    test_bad_overrides_are_refused_and_nothing_is_stored,
    test_bad_states_are_refused_and_nothing_is_stored,
    test_checkpoint_from_an_unconfigured_log_key_verifies_nothing,
    test_deciding_never_writes_to_the_log,
    test_demotion_latest_override_wins_and_revocations,
    test_deriving_from_a_parent_whose_taint_was_erased_is_refused,
    test_duplicate_state_is_refused_before_the_ledger,
    test_erasing_taint_from_the_store_is_caught,
    test_labels_given_as_a_string_and_empty_text_are_refused,
    test_override_promotes_until_it_expires,
    test_override_stops_counting_when_its_key_is_removed,
    test_records_slipped_into_the_store_do_not_count,
    test_replaying_a_logged_note_in_any_order_changes_no_decision,
    test_retrieval_never_restores_authority,
    test_taint_and_type_keep_states_from_being_anchors,
    test_tampering_that_keeps_the_id_is_caught_by_the_ledger,
    test_tampering_with_the_stored_state_is_caught,
    test_the_pacemaker_compacts_the_vector_store_as_it_goes,
    test_trusted_state_of_promotable_type_is_an_anchor,
)
from test_store_failures import (  # noqa: F401
    test_a_revocation_logged_but_not_stored_is_recovered_with_its_target,
    test_a_sequencer_that_returns_the_wrong_count_stores_nothing,
    test_an_override_logged_but_not_stored_is_recovered_from_its_leaf,
    test_recovering_what_is_not_a_configured_override_is_refused,
)
from test_vectors import minilm, test_pacemaker_retrieves_by_meaning_with_minilm  # noqa: F401

from fieldprint.errors import StateError
from fieldprint.ledger.log import TransparencyLog
from fieldprint.memory.embed import HashingEmbedderForTests
from fieldprint.memory.pacemaker import Pacemaker
from fieldprint.memory.pg_store import PostgresStateStore
from fieldprint.memory.pgvector import PgVectorStore
from fieldprint.memory.policy import GateConfig, PromotionGate
from fieldprint.postgres import redact

psycopg = import_psycopg()


def require_pgvector(dsn: str) -> str:
    """`dsn`, if its server has pgvector; otherwise a skip (a failure where PostgreSQL is required)."""
    with psycopg.connect(dsn) as db:
        if not db.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone():
            version = db.execute("SHOW server_version").fetchone()[0]
            unavailable(f"the PostgreSQL {version} server has no pgvector extension (install pgvector for it)")
    return dsn


class Schemas:
    """Fresh schemas in the test database, one per memory, dropped at the end."""

    def __init__(self, url: str) -> None:
        self.url, self.made = url, []

    def new(self) -> str:
        name = "t_" + uuid.uuid4().hex[:16]
        self.made.append(name)
        return name

    def drop_all(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as db:
            for name in self.made:
                db.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


@pytest.fixture
def schemas(request):
    s = Schemas(require_pgvector(request.getfixturevalue("pg_dsn")))
    yield s
    s.drop_all()


def make_pg_memory(url: str, schema: str, root: str, clock: Clock | None = None,
                   override_keys: list[str] | None = None, embedder=None) -> Memory:
    """make_memory with the state store and the vector index in PostgreSQL (schema `schema`)."""
    clock = clock or Clock()
    log = TransparencyLog.open(os.path.join(root, "log.db"), LOG_SIGNER, batch_wait_ms=0, checkpoint_interval_s=None,
                               durability="normal")
    store = PostgresStateStore(url, schema)
    vectors = PgVectorStore(url, schema=schema)
    keys = [OPS_VERIFIER] if override_keys is None else override_keys
    gate = PromotionGate(store, log, GateConfig(log_keys=[LOG_VERIFIER], override_keys=keys), clock=clock)
    pm = Pacemaker(store, log, vectors, embedder or HashingEmbedderForTests(), gate)
    memory = Memory(log, store, vectors, gate, pm, clock, root)
    memory.close = lambda: (log.close(), store.close(), vectors.close())  # the vector store holds a connection too
    return memory


def pg_refuse_records(store, message):
    """Make PostgreSQL itself refuse the next record insert (a trigger), as a full disk or a lost lock would."""
    store.execute(f"CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION '{message}'; "
                  f"END $$; CREATE TRIGGER refuse BEFORE INSERT ON records FOR EACH ROW EXECUTE FUNCTION refuse()")


def pg_accept_records(store):
    store.execute("DROP TRIGGER refuse ON records; DROP FUNCTION refuse()")


@pytest.fixture(autouse=True)
def on_postgres(schemas, monkeypatch):
    """Every make_memory the reused tests call opens a fresh PostgreSQL schema; triggers in PL/pgSQL."""
    opened = []

    def make(root, clock=None, override_keys=None, embedder=None):
        opened.append(make_pg_memory(schemas.url, schemas.new(), root, clock, override_keys, embedder))
        return opened[-1]

    monkeypatch.setattr(memory_harness, "make_memory", make)
    monkeypatch.setattr(test_store_failures, "make_memory", make)
    monkeypatch.setattr(test_store_failures, "refuse_records", pg_refuse_records)
    monkeypatch.setattr(test_store_failures, "accept_records", pg_accept_records)
    yield make
    for m in opened:
        try:
            m.close()
        except Exception:
            pass


@pytest.fixture
def memory(on_postgres, tmp_path):
    return on_postgres(str(tmp_path))


def test_the_reused_tests_run_on_postgres(memory, tmp_path):
    assert isinstance(memory.store, PostgresStateStore) and isinstance(memory.vectors, PgVectorStore)
    os.makedirs(tmp_path / "second")
    second = memory_harness.make_memory(str(tmp_path / "second"))
    assert isinstance(second.store, PostgresStateStore) and second.store._pg.schema != memory.store._pg.schema


# --- PostgreSQL counterparts of the SQLite-specific tests ------------------------------------------------------------

def test_a_store_failure_after_the_ledger_append_rolls_back_the_vector_index(memory):
    test_policy.add(memory)
    memory.log.flush()
    log_size, stored, rows = memory.log.size, len(memory.store), len(memory.vectors)
    memory.store.execute("CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                         "RAISE EXCEPTION 'disk says no'; END $$; CREATE TRIGGER boom BEFORE UPDATE OF leaf_index "
                         "ON states FOR EACH ROW EXECUTE FUNCTION boom()")
    with pytest.raises(StateError, match="disk says no.*nothing was stored"):
        test_policy.add(memory, text="a new memory")
    assert (len(memory.store), len(memory.vectors)) == (stored, rows)
    assert [h.state.text for h in memory.pm.search("a new memory", 5)] == ["meet at noon"]
    memory.log.flush()
    assert memory.log.size == log_size + 1


def test_a_failed_commit_stores_nothing_and_the_store_still_takes_writes(memory):
    # A deferred constraint trigger fires at COMMIT: PostgreSQL's own failure at the last moment.
    test_store_failures.add(memory, "user_input", text="meet at noon")
    stored, rows = len(memory.store), len(memory.vectors)
    memory.store.execute("CREATE FUNCTION full_disk() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                         "RAISE EXCEPTION 'could not extend file: No space left on device'; END $$; "
                         "CREATE CONSTRAINT TRIGGER full_disk AFTER INSERT ON states DEFERRABLE INITIALLY DEFERRED "
                         "FOR EACH ROW EXECUTE FUNCTION full_disk()")
    with pytest.raises(StateError, match="No space left on device; nothing was stored"):
        test_store_failures.add(memory, "user_input", text="a new memory")
    assert (len(memory.store), len(memory.vectors)) == (stored, rows)
    assert [h.state.text for h in memory.pm.search("a new memory", 5)] == ["meet at noon"]
    memory.store.execute("DROP TRIGGER full_disk ON states")
    test_store_failures.add(memory, "user_input", text="after the failure")
    assert len(memory.store) == stored + 1 and len(memory.vectors) == rows + 1


@pytest.mark.parametrize("sql,column", [
    ("UPDATE states SET parents = 'not json'", "parents"),
    ("UPDATE states SET sources = '[1, 2]'", "sources"),
    ("UPDATE states SET taint = '{}'", "taint"),
    ("UPDATE states SET tensor_digest = 'blake3:00'", "tensor_digest"),
])
def test_a_damaged_row_is_a_state_error_naming_its_column(memory, sql, column):
    # time_ns and leaf_index are typed columns here: PostgreSQL refuses the damage itself.
    test_store_failures.test_a_damaged_row_is_a_state_error_naming_its_column(memory, sql, column)
    with pytest.raises(StateError, match="invalid input syntax for type bigint"):
        memory.store.execute("UPDATE states SET time_ns = 'soon'")


def test_what_cannot_be_reached_or_read_is_refused_by_name(schemas):
    info = psycopg.conninfo.conninfo_to_dict(schemas.url)
    with pytest.raises(StateError, match=r"cannot connect to the state store at postgresql://.*:1/.*check that "
                                         r"PostgreSQL runs there"):
        PostgresStateStore(psycopg.conninfo.make_conninfo(schemas.url, port=1, password="s3cret"))
    with pytest.raises(StateError, match="no_such_database") as e:
        PgVectorStore(psycopg.conninfo.make_conninfo(schemas.url, dbname="no_such_database", password="s3cret"))
    assert "s3cret" not in str(e.value)
    assert "s3cret" not in redact(f"postgresql://u:s3cret@{info.get('host', 'localhost')}/db")
    with pytest.raises(StateError, match="schema"):
        PostgresStateStore(schemas.url, schema="x; DROP TABLE states")


def test_a_schema_newer_than_the_code_is_refused(schemas):
    schema = schemas.new()
    PostgresStateStore(schemas.url, schema).close()
    with psycopg.connect(schemas.url, autocommit=True) as db:
        db.execute(f"UPDATE {schema}.schema_versions SET version = 99 WHERE component = 'states'")
    with pytest.raises(StateError, match="schema version 99, newer than this Fieldprint knows.*upgrade"):
        PostgresStateStore(schemas.url, schema)


def test_a_vector_store_of_another_size_is_refused(schemas):
    schema = schemas.new()
    PgVectorStore(schemas.url, dim=384, schema=schema).close()
    with pytest.raises(StateError, match="holds 384-d vectors, not 16-d"):
        PgVectorStore(schemas.url, dim=16, schema=schema)


def test_a_read_only_role_reads_and_every_write_is_a_state_error(memory, schemas):
    s = test_store_failures.add(memory, "user_input", text="meet at noon")
    role, schema = f"ro_{uuid.uuid4().hex[:8]}", memory.store._pg.schema
    with psycopg.connect(schemas.url, autocommit=True) as db:
        db.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'ro'")
        db.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}; GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role}")
    try:
        url = psycopg.conninfo.make_conninfo(schemas.url, user=role, password="ro")
        store, vectors = PostgresStateStore(url, schema), PgVectorStore(url, schema=schema)
        assert store.get(s.state_id).text == "meet at noon" and len(store) == 1
        query = HashingEmbedderForTests().embed(["meet at noon"])[0]
        assert [h.state_id for h in vectors.search(query, 1)] == [s.state_id]
        from fieldprint.memory.store import PolicyRecord
        with pytest.raises(StateError, match=f"the state store at postgresql://{role}@.* is read-only.*connect as a role"):
            store.insert_record(PolicyRecord(9, "override", s.state_id, None, "x"))
        with pytest.raises(StateError, match="the vector store at .* is read-only"):
            vectors.add(["blake3:" + "01" * 32], query[None], ["s"], ["belief"], [True])
        with pytest.raises(StateError, match="read-only"):
            PostgresStateStore(url, schemas.new())  # a new store needs to create its tables
        store.close()
        vectors.close()
    finally:
        with psycopg.connect(schemas.url, autocommit=True) as db:
            db.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_a_dropped_connection_fails_one_call_and_the_next_reconnects(memory, schemas):
    s = test_store_failures.add(memory, "user_input", text="meet at noon")
    with psycopg.connect(schemas.url, autocommit=True) as db:
        for pg in (memory.store._pg, memory.vectors._pg):
            db.execute("SELECT pg_terminate_backend(%s)", (pg._db.info.backend_pid,))
    with pytest.raises(StateError, match="the connection failed.*the next call reconnects"):
        memory.store.get(s.state_id)
    assert memory.store.get(s.state_id).text == "meet at noon"
    with pytest.raises(StateError, match="connection failed"):
        len(memory.vectors)
    assert len(memory.vectors) == 1
    memory.store.close()
    with pytest.raises(StateError, match="is closed"):
        memory.store.get(s.state_id)


def test_a_writer_stopped_while_its_leaf_is_sequenced_holds_up_same_content_writers_for_seconds(schemas):
    """A writer SIGSTOPped inside insert_committed, waiting for its leaf with the content's lock held
    (a bound of 1 s in that process instead of 300): the server ends its transaction, nothing of it is
    stored, and another writer of the same content stores its state."""
    from fieldprint.memory.state import new_state

    schema = schemas.new()
    store = PostgresStateStore(schemas.url, schema)
    code = f"""
import os, signal
from fieldprint.memory.pg_store import PgConnection, PostgresStateStore
from fieldprint.memory.state import new_state
PgConnection.log_wait_idle_s = 1.0
def stop():
    print("stopping", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
state = new_state("observation", session="a", creator="engine", text="same", sources=("user",), time_ns=1)
PostgresStateStore({schemas.url!r}, {schema!r}).insert_committed([state], stop)
"""
    mine = new_state("observation", session="b", creator="engine", text="same", sources=("user",), time_ns=2)
    with stopped_writer(code):
        waited, stored = seconds_blocked(lambda: store.insert_committed([mine], lambda: [7]), 20)
    assert waited < 10 and [s.leaf_index for s in stored] == [7] and len(store) == 1
    store.close()


def test_a_state_insert_cut_off_mid_send_holds_the_contents_lock_only_for_its_bound(schemas, monkeypatch):
    """A writer whose INSERT (a 20 KB text) stops arriving halfway, as from an engine stopped between
    two of libpq's writes, with the content's lock held: the rows go as one simple-protocol message,
    so the server ends the idle transaction after the bound (1 s here), nothing of it is stored, and a
    writer of the same content stores its state."""
    from fieldprint.memory.pg_store import PgConnection
    from fieldprint.memory.state import new_state

    monkeypatch.setattr(PgConnection, "log_wait_idle_s", 1.0)
    schema = schemas.new()
    proxy = FreezingProxy(schemas.url)
    store, cut = PostgresStateStore(schemas.url, schema), PostgresStateStore(proxy.dsn, schema)
    text = "the same long content " * 1000
    mine, theirs = (new_state("observation", session=s, creator="engine", text=text, sources=("user",), time_ns=1)
                    for s in ("mine", "theirs"))
    t, outcome = proxy.start_cut(lambda: cut.insert_committed([theirs], lambda: [1]), "INSERT")
    try:
        waited, stored = seconds_blocked(lambda: store.insert_committed([mine], lambda: [2]), 20)
        t.join(30)
        assert waited < 10 and isinstance(outcome.get("error"), StateError), outcome
        assert [s.state_id for s in stored] == [mine.state_id] and len(store) == 1
    finally:
        proxy.close()  # first: a cut-off session still holding its lock ends with its connection
        t.join(30)
        store.close()
        cut.close()


WEIRD = "it's a \\ \"q\" {NULL,} , NULL e\u0301 \u6771 $$ ;DROP TABLE states;-- \\x00 ' E'x'"


def test_state_rows_written_as_sql_literals_read_back_exactly(schemas):
    """The rows go in as SQL literals (one simple-protocol message): quotes, backslashes, braces, the
    word NULL, dollar quotes and SQL come back as they were, with a real NULL beside them."""
    from fieldprint.memory.state import new_state

    store = PostgresStateStore(schemas.url, schemas.new())
    states = [new_state("observation", session="s", creator="e", text=t, sources=("user",), time_ns=i)
              for i, t in enumerate([WEIRD, "NULL", " ", "{}"])]
    store.insert_committed(states, lambda: [10, 11, 12, 13])
    got = [store.get(s.state_id) for s in states]
    assert [g.text for g in got] == [WEIRD, "NULL", " ", "{}"] and [g.leaf_index for g in got] == [10, 11, 12, 13]
    assert all(g.tensor is None for g in got)
    store.close()


def test_text_with_a_nul_character_is_refused_before_the_ledger(memory):
    test_store_failures.add(memory, "user_input", text="meet at noon")
    before = memory.snapshot()
    with pytest.raises(StateError, match="cannot hold NUL"):
        memory.pm.add("user_input", session="s-1", creator="agent", text="a\x00b", sources=("u",), time_ns=5)
    assert memory.snapshot() == before


def test_a_failed_add_undoes_only_its_own_rows_while_another_engine_writes(memory, schemas):
    """The Pacemaker's undo after a store failure must not erase what another engine indexed meanwhile."""
    test_policy.add(memory)
    other = PgVectorStore(schemas.url, schema=memory.store._pg.schema)  # a second engine's vector store
    # The trigger waits for the test (an advisory lock) before failing, so the other engine writes
    # after this add's rows are indexed and before its store transaction fails.
    memory.store.execute("CREATE FUNCTION wait_then_fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                         "PERFORM pg_advisory_lock(4242); RAISE EXCEPTION 'disk says no'; END $$; "
                         "CREATE TRIGGER wait_then_fail BEFORE UPDATE OF leaf_index ON states FOR EACH ROW "
                         "EXECUTE FUNCTION wait_then_fail()")
    version = memory.vectors.version()
    other_row = HashingEmbedderForTests().embed(["the other engine's memory"])
    with psycopg.connect(schemas.url, autocommit=True) as gatekeeper:
        gatekeeper.execute("SELECT pg_advisory_lock(4242)")
        errors = []
        adder = threading.Thread(target=lambda: errors.append(pytest.raises(
            StateError, test_policy.add, memory, text="a new memory")))
        adder.start()
        while memory.vectors.version() == version:  # this add's rows are indexed
            threading.Event().wait(0.01)
        other.add(["blake3:" + "0e" * 32], other_row, ["s-2"], ["belief"], [True])
        gatekeeper.execute("SELECT pg_advisory_unlock(4242)")
        adder.join(30)
    assert "disk says no" in str(errors[0].value)
    assert len(memory.vectors) == 2  # the first state and the other engine's row; not the failed add's
    assert [h.state_id for h in memory.vectors.search(other_row[0], 1)] == ["blake3:" + "0e" * 32]
    other.close()


def test_a_state_whose_engine_died_after_indexing_it_can_be_added_again(memory):
    """An engine killed between its vector add and its state commit leaves a live vector row; it must not block the state."""
    from fieldprint.memory.state import new_state

    state = new_state("user_input", session="s-1", creator="agent", text="meet at noon", sources=("user:alice",),
                      time_ns=memory.clock.now)
    row = memory.pm.embedder.embed([state.text])
    memory.vectors.add([state.state_id], row, [state.session], [state.state_type], [True])  # what the dead engine left
    assert memory.store.get(state.state_id) is None
    again = memory.pm.add("user_input", session="s-1", creator="agent", text="meet at noon", sources=("user:alice",),
                          time_ns=memory.clock.now)
    assert again.state_id == state.state_id and len(memory.vectors) == 1
    memory.sign()
    assert [h.state.state_id for h in memory.pm.search("meet at noon", 3, anchors_only=True)] == [state.state_id]


def test_without_psycopg_the_backends_say_what_to_install():
    import subprocess
    import sys

    code = ("import sys; sys.modules['psycopg'] = None\n"
            "from fieldprint.errors import StateError\n"
            "from fieldprint.memory.pg_store import PostgresStateStore\n"
            "from fieldprint.memory.pgvector import PgVectorStore\n"
            "for make in (PostgresStateStore, PgVectorStore):\n"
            "    try:\n"
            "        make('postgresql://localhost/x')\n"
            "    except StateError as e:\n"
            "        print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines() == ["the PostgreSQL backends need psycopg 3: pip install 'fieldprint[postgres]'"] * 2, out


def test_create_memory_makes_its_stores_once(schemas):
    from fieldprint.memory.pg_store import create_memory

    schema = schemas.new()
    assert create_memory(schemas.url, schema) == {"sessions": 1, "states": 1, "vectors": 1}
    assert create_memory(schemas.url, schema) == {"sessions": 1, "states": 1, "vectors": 1}  # again: nothing to do
    with pytest.raises(StateError, match="holds 384-d vectors, not 768-d"):
        create_memory(schemas.url, schema, dim=768)
    store, vectors = PostgresStateStore(schemas.url, schema), PgVectorStore(schemas.url, schema=schema)
    assert len(store) == 0 and len(vectors) == 0
    store.close()
    vectors.close()


def test_rows_left_by_a_dead_engine_are_swept_and_live_adds_are_not(memory):
    kept = test_policy.add(memory)
    rows = HashingEmbedderForTests().embed(["left behind", "in flight"])
    dead, in_flight = "blake3:" + "d0" * 32, "blake3:" + "f1" * 32
    memory.vectors.add([dead], rows[:1], ["s-1"], ["belief"], [True])  # its engine died before the state commit
    assert memory.vectors.sweep(memory.store.stored) == 0  # younger than the guard: it could still be in flight
    memory.vectors.add([in_flight], rows[1:], ["s-1"], ["belief"], [True])
    memory.store.execute("UPDATE vector_versions SET made_at = made_at - interval '1 hour' WHERE op = 'add' "
                         "AND version < (SELECT max(version) FROM vector_versions)")
    before = memory.vectors.version()
    assert memory.vectors.sweep(memory.store.stored) == 1
    assert len(memory.vectors) == 2 and memory.vectors.search(rows[0], 1)[0].state_id != dead
    assert {h.state_id for h in memory.vectors.search(rows[1], 3)} == {in_flight, kept.state_id}
    memory.vectors.revert(before + 1)  # a sweep is a version like any other
    assert len(memory.vectors) == 3
