"""The storage contract on both backends (SQLite and PostgreSQL), then what only PostgreSQL has:
schema migrations, read-only opens, messages without passwords, the bare append's check, and a
sequencer that hangs inside its transaction being cut off while another one takes over."""

import threading
import time

import pytest
from pg import FreezingProxy, import_psycopg, pg_dsn  # noqa: F401  (pg_dsn: a module fixture, a fresh database)

from fieldprint.errors import LogError
from fieldprint.ledger.merkle import EMPTY_ROOT, leaf_hash, root_hash
from fieldprint.ledger.storage.postgres import SCHEMA_VERSION, PostgresStorage
from fieldprint.ledger.storage.sqlite import SQLiteStorage

psycopg = import_psycopg()

_schemas = iter(range(10**6))


@pytest.fixture(params=["sqlite", "postgres"])
def make_storage(request, tmp_path):
    """make_storage() -> a new, empty storage on the backend; all are closed after the test."""
    opened = []

    def make(**kw):
        if request.param == "sqlite":
            storage = SQLiteStorage(tmp_path / f"l{len(opened)}.sqlite")
        else:
            dsn = request.getfixturevalue("pg_dsn")
            storage = PostgresStorage(dsn, schema=kw.pop("schema", f"t{next(_schemas)}"), **kw)
        opened.append(storage)
        return storage

    yield make
    for storage in opened:
        storage.close()


def _leaves(n, start=0):
    entries = [b"entry %d" % i for i in range(start, start + n)]
    return entries, [leaf_hash(e) for e in entries]


def test_append_and_read_back(make_storage):
    s = make_storage()
    assert s.size() == 0 and s.entry(0) is None and s.latest_checkpoint() is None and s.checkpoints() == []
    entries, hashes = _leaves(40)
    s.append(0, entries[:17], hashes[:17], [(4, 0, b"n" * 32)])
    s.append(17, entries[17:], hashes[17:], [(4, 1, b"m" * 32), (5, 0, b"o" * 32)])
    assert s.size() == 40
    assert s.entry(39) == b"entry 39" and s.entry(40) is None
    assert list(s.leaves(3, 6)) == [(i, entries[i], hashes[i]) for i in range(3, 6)]
    assert s.leaf_hashes([(0, 2), (38, 40)]) == {0: hashes[0], 1: hashes[1], 38: hashes[38], 39: hashes[39]}
    assert s.nodes([(5, 0), (4, 1), (4, 0)]) == [b"o" * 32, b"m" * 32, b"n" * 32]
    assert s.node_range(4, 0, 10) == {0: b"n" * 32, 1: b"m" * 32}
    assert s.node_count() == {4: 2, 5: 1}
    with pytest.raises(LogError, match=r"\(4, 7\) is missing"):
        s.nodes([(4, 0), (4, 7)])


def test_checkpoints_one_per_size(make_storage):
    s = make_storage()
    s.add_checkpoint(5, "note five")
    s.add_checkpoint(2, "note two")
    s.add_checkpoint(5, "note five")  # re-signing the same head stores the same note once
    assert s.checkpoints() == [(2, "note two"), (5, "note five")]
    assert s.latest_checkpoint() == (5, "note five")


def test_meta_round_trip(make_storage):
    s = make_storage()
    assert s.get_meta("origin") is None
    s.set_meta("origin", "example.org/log")
    assert s.get_meta("origin") == "example.org/log"


def test_append_with_mismatched_hashes_is_refused_and_writes_nothing(make_storage):
    s = make_storage()
    with pytest.raises(LogError, match="2 entries but 1 leaf hashes; nothing was written"):
        s.append(0, [b"a", b"b"], [bytes(32)], [])
    assert s.size() == 0


def test_entries_of_any_bytes_round_trip_and_hashes_of_another_length_are_refused(pg_dsn):  # noqa: F811
    """The rows go to the server as one hex literal per table that it cuts by lengths: every byte value,
    empty entries and an empty batch come back as stored; a hash that is not 32 bytes would shift every
    later cut, so it is refused before anything is sent."""
    s = PostgresStorage(pg_dsn, schema="literal_rows")
    try:
        entries = [bytes(range(256)), b"", b"'\\x00\\'--", b"", bytes([0]) * 5000]
        hashes = [leaf_hash(e) for e in entries]
        s.append(0, entries, hashes, [(1, 0, bytes(range(32))), (2, 0, b"\x00" * 32)])
        s.append(len(entries), [], [], [])
        assert list(s.leaves(0, len(entries))) == [(i, e, h) for i, (e, h) in enumerate(zip(entries, hashes))]
        assert s.nodes([(1, 0), (2, 0)]) == [bytes(range(32)), bytes(32)]
        for bad in ([hashes[0][:31]], [hashes[0] + b"x"]):
            with pytest.raises(LogError, match="must be 32 bytes; nothing was written"):
                s.append(len(entries), [b"next"], bad, [])
        with pytest.raises(LogError, match="must be 32 bytes; nothing was written"):
            s.append(len(entries), [b"next"], [leaf_hash(b"next")], [(1, 9, b"short")])
        assert s.size() == len(entries) and s.entry(len(entries)) is None
    finally:
        s.close()


def test_failed_append_writes_nothing(make_storage):
    s = make_storage()
    entries, hashes = _leaves(3)
    s.append(0, entries, hashes, [])
    with pytest.raises(LogError, match="nothing was written"):  # a node that exists already fails the whole batch
        s.append(3, [b"x"], [leaf_hash(b"x")], [(4, 0, b"a" * 32), (4, 0, b"b" * 32)])
    assert s.size() == 3 and s.entry(3) is None and s.node_count() == {}


def test_snapshot_sees_one_state(make_storage):
    s = make_storage()
    entries, hashes = _leaves(5)
    s.append(0, entries, hashes, [])
    seen = []
    with s.snapshot():
        seen.append(s.size())
        t = threading.Thread(target=lambda: s.append(5, [b"later"], [leaf_hash(b"later")], []))
        t.start()
        t.join()
        seen.append(s.size())
        seen.append(s.entry(5))
    assert seen == [5, 5, None] and s.size() == 6


def test_closed_storage_refuses(make_storage):
    s = make_storage()
    s.close()
    with pytest.raises(LogError, match="closed"):
        s.size()
    s.close()  # closing twice is fine


# --- PostgreSQL only ----------------------------------------------------------------------------


def test_bare_append_checks_where_the_log_ends(pg_dsn):  # noqa: F811
    s = PostgresStorage(pg_dsn, schema="bare")
    try:
        entries, hashes = _leaves(3)
        s.append(0, entries, hashes, [])
        for at in (5, 1):  # a gap, an overlap
            with pytest.raises(LogError, match=f"append at {at} but the log holds 3 entries; nothing was written"):
                s.append(at, [b"x"], [leaf_hash(b"x")], [])
        assert s.size() == 3 and s.entry(5) is None and s.entry(1) == b"entry 1"
    finally:
        s.close()


def test_schema_is_created_once_and_versioned(pg_dsn):  # noqa: F811
    errors = []

    def open_close():
        try:
            PostgresStorage(pg_dsn, schema="racing").close()
        except Exception as exc:  # the test reports any
            errors.append(exc)

    threads = [threading.Thread(target=open_close) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    s = PostgresStorage(pg_dsn, schema="racing")
    try:
        assert s.get_meta("schema_version") == str(SCHEMA_VERSION) and s.size() == 0
    finally:
        s.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE racing.meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    for readonly in (False, True):
        with pytest.raises(LogError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this Fieldprint"):
            PostgresStorage(pg_dsn, schema="racing", readonly=readonly)


def test_readonly_open_of_a_database_without_a_log(pg_dsn):  # noqa: F811
    with pytest.raises(LogError, match="holds no Fieldprint log"):
        PostgresStorage(pg_dsn, schema="nothing_here", readonly=True)
    PostgresStorage(pg_dsn, schema="ro").close()
    s = PostgresStorage(pg_dsn, schema="ro", readonly=True)
    try:
        with pytest.raises(LogError, match="open read-only"):
            s.append(0, [b"a"], [bytes(32)], [])
        assert s.size() == 0
    finally:
        s.close()


def test_bad_options_and_unreachable_server_never_show_the_password(pg_dsn):  # noqa: F811
    for kw, what in [({"schema": "Robert'); DROP"}, "schema"), ({"lease_s": 0}, "lease_s"),
                     ({"lease_wait_s": -1}, "lease_wait_s"), ({"durability": "none"}, "durability")]:
        with pytest.raises(LogError, match=what):
            PostgresStorage(pg_dsn, **kw)
    with pytest.raises(LogError, match="cannot connect") as err:
        PostgresStorage("postgresql://someone:s3cret-pw@127.0.0.1:1/nodb")
    assert "s3cret-pw" not in str(err.value) and "someone@127.0.0.1:1/nodb" in str(err.value)


def test_meta_of_a_shared_log_is_write_once(pg_dsn):  # noqa: F811
    s = PostgresStorage(pg_dsn, schema="meta_once")
    try:
        s.set_meta("verifier_key", "key A")
        s.set_meta("verifier_key", "key A")
        with pytest.raises(LogError, match="already has verifier_key = 'key A'"):
            s.set_meta("verifier_key", "key B")
    finally:
        s.close()


def _take_over(b: PostgresStorage) -> float:
    """b's turn on the empty log, once the server has cut the stuck holder off; the seconds it waited."""
    t0 = time.monotonic()
    with b.sequencer_turn(0, EMPTY_ROOT) as head:  # waits for the row, gets it once the server cuts a off
        waited = time.monotonic() - t0
        assert (head.size, head.root) == (0, EMPTY_ROOT)  # nothing of a's batch is there
        b.append(0, [b"from b"], [leaf_hash(b"from b")], [])
        head.advance(1, root_hash([leaf_hash(b"from b")]))
    return waited


def test_a_sequencer_stuck_in_its_transaction_is_cut_off_and_another_takes_over(pg_dsn):  # noqa: F811
    lease = 0.5
    a = PostgresStorage(pg_dsn, schema="stuck", lease_s=lease)
    b = PostgresStorage(pg_dsn, schema="stuck", lease_s=lease, lease_wait_s=30)
    entered, outcome = threading.Event(), {}

    def stuck_sequencer():
        try:
            with a.sequencer_turn(0, EMPTY_ROOT) as head:
                a.append(0, [b"from a"], [leaf_hash(b"from a")], [])
                head.advance(1, leaf_hash(b"from a"))
                entered.set()
                time.sleep(4 * lease)  # hangs inside the transaction, holding the head row
        except LogError as exc:
            outcome["a"] = exc

    t = threading.Thread(target=stuck_sequencer)
    t.start()
    try:
        assert entered.wait(30)
        waited = _take_over(b)
        holder, left = b.lease()
        assert holder == b.holder and 0 < left <= lease  # b holds the lease for one lease time after its commit
        t.join(30)
        assert lease * 0.5 < waited < lease * 3 + 2, waited
        assert "nothing was written" in str(outcome["a"])
        assert b.size() == 1 and b.entry(0) == b"from b" and a.entry(0) == b"from b"
    finally:
        t.join(30)
        a.close()
        b.close()
    assert PostgresStorage(pg_dsn, schema="stuck").lease() == (None, 0.0)  # close() handed it back


def test_a_sequencer_cut_off_in_the_middle_of_a_statement_loses_the_row_within_a_lease(pg_dsn):  # noqa: F811
    """The holder's session stops receiving in the middle of a large INSERT of its turn. The writer sends
    each statement as one simple-protocol message, so the server holds an idle transaction and cuts it
    off after one lease. (Through the extended protocol the same cut fell between Parse and Bind, where
    PostgreSQL arms no timeout: the head row stayed locked for as long as the client lived.)"""
    lease = 0.5
    proxy = FreezingProxy(pg_dsn)
    a = PostgresStorage(proxy.dsn, schema="cut", lease_s=lease)
    b = PostgresStorage(pg_dsn, schema="cut", lease_s=lease, lease_wait_s=30)
    entries = [bytes([i]) * 1024 for i in range(32)]  # one INSERT of about 64 KB of hex
    def cut_sequencer():
        with a.sequencer_turn(0, EMPTY_ROOT) as head:
            a.append(0, entries, [leaf_hash(e) for e in entries], [])
            head.advance(len(entries), root_hash([leaf_hash(e) for e in entries]))

    t, outcome = proxy.start_cut(cut_sequencer, "INSERT")
    try:
        waited = _take_over(b)
        assert waited < lease * 3 + 2, waited
        t.join(30)
        assert isinstance(outcome.get("error"), LogError) and "nothing was written" in str(outcome["error"]), outcome
        assert b.size() == 1 and b.entry(0) == b"from b"
    finally:
        t.join(30)
        b.close()
        proxy.close()
