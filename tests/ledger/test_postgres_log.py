"""The transparency log's tests on PostgreSQL: test_log.py's backend-neutral tests run here unchanged
over a fresh log per test, plus what only a shared log does (two writers in one process, tamper
reported by audit, a failed commit, the property test against a reference tree)."""

import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pg import import_psycopg, pg_dsn  # noqa: F401  (pg_dsn: a module fixture, a fresh database)
from test_log import (  # noqa: F401  (collected here again, over the PostgreSQL `db` below)
    KEYS,
    check_log_matches_reference,
    test_add_racing_close_resolves_or_fails_every_future,
    test_add_sequences_and_proves,
    test_added_entry_cannot_be_cancelled,
    test_audit_while_adding_and_callback_guard,
    test_bool_batch_size_rejected,
    test_close_from_done_callback_is_refused,
    test_concurrent_producers_each_index_once,
    test_entry_futures_keep_the_future_protocol,
    test_every_proof_matches_in_memory_tree,
    test_extend_bulk_path,
    test_non_bytes_rejected_nothing_written,
    test_out_of_range_requests,
    test_oversize_rejected_nothing_written,
    test_periodic_checkpoint,
    test_periodic_checkpoint_error_clears_after_success,
    test_reopen_keeps_tree_and_checkpoints,
    test_sequencer_failure_fails_taken_and_queued_items,
    test_wrong_key_on_reopen_and_closed_log,
)

from fieldprint.errors import LogError
from fieldprint.ledger.log import TransparencyLog, wait_all
from fieldprint.ledger.merkle import leaf_hash, root_hash, verify_consistency
from fieldprint.ledger.storage.postgres import DEFAULT_SCHEMA

psycopg = import_psycopg()


def _reset(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {DEFAULT_SCHEMA} CASCADE")


@pytest.fixture
def db(pg_dsn):  # noqa: F811
    """What test_log.py's tests open: here a postgresql:// URL of an empty log."""
    _reset(pg_dsn)
    return pg_dsn


def _sql(dsn, query, params=()):
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else None


def test_two_writers_in_one_process_share_one_tree(db):
    with TransparencyLog.open(db, KEYS[0], checkpoint_interval_s=None) as a, \
            TransparencyLog.open(db, KEYS[0], checkpoint_interval_s=None) as b:
        got = {}
        for i in range(40):  # alternate: each batch starts from the head the other one committed
            log = (a, b)[i % 2]
            got[b"w%d" % i] = log.add(b"w%d" % i).result(timeout=30)
        assert sorted(got.values()) == list(range(40))
        cp_a, cp_b = a.checkpoint(), b.checkpoint()
        assert cp_a.size == cp_b.size == 40 and cp_a.root_hash == cp_b.root_hash
        assert cp_a.root_hash == root_hash([leaf_hash(e) for e, _ in sorted(got.items(), key=lambda kv: kv[1])])
        assert b.audit().ok and a.audit().ok


def test_a_log_that_saw_less_adopts_the_committed_head(db):
    with TransparencyLog.open(db, KEYS[0], checkpoint_interval_s=None) as a:
        early = a.checkpoint()
        with TransparencyLog.open(db, KEYS[0], checkpoint_interval_s=None) as b:
            wait_all([b.add(b"b%d" % i) for i in range(100)])
        assert a._size == 0 and a.size == 100  # a has taken no turn since; its size says what is committed
        assert a.add(b"a0").result(timeout=30) == 100
        late = a.checkpoint()
        verify_consistency(0, 101, a.consistency_proof(0, 101), early.root_hash, late.root_hash)
        assert a.audit().ok


def test_failed_commit_fails_the_batch_and_writes_nothing(db):
    with TransparencyLog.open(db, KEYS[0], batch_size=3, batch_wait_ms=50, checkpoint_interval_s=None) as log:
        wait_all([log.add(b"ok %d" % i) for i in range(4)])
        # A row at index 5 that no sequencer wrote: the next batch (indices 4, 5, 6) must fail whole.
        _sql(db, f"INSERT INTO {DEFAULT_SCHEMA}.leaves (idx, hash, data) VALUES (5, %s, %s)", (bytes(32), b"intruder"))
        futures = [log.add(b"batch %d" % i) for i in range(3)]
        for f in futures:
            with pytest.raises(LogError, match="nothing was written"):
                f.result(timeout=30)
        assert log._storage.size() == 4 and log._storage.entry(4) is None and log._storage.entry(6) is None
        assert log.checkpoint().size == 4


@pytest.mark.parametrize("table,where,what", [
    ("leaves", "idx = 20", "leaf 20:"),
    ("nodes", "level = 4 AND idx = 1", "node (level 4, index 1)"),
])
def test_tampered_rows_are_reported_by_audit(db, table, where, what):
    with TransparencyLog.open(db, KEYS[0], checkpoint_interval_s=None) as log:
        wait_all([log.add(b"entry %d" % i) for i in range(63)])
        log.checkpoint()
        assert log.audit().ok
    column = "data" if table == "leaves" else "hash"
    _sql(db, f"UPDATE {DEFAULT_SCHEMA}.{table} SET {column} = {column} || '\\x00'::bytea WHERE {where}")
    with TransparencyLog.open_readonly(db, KEYS[1]) as reader:
        report = reader.audit()
        assert not report.ok and any(what in p for p in report.problems), report.problems


def test_a_head_that_contradicts_the_stored_tree_is_refused(db):
    with TransparencyLog.open(db, KEYS[0], checkpoint_interval_s=None) as log:
        wait_all([log.add(b"e%d" % i) for i in range(20)])
    _sql(db, f"UPDATE {DEFAULT_SCHEMA}.head SET root = %s", (bytes(32),))
    with TransparencyLog.open(db, KEYS[0], checkpoint_interval_s=None) as log:
        with pytest.raises(LogError, match="does not give the root of the log's tree head; nothing was written"):
            log.add(b"more").result(timeout=30)
    assert _sql(db, f"SELECT size FROM {DEFAULT_SCHEMA}.head") == [(20,)]


def test_concurrent_producers_over_two_logs(db):
    with TransparencyLog.open(db, KEYS[0], batch_size=32, checkpoint_interval_s=None) as a, \
            TransparencyLog.open(db, KEYS[0], batch_size=32, checkpoint_interval_s=None) as b:
        results, lock = {}, threading.Lock()

        def produce(log, k):
            fs = [(b"p%d-%d" % (k, i), log.add(b"p%d-%d" % (k, i))) for i in range(150)]
            got = {e: f.result(timeout=60) for e, f in fs}
            with lock:
                results.update(got)

        threads = [threading.Thread(target=produce, args=((a, b)[k % 2], k)) for k in range(6)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert sorted(results.values()) == list(range(900))
        assert all(a.entry(i) == e for e, i in results.items())
        assert a.audit().ok


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(st.binary(max_size=40), min_size=1, max_size=120), batch_size=st.integers(1, 50), data=st.data())
def test_property_log_matches_reference(pg_dsn, entries, batch_size, data):  # noqa: F811
    _reset(pg_dsn)
    check_log_matches_reference(pg_dsn, entries, batch_size, data)


def test_connections_lost_while_idle_are_replaced(db):
    with TransparencyLog.open(db, KEYS[0], checkpoint_interval_s=None) as log:
        assert log.add(b"before").result(timeout=30) == 0
        storage = log._storage
        backends = [storage._writer.info.backend_pid, storage._reader().info.backend_pid]
        _sql(db, "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (backends,))
        assert log.size == 1 and log.entry(0) == b"before"  # the reader reconnects
        assert log.add(b"after").result(timeout=30) == 1  # so does the sequencer, and nothing is lost
        assert log.audit().ok
