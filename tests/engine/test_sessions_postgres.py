"""Engines sharing one PostgreSQL memory share its sessions: any engine continues or rolls back any session."""

import shutil
import threading
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager

import pytest
from pg import FreezingProxy, import_psycopg, pg_dsn, seconds_blocked, stopped_writer  # noqa: F401  (pg_dsn: a module fixture, a fresh database)

import_psycopg()

from turns import memory, record_turn  # noqa: E402

from fieldprint.engine.commit import CommitResult  # noqa: E402
from fieldprint.engine.memory import Memory  # noqa: E402
from fieldprint.errors import EngineError  # noqa: E402
from fieldprint.memory.embed import HashingEmbedderForTests  # noqa: E402


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """One log key and one operator key for the module: its tests share one database, hence one log."""
    from fieldprint.config import DEFAULT_ORIGIN, LEDGER_KEY_STEM
    from fieldprint.engine.memory import OPERATOR_NAME, OPERATOR_STEM
    from fieldprint.ledger.keys import ensure_key_pair

    folder = tmp_path_factory.mktemp("keys")
    ensure_key_pair(folder, LEDGER_KEY_STEM, DEFAULT_ORIGIN)
    ensure_key_pair(folder, OPERATOR_STEM, OPERATOR_NAME)
    return folder


@contextmanager
def _engines(pg_dsn, keys, tmp_path, n=2, folders=None):  # noqa: F811
    """The memories of n engines on one database, each on its own data folder (or on `folders`) holding the
    shared keys; closed on the way out, last opened first."""
    with ExitStack() as stack:
        out = []
        for d in folders or [tmp_path / f"e{i}" for i in range(n)]:
            d.mkdir(exist_ok=True)
            for name in ("ledger.key", "ledger.pub", "operator.key", "operator.pub"):
                shutil.copy(keys / name, d / name)
            out.append(stack.enter_context(Memory.open(str(d), embedder=HashingEmbedderForTests(), database=pg_dsn)))
        yield out


def test_a_session_begun_on_one_engine_is_continued_and_rolled_back_on_another(pg_dsn, keys, tmp_path):  # noqa: F811
    with _engines(pg_dsn, keys, tmp_path) as (a, b):
        a.new_session("alice")
        with pytest.raises(EngineError, match="already exists"):
            b.new_session("alice")
        first = record_turn(a, "alice", "My dog is called Rex.")
        assert [m["content"] for m in b.session("alice").history] == ["My dog is called Rex.", "noted: My dog is called Rex."]
        second = record_turn(b, "alice", "My cat is called Tom.")
        assert [t.output_state for t in a.session("alice").turns] == [first.output_state, second.output_state]
        a.ensure_checkpoint()
        result = a.rollback("alice")  # a drops the turn b added
        assert result["withdrawn"] == [second.user_state, second.output_state]
        assert [t.output_state for t in b.session("alice").turns] == [first.output_state]
        assert b.gate.explain(second.user_state).basis == "withdrawn"
        with pytest.raises(EngineError, match="does not exist"):
            b.session("nobody")


def test_turns_added_by_two_engines_at_once_all_land(pg_dsn, keys, tmp_path):  # noqa: F811
    with _engines(pg_dsn, keys, tmp_path) as (a, b):
        a.new_session("bob")
        errors = []

        def add(mem, who):
            try:
                for i in range(6):
                    record_turn(mem, "bob", f"{who} says {i}")
            except Exception as e:  # noqa: BLE001  (reported by the assertion below)
                errors.append(e)

        threads = [threading.Thread(target=add, args=(m, w)) for m, w in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        s = a.session("bob")
        said = [m["content"] for m in s.history if m["role"] == "user"]
        assert sorted(said) == sorted(f"{w} says {i}" for w in "ab" for i in range(6)) and len(s.turns) == 12
        for w in "ab":  # each engine's own turns keep their order
            assert [x for x in said if x.startswith(w)] == [f"{w} says {i}" for i in range(6)]


def test_a_turns_commit_lands_for_every_engine_and_a_stale_rollback_is_refused(pg_dsn, keys, tmp_path, monkeypatch):  # noqa: F811
    with _engines(pg_dsn, keys, tmp_path) as (a, b):
        a.new_session("carol")
        kv = Future()
        turn = a.record_turn("carol", "Hello.", "Hi.", {"generation": {"entry": "-"}}, kv)
        assert b.session("carol").turns[0].kv_index is None  # not landed yet
        kv.set_result(CommitResult("carol", 41, b"", "", "", {}, {}))
        assert b.session("carol").turns[0].kv_index == 41 and a.kv_commit(turn) == 41
        record_turn(a, "carol", "Bye.")
        size = a.log.size
        # While b prepares its rollback, a adds a turn: b's rollback, prepared on what it read, is refused whole.
        real = b.kv_commit

        def meanwhile(t, timeout=60.0):
            record_turn(a, "carol", "One more.")
            return real(t, timeout)

        monkeypatch.setattr(b, "kv_commit", meanwhile)
        with pytest.raises(EngineError, match="changed .* while this rollback was prepared; nothing was rolled back"):
            b.rollback("carol")
        assert len(a.session("carol").turns) == 3 and a.log.size > size  # a's turn states, no rollback entry
        assert not [i for i in range(size, a.log.size) if b'"kind":"rollback"' in a.log.entry(i)]
        monkeypatch.undo()
        assert b.rollback("carol", turns=2)["kv_commit"] == 41  # back to the committed first turn


def test_a_folders_sessions_move_to_the_shared_database_once(pg_dsn, keys, tmp_path):  # noqa: F811
    with memory(tmp_path / "e0") as mem:
        mem.new_session("old")
        kept = record_turn(mem, "old", "Remember me.")
    with _engines(pg_dsn, keys, tmp_path) as (a, b):
        assert [t.output_state for t in b.session("old").turns] == [kept.output_state]
        record_turn(b, "old", "And then this.")
    assert sorted(p.name for p in (tmp_path / "e0").glob("sessions*")) == ["sessions.imported.json"]
    with _engines(pg_dsn, keys, tmp_path) as (a, b):  # opened again: the database holds the session, not the file
        assert len(a.session("old").turns) == 2


def test_a_damaged_session_row_is_refused_naming_it(pg_dsn, keys, tmp_path):  # noqa: F811
    import psycopg

    with _engines(pg_dsn, keys, tmp_path) as (a, b):
        a.new_session("erin")
        record_turn(a, "erin", "Hello.")
        with psycopg.connect(pg_dsn, autocommit=True) as db:
            db.execute("UPDATE memory.sessions SET record = '{\"history\": 1, \"turns\": []}' WHERE name = 'erin'")
        for mem in (a, b):
            with pytest.raises(EngineError, match="stored record of session 'erin' .* is damaged"):
                mem.session("erin")
            with pytest.raises(EngineError, match="damaged"):
                record_turn(mem, "erin", "Again.")


def test_engines_sharing_one_data_folder_keep_each_others_sessions(pg_dsn, keys, tmp_path):  # noqa: F811
    """N engines of one host on one folder (docs/scale-out.md): each one's sessions survive the others' writes."""
    folder = tmp_path / "shared"
    with _engines(pg_dsn, keys, tmp_path, folders=[folder, folder]) as (a, b):
        a.new_session("frank")
        b.new_session("grace")
        record_turn(a, "frank", "I am Frank.")
        record_turn(b, "grace", "I am Grace.")
    with _engines(pg_dsn, keys, tmp_path, folders=[folder]) as (c,):
        assert c.session("frank").history[0]["content"] == "I am Frank."
        assert c.session("grace").history[0]["content"] == "I am Grace."


def test_an_engine_killed_inside_a_session_change_leaves_it_unchanged_and_unlocked(pg_dsn, keys, tmp_path):  # noqa: F811
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    import psycopg

    with _engines(pg_dsn, keys, tmp_path, n=1) as (a,):
        a.new_session("hank")
        kept = record_turn(a, "hank", "Keep this.")
        code = textwrap.dedent(f"""
            import time
            from fieldprint.engine.sessions import PostgresSessions
            store = PostgresSessions({pg_dsn!r})
            def slow(s):
                s.turns.clear()
                s.history.clear()
                print("locked", flush=True)
                time.sleep(60)
            store.change("hank", slow)
        """)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert child.stdout.readline().strip() == "locked"  # it holds the row, its change not committed
            with psycopg.connect(pg_dsn, autocommit=True) as db:
                db.execute("SET lock_timeout = '300ms'")
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    db.execute("SELECT 1 FROM memory.sessions WHERE name = 'hank' FOR UPDATE")
            child.send_signal(signal.SIGKILL)
            child.wait()
        finally:
            child.kill()
            child.stdout.close()
        t = time.monotonic()
        after = record_turn(a, "hank", "And this.")  # the row lock went with the killed engine's connection
        assert time.monotonic() - t < 10
        assert [x.output_state for x in a.session("hank").turns] == [kept.output_state, after.output_state]


def test_an_engine_stopped_inside_a_session_change_holds_it_for_seconds_not_forever(pg_dsn, keys, tmp_path):  # noqa: F811
    """An engine SIGSTOPped while its change holds the session's row (a bound of 1 s in that process
    instead of 300): the server ends its transaction, its change is not applied, and the next turn lands."""
    with _engines(pg_dsn, keys, tmp_path, n=1) as (a,):
        a.new_session("ivan")
        kept = record_turn(a, "ivan", "Keep this.")
        code = f"""
import os, signal
from fieldprint.engine import sessions
from fieldprint.memory.pg_store import PgConnection
PgConnection.log_wait_idle_s = 1.0
def stop(s):
    s.turns.clear()
    print("stopping", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
sessions.PostgresSessions({pg_dsn!r}).change("ivan", stop)
"""
        with stopped_writer(code):
            waited, after = seconds_blocked(lambda: record_turn(a, "ivan", "And this."), 30)
        assert waited < 20
        assert [x.output_state for x in a.session("ivan").turns] == [kept.output_state, after.output_state]


def test_a_session_change_cut_off_mid_send_holds_the_row_only_for_its_bound(pg_dsn, monkeypatch):  # noqa: F811
    """A change whose statement (a 20 KB record) stops arriving halfway, as from an engine stopped
    between two of libpq's writes: the record goes as one simple-protocol message, so the server sees
    an idle transaction and ends it after the bound (1 s here); the other engine's change lands and
    the cut one is not applied. (With parameters the cut fell between extended-protocol messages,
    where no timeout is armed.)"""
    from fieldprint.engine.sessions import PostgresSessions
    from fieldprint.errors import FieldprintError
    from fieldprint.memory.pg_store import PgConnection

    monkeypatch.setattr(PgConnection, "log_wait_idle_s", 1.0)
    proxy = FreezingProxy(pg_dsn)
    store, cut = PostgresSessions(pg_dsn), PostgresSessions(proxy.dsn)
    store.create("judy")
    t, outcome = proxy.start_cut(lambda: cut.change("judy", lambda s: s.history.append(
        {"role": "user", "content": "x" * 20000})), "UPDATE")
    try:
        waited, _ = seconds_blocked(lambda: store.change("judy", lambda s: s.history.append(
            {"role": "user", "content": "short"})), 20)
        t.join(30)
        assert waited < 10 and isinstance(outcome.get("error"), FieldprintError), outcome
        assert [h["content"] for h in store.get("judy").history] == ["short"]
    finally:
        proxy.close()  # first: a cut-off session still holding its lock ends with its connection
        t.join(30)
        store.close()
        cut.close()


def test_a_session_record_written_as_a_sql_literal_reads_back_exactly(pg_dsn):  # noqa: F811
    """The record goes in as an SQL literal: quotes, backslashes, braces and SQL come back as they
    were; a NUL character (which JSONB cannot hold) is refused by name and changes nothing."""
    from fieldprint.engine.sessions import PostgresSessions
    from fieldprint.errors import StateError

    weird = "it's a \\ \"q\" {NULL,} $$ ;DROP TABLE sessions;-- ' E'x'"
    store = PostgresSessions(pg_dsn)
    store.create("kim")
    store.change("kim", lambda s: s.history.append({"role": "user", "content": weird}))
    assert store.get("kim").history == [{"role": "user", "content": weird}]
    with pytest.raises(StateError, match="could not change session 'kim'"):
        store.change("kim", lambda s: s.history.append({"role": "user", "content": "a\x00b"}))
    assert store.get("kim").history == [{"role": "user", "content": weird}]
    store.close()
