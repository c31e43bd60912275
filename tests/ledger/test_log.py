"""The transparency log over SQLite: sequencing, proofs against checkpoints, reopen, bad input, tamper."""

import os
import sqlite3
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldprint.errors import EntryError, LogError, NoteError
from fieldprint.ledger.entry import MAX_ENTRY_BYTES
from fieldprint.ledger.log import TransparencyLog, wait_all
from fieldprint.ledger.merkle import (
    EMPTY_ROOT,
    leaf_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)
from fieldprint.ledger.note import Checkpoint, generate_key

KEYS = generate_key("test.fieldprint/log")


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "ledger.sqlite")


def _open(db, **kw):
    return TransparencyLog.open(db, KEYS[0], **kw)


def _read(db):
    return TransparencyLog.open_readonly(db, KEYS[1])


def test_add_sequences_and_proves(db):
    entries = [b"entry %d" % i for i in range(300)]
    with _open(db, batch_size=16) as log:
        assert log.size == 0 and log.checkpoint().root_hash == EMPTY_ROOT
        assert sorted(wait_all([log.add(e) for e in entries])) == list(range(300))
        assert [log.entry(i) for i in range(300)] == entries  # one producer: arrival order is index order
        cp = log.checkpoint()
        assert Checkpoint.open(cp.note, [log.verifier_key], origin=log.origin) == cp
        assert (cp.origin, cp.size) == ("test.fieldprint/log", 300)
        assert cp.root_hash == root_hash([leaf_hash(e) for e in entries])
        for i in (0, 1, 17, 255, 256, 299):
            verify_inclusion(leaf_hash(log.entry(i)), i, 300, log.inclusion_proof(i, 300), cp.root_hash)
        for m in (1, 2, 7, 64, 100, 299, 300):
            verify_consistency(m, 300, log.consistency_proof(m, 300), log.root_hash(m), cp.root_hash)
        assert log.consistency_proof(0, 300) == []
        assert log.audit().ok


def test_reopen_keeps_tree_and_checkpoints(db):
    with _open(db) as log:
        wait_all([log.add(b"a%d" % i) for i in range(37)])
        cp1 = log.checkpoint()
    with _open(db) as log:
        assert log.size == 37 and log.latest_checkpoint() == cp1
        wait_all([log.add(b"b%d" % i) for i in range(29)])
        cp2 = log.checkpoint()
        verify_consistency(37, 66, log.consistency_proof(37, 66), cp1.root_hash, cp2.root_hash)
        assert [c.size for c in log.checkpoints()] == [37, 66]
        assert log.audit().ok


def test_concurrent_producers_each_index_once(db):
    with _open(db, batch_size=64, batch_wait_ms=0.5) as log:
        results: dict[bytes, int] = {}

        def produce(k):
            fs = [(b"p%d-%d" % (k, i), log.add(b"p%d-%d" % (k, i))) for i in range(200)]
            results.update((e, f.result()) for e, f in fs)

        threads = [threading.Thread(target=produce, args=(k,)) for k in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert sorted(results.values()) == list(range(1600))
        assert all(log.entry(i) == e for e, i in results.items())


def test_periodic_checkpoint(db):
    with _open(db, checkpoint_interval_s=0.05) as log:
        log.add(b"x").result()
        deadline = time.monotonic() + 5
        while (log.latest_checkpoint() is None or log.latest_checkpoint().size != 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert log.latest_checkpoint().size == 1


def test_extend_bulk_path(db):
    with _open(db) as log:
        log.add(b"first").result()
        assert log.extend([b"bulk%d" % i for i in range(1000)]) == range(1, 1001)
        assert log.entry(1000) == b"bulk999" and log.audit().ok
        assert log.checkpoint().root_hash == root_hash([leaf_hash(b"first")] + [leaf_hash(b"bulk%d" % i) for i in range(1000)])


@pytest.mark.parametrize("bad", ["text", bytearray(b"x"), memoryview(b"x"), None, 7, [b"x"]])
def test_non_bytes_rejected_nothing_written(db, bad):
    with _open(db) as log:
        with pytest.raises(EntryError, match="must be bytes"):
            log.add(bad)
        with pytest.raises(EntryError):
            log.extend([b"ok", bad])
        log.flush()
        assert log.size == 0 and log._storage.size() == 0


def test_oversize_rejected_nothing_written(db):
    with _open(db) as log:
        log.add(b"y" * MAX_ENTRY_BYTES).result()  # the limit itself is accepted
        with pytest.raises(EntryError, match="at most 65536 bytes"):
            log.add(b"y" * (MAX_ENTRY_BYTES + 1))
        log.flush()
        assert log.size == 1 and log._storage.size() == 1


def test_malformed_keys_and_bad_options(db, tmp_path):
    for key in ["", "PRIVATE+KEY+x", KEYS[1], "PRIVATE+KEY+a+00000000+AQ=="]:
        with pytest.raises(NoteError):
            TransparencyLog.open(db, key)
    assert not os.path.exists(db)  # a bad key is refused before the file is created
    with pytest.raises(LogError, match="batch_size"):
        _open(db, batch_size=0)
    with pytest.raises(LogError, match="durability"):
        _open(db, durability="none")
    with pytest.raises(LogError, match="does not exist"):
        TransparencyLog.open(str(tmp_path / "missing" / "x.sqlite"), KEYS[0])


def test_wrong_key_on_reopen_and_closed_log(db):
    with _open(db) as log:
        log.add(b"x").result()
    other, _ = generate_key("test.fieldprint/log")
    with pytest.raises(LogError, match="created with verifier key"):
        TransparencyLog.open(db, other)
    log = _open(db)
    log.close()
    with pytest.raises(LogError, match="closed"):
        log.add(b"z")


def test_out_of_range_requests(db):
    with _open(db) as log:
        wait_all([log.add(b"%d" % i) for i in range(5)])
        for call in [
            lambda: log.entry(5),
            lambda: log.entry(-1),
            lambda: log.inclusion_proof(5, 5),
            lambda: log.inclusion_proof(0, 6),
            lambda: log.consistency_proof(3, 6),
            lambda: log.consistency_proof(4, 3),
            lambda: log.root_hash(6),
            lambda: log.entry("1"),
        ]:
            with pytest.raises(LogError):
                call()


def _tamper(db, sql, params):
    conn = sqlite3.connect(db)
    conn.execute(sql, params)
    conn.commit()
    conn.close()


def _flip(blob, pos):
    b = bytearray(blob)
    b[pos % len(b)] ^= 0x01
    return bytes(b)


@pytest.fixture
def filled(db):
    with _open(db, checkpoint_interval_s=None) as log:  # 63 leaves: stored nodes at levels 4 and 5
        for part in range(3):
            wait_all([log.add(b"entry %d-%d" % (part, i)) for i in range(21)])
            log.checkpoint()
        assert log.audit().ok
    return db


def test_entries_reads_a_range_in_order_and_checks_its_bounds(filled):
    with _read(filled) as log:
        assert [i for i, _ in log.entries(0)] == list(range(63))
        assert list(log.entries(20, 23)) == [(i, log.entry(i)) for i in range(20, 23)]
        assert list(log.entries(63)) == [] and list(log.entries(5, 5)) == []
        for start, end in ((0, 64), (10, 9), (-1, 3)):
            with pytest.raises(LogError, match="must be an integer in"):
                list(log.entries(start, end))
    conn = sqlite3.connect(filled)
    conn.execute("DELETE FROM leaves WHERE idx = 30")
    conn.commit()
    conn.close()
    with _read(filled) as log:
        with pytest.raises(LogError, match="entry 30 is missing from storage"):
            list(log.entries(25, 40))


@pytest.mark.parametrize("index,pos", [(0, 0), (20, 3), (62, 7)])
def test_tampered_leaf_is_reported(filled, index, pos):
    with _open(filled) as log:
        data = log.entry(index)
    _tamper(filled, "UPDATE leaves SET data = ? WHERE idx = ?", (_flip(data, pos), index))
    with _read(filled) as log:  # a damaged log is audited read-only: the writer refuses to sign on from it
        report = log.audit()
        assert not report.ok and any(f"leaf {index}:" in p for p in report.problems)


@pytest.mark.parametrize("index,pos", [(5, 0), (40, 31)])
def test_tampered_leaf_hash_is_reported(filled, index, pos):
    conn = sqlite3.connect(filled)
    (h,) = conn.execute("SELECT hash FROM leaves WHERE idx=?", (index,)).fetchone()
    conn.close()
    _tamper(filled, "UPDATE leaves SET hash = ? WHERE idx = ?", (_flip(h, pos), index))
    with _read(filled) as log:  # a damaged log is audited read-only: the writer refuses to sign on from it
        report = log.audit()
        assert not report.ok and any(f"leaf {index}: the stored leaf hash" in p for p in report.problems)


@pytest.mark.parametrize("level,index,pos", [(4, 0, 0), (4, 2, 31), (5, 0, 12)])
def test_tampered_node_is_reported(filled, level, index, pos):
    conn = sqlite3.connect(filled)
    (h,) = conn.execute("SELECT hash FROM nodes WHERE level=? AND idx=?", (level, index)).fetchone()
    conn.close()
    _tamper(filled, "UPDATE nodes SET hash = ? WHERE level = ? AND idx = ?", (_flip(h, pos), level, index))
    with _read(filled) as log:  # a damaged log is audited read-only: the writer refuses to sign on from it
        report = log.audit()
        assert not report.ok and any(f"node (level {level}, index {index})" in p for p in report.problems)


@pytest.mark.parametrize("size,pos", [(21, 0), (42, 20), (63, -5), (63, -40)])
def test_tampered_checkpoint_is_reported(filled, size, pos):
    conn = sqlite3.connect(filled)
    (note,) = conn.execute("SELECT note FROM checkpoints WHERE size=?", (size,)).fetchone()
    conn.close()
    raw = bytearray(note.encode())
    raw[pos] ^= 0x01
    _tamper(filled, "UPDATE checkpoints SET note = ? WHERE size = ?", (raw.decode("utf-8", "replace"), size))
    with _read(filled) as log:  # a damaged log is audited read-only: the writer refuses to sign on from it
        report = log.audit()
        assert not report.ok and any(f"size {size}" in p for p in report.problems)


def test_deleted_rows_are_reported(filled):
    _tamper(filled, "DELETE FROM nodes WHERE level = 4 AND idx = 1", ())
    _tamper(filled, "INSERT INTO nodes (level, idx, hash) VALUES (9, 0, ?)", (bytes(32),))
    with _read(filled) as log:
        problems = log.audit().problems
        assert any("node (level 4, index 1) is missing" in p for p in problems)
        assert any("level 9 stores 1 nodes" in p for p in problems)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    entries=st.lists(st.binary(max_size=40), min_size=1, max_size=120),
    batch_size=st.integers(1, 50),
    data=st.data(),
)
def test_property_log_matches_reference(tmp_path_factory, entries, batch_size, data):
    check_log_matches_reference(str(tmp_path_factory.mktemp("prop") / "l.sqlite"), entries, batch_size, data)


def check_log_matches_reference(path: str, entries: list[bytes], batch_size: int, data) -> None:
    """The log at `path` (any backend) holds `entries` with the root and proofs of an in-memory tree."""
    with TransparencyLog.open(path, KEYS[0], batch_size=batch_size, batch_wait_ms=0, durability="normal") as log:
        wait_all([log.add(e) for e in entries])
        n = len(entries)
        cp = log.checkpoint()
        assert cp.root_hash == root_hash([leaf_hash(e) for e in entries])
        i = data.draw(st.integers(0, n - 1))
        verify_inclusion(leaf_hash(entries[i]), i, n, log.inclusion_proof(i, n), cp.root_hash)
        m = data.draw(st.integers(0, n))
        verify_consistency(m, n, log.consistency_proof(m, n), root_hash([leaf_hash(e) for e in entries[:m]]), cp.root_hash)


def test_every_proof_matches_in_memory_tree(db):
    """Proofs read from storage (low levels re-hashed from leaf hashes) equal proofs over all nodes."""
    from fieldprint.ledger import merkle

    entries = [b"leaf-%d" % i for i in range(70)]
    border, emitted = [], []
    for i, e in enumerate(entries):
        merkle.append_leaf(border, i, leaf_hash(e), emitted)
    nodes = {(lvl, idx): h for lvl, idx, h in emitted}
    get = lambda ids: [nodes[i] for i in ids]  # noqa: E731
    with _open(db, batch_size=7) as log:
        wait_all([log.add(e) for e in entries])
        for n in range(1, 71):
            assert log.root_hash(n) == merkle.subtree_root(n, get)
            for m in range(n):
                assert log.inclusion_proof(m, n) == merkle.inclusion_proof(m, n, get)
            for m in range(n + 1):
                assert log.consistency_proof(m, n) == merkle.consistency_proof(m, n, get)


def test_audit_while_adding_and_callback_guard(db):
    with _open(db, batch_size=8) as log:
        stop, errors = threading.Event(), []

        def produce():
            i = 0
            while not stop.is_set():
                log.add(b"live %d" % i)
                i += 1
                time.sleep(0.0005)

        t = threading.Thread(target=produce)
        t.start()
        try:
            for _ in range(5):
                report = log.audit()
                assert report.ok, report.problems
        finally:
            stop.set()
            t.join()
        fut = log.add(b"cb")
        fut.add_done_callback(lambda f: errors.append(_capture(log.flush)))
        fut.result()
        log.flush()
        assert errors and isinstance(errors[0], LogError) and "done-callback" in str(errors[0])


def _capture(fn):
    try:
        fn()
    except Exception as exc:  # the test inspects what was raised
        return exc
    return None


def test_added_entry_cannot_be_cancelled(db):
    with _open(db, batch_wait_ms=50) as log:
        fut = log.add(b"keep")
        assert fut.cancel() is False
        assert fut.result() == 0 and log.entry(0) == b"keep"


def test_failed_commit_fails_the_batch_and_writes_nothing(db):
    with _open(db, batch_size=3, batch_wait_ms=50, checkpoint_interval_s=None) as log:
        wait_all([log.add(b"ok %d" % i) for i in range(4)])
        # Another writer took index 5: the next batch (indices 4, 5, 6) must fail as a whole.
        _tamper(db, "INSERT INTO leaves (idx, hash, data) VALUES (5, ?, ?)", (bytes(32), b"intruder"))
        futures = [log.add(b"batch %d" % i) for i in range(3)]
        for f in futures:
            with pytest.raises(LogError, match="nothing was written"):
                f.result()
        assert log.size == 4 and log._storage.entry(4) is None and log._storage.entry(6) is None
        assert log.checkpoint().size == 4


def test_entry_futures_keep_the_future_protocol(db, monkeypatch):
    seen, before_ran, release = [], threading.Event(), threading.Event()
    with _open(db, checkpoint_interval_s=None) as log:
        append = log._storage.append

        def gated_append(*args):  # holds the first commit until its callbacks are registered
            assert release.wait(10), "the test never released the commit"
            return append(*args)

        monkeypatch.setattr(log._storage, "append", gated_append)
        fut = log.add(b"first")
        assert not fut.done() and fut.running() and not fut.cancelled()
        with pytest.raises(TimeoutError):
            fut.result(timeout=0.01)

        def before(f):
            seen.append(("before", f.result()))
            before_ran.set()

        fut.add_done_callback(before)
        fut.add_done_callback(lambda f: 1 / 0)  # a failing callback must not stop the sequencer
        release.set()
        assert fut.result(timeout=10) == 0 and fut.exception() is None and fut.done()
        # Callbacks run on the sequencer after the future resolves: wait for it, not for a linger.
        assert before_ran.wait(10)
        fut.add_done_callback(lambda f: seen.append(("after", f.result())))  # runs at once
        assert log.add(b"second").result(timeout=10) == 1
    assert seen == [("before", 0), ("after", 0)]


class _SlowPutQueue:
    """A queue whose put() of an entry pauses first: widens the window between add()'s check and its put."""

    def __init__(self, inner):
        self._inner = inner

    def put(self, item):
        if isinstance(item, tuple):
            time.sleep(0.002)
        self._inner.put(item)

    def get(self, *args, **kwargs):
        return self._inner.get(*args, **kwargs)

    def get_nowait(self):
        return self._inner.get_nowait()


def test_add_racing_close_resolves_or_fails_every_future(db):
    log = _open(db, batch_size=8, checkpoint_interval_s=None)
    log._queue = _SlowPutQueue(log._queue)
    futures, refused, start = [], [], threading.Event()
    lock = threading.Lock()

    def produce(k):
        start.wait()
        for i in range(40):
            try:
                f = log.add(b"racer %d-%d" % (k, i))
            except LogError as exc:
                refused.append(exc)
                return
            with lock:
                futures.append(f)

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(12)]
    [t.start() for t in threads]
    start.set()
    time.sleep(0.02)
    log.close()
    [t.join(10) for t in threads]
    indices = []
    for f in futures:
        try:
            indices.append(f.result(timeout=5))  # TimeoutError here is the bug: a stranded entry
        except LogError as exc:
            assert "closed" in str(exc) or "stopped" in str(exc)
    assert refused and all("closed" in str(e) for e in refused)
    assert sorted(indices) == list(range(len(indices)))
    with _open(db) as again:
        assert again.size == len(indices) and again.audit().ok


def test_close_from_done_callback_is_refused(db):
    with _open(db) as log:
        errors = []
        fut = log.add(b"cb")
        fut.add_done_callback(lambda f: errors.append(_capture(log.close)))
        fut.result()
        log.flush()
        assert isinstance(errors[0], LogError) and "done-callback" in str(errors[0])
        assert log.add(b"still open").result(timeout=10) == 1


class _Stop(BaseException):
    """Escapes the sequencer's per-batch error handling, as an interpreter-level failure would."""


def test_sequencer_failure_fails_taken_and_queued_items(db, monkeypatch):
    with _open(db, batch_size=4, checkpoint_interval_s=None) as log:
        def boom(batch):
            raise _Stop("simulated")

        monkeypatch.setattr(log, "_integrate_batch", boom)
        futures = [log.add(b"x%d" % i) for i in range(10)]
        for f in futures:
            with pytest.raises(LogError, match="sequencer stopped"):
                f.result(timeout=5)
        with pytest.raises(LogError, match="sequencer stopped"):
            log.add(b"after")
        with pytest.raises(LogError, match="sequencer stopped"):
            log.flush()


def test_periodic_checkpoint_error_clears_after_success(db, monkeypatch):
    with _open(db, checkpoint_interval_s=0.02) as log:
        real, calls = log._storage.add_checkpoint, []

        def flaky(size, note):
            calls.append(size)
            if len(calls) == 1:
                raise LogError("disk full (simulated)")
            return real(size, note)

        monkeypatch.setattr(log._storage, "add_checkpoint", flaky)
        log.add(b"x").result()
        deadline = time.monotonic() + 5
        # The first periodic checkpoint fails, the retry a period later succeeds and clears the error.
        while not (len(calls) >= 2 and log.periodic_checkpoint_error is None) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(calls) >= 2 and log.periodic_checkpoint_error is None
        assert log.latest_checkpoint().size == 1


def test_bool_batch_size_rejected(db):
    with pytest.raises(LogError, match="batch_size"):
        _open(db, batch_size=True)
