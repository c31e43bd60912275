"""State store failures: an override logged but not stored is recoverable; SQLite's own rollback is not masked."""

import sqlite3

import pytest
from memory_harness import OPS_SIGNER, OPS_VERIFIER, ROGUE_SIGNER, make_memory

from fieldprint.errors import PolicyError, StateError
from fieldprint.memory.records import Override, Revocation, sign_record

HOUR = 3600 * 10**9


def add(m, state_type="observation", text="the API moved to v2", **kw):
    kw.setdefault("sources", () if kw.get("taint") else ("user:alice",))
    state = m.pm.add(state_type, text=text, session="s-1", creator="agent", time_ns=m.clock.now, **kw)
    m.sign()
    return state


def promote(m, state_id, signer=OPS_SIGNER):
    return sign_record(Override(state_id, "promote", "alice", "checked by hand", m.clock.now, m.clock.now + HOUR), signer)


def refuse_records(store, message):
    """Make the store's own SQLite refuse the next record insert (a trigger), as a locked or full disk would."""
    store.execute(f"CREATE TRIGGER refuse BEFORE INSERT ON records BEGIN SELECT RAISE(ABORT, '{message}'); END")


def accept_records(store):
    store.execute("DROP TRIGGER refuse")


def test_an_override_logged_but_not_stored_is_recovered_from_its_leaf(memory):
    web = add(memory, taint=("web:docs",))
    assert not memory.gate.is_anchor(web.state_id)
    note = promote(memory, web.state_id)
    refuse_records(memory.store, "database is locked")
    with pytest.raises(PolicyError, match=r"appended to the ledger at leaf 1.*database is locked.*recover_record\(1\)"):
        memory.pm.apply(note)
    accept_records(memory.store)
    # The leaf is in the ledger, but the gate reads records from the store: not counted yet.
    memory.sign()
    assert memory.log.size == 2 and memory.store.record_count() == 0
    assert not memory.gate.is_anchor(web.state_id)
    assert memory.pm.search("API moved", 3, anchors_only=True) == []
    d = memory.pm.recover_record(1)
    assert d.anchor and d.basis == "override" and d.record_index == 1
    assert memory.store.record_at(1).kind == "override" and memory.store.record_count() == 1
    # The vector index's flag was refreshed, as apply would have done.
    assert [h.state.state_id for h in memory.pm.search("API moved", 3, anchors_only=True)] == [web.state_id]
    # Recovering twice is harmless; nothing new is logged.
    assert memory.pm.recover_record(1).anchor and memory.store.record_count() == 1
    memory.log.flush()
    assert memory.log.size == 2
    # Applying the note again would log a copy; the gate refuses it, as the failed apply's message asked.
    with pytest.raises(PolicyError, match="already logged at leaf 1"):
        memory.pm.apply(note)


def test_a_revocation_logged_but_not_stored_is_recovered_with_its_target(memory):
    s = add(memory, "user_input", text="meet at noon")
    first = memory.gate.apply(promote(memory, s.state_id))
    note = sign_record(Revocation(s.state_id, "bob", "withdrawn", memory.clock.now, first.leaf_index), OPS_SIGNER)
    refuse_records(memory.store, "disk I/O error")
    with pytest.raises(PolicyError, match="leaf 2.*disk I/O error"):
        memory.gate.apply(note)
    accept_records(memory.store)
    memory.sign()
    assert memory.gate.explain(s.state_id).basis == "override"
    rec = memory.gate.recover_record(2)
    assert (rec.kind, rec.target_index) == ("revocation", first.leaf_index)
    d = memory.gate.explain(s.state_id)
    assert d.basis == "default" and any("withdrawn by a revocation" in c.detail for c in d.rejected)


def test_recovering_what_is_not_a_configured_override_is_refused(tmp_path):
    m = make_memory(str(tmp_path), override_keys=[OPS_VERIFIER])
    try:
        web = add(m, taint=("web:docs",))
        m.gate.apply(promote(m, web.state_id))  # leaf 1
        m.log.flush()
        before = m.snapshot()
        for leaf, match in ((0, "not an override or revocation"), (7, "cannot read leaf 7"), (-1, "non-negative")):
            with pytest.raises(PolicyError, match=match):
                m.gate.recover_record(leaf)
        # A validly logged override whose key is no longer configured is not stored again.
        m.store.execute("DELETE FROM records")
        m.gate.config.override_keys = []
        with pytest.raises(PolicyError, match="not signed by a configured override key"):
            m.gate.recover_record(1)
        assert m.store.record_count() == 0
        # A different record already stored at that leaf is not silently kept or replaced.
        m.gate.config.override_keys = [OPS_VERIFIER]
        from fieldprint.memory.store import PolicyRecord
        m.store.insert_record(PolicyRecord(1, "override", web.state_id, None, promote(m, web.state_id, ROGUE_SIGNER)))
        with pytest.raises(PolicyError, match="different record at leaf 1"):
            m.gate.recover_record(1)
        m.log.flush()
        assert m.log.size == before[0]
    finally:
        m.close()


class _FailingCommit:
    """A connection whose COMMIT fails after SQLite has already rolled back, as on SQLITE_FULL."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    @property
    def in_transaction(self) -> bool:
        return self.db.in_transaction

    def execute(self, sql, params=()):
        if sql == "COMMIT":
            self.db.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, params)

    def executemany(self, sql, rows):
        return self.db.executemany(sql, rows)


def test_a_commit_that_sqlite_already_rolled_back_raises_the_real_error(memory):
    add(memory, "user_input", text="meet at noon")
    memory.log.flush()
    stored, rows = len(memory.store), len(memory.vectors)
    real = memory.store._db
    memory.store._db = _FailingCommit(real)
    try:
        with pytest.raises(StateError, match="database or disk is full"):
            add(memory, "user_input", text="a new memory")
    finally:
        memory.store._db = real
    assert not real.in_transaction
    assert (len(memory.store), len(memory.vectors)) == (stored, rows)
    assert [h.state.text for h in memory.pm.search("a new memory", 5)] == ["meet at noon"]
    # The store still takes writes afterwards.
    add(memory, "user_input", text="after the failure")
    assert len(memory.store) == stored + 1


def test_the_log_argument_is_typed():
    import typing

    from fieldprint.ledger.log import TransparencyLog
    from fieldprint.memory import pacemaker, policy

    for cls in (policy.PromotionGate, pacemaker.Pacemaker):
        names = {**vars(pacemaker), **vars(policy), "TransparencyLog": TransparencyLog}  # as under TYPE_CHECKING
        hints = typing.get_type_hints(cls.__init__, names)
        assert hints["log"] is TransparencyLog, cls


def test_what_is_not_a_state_store_is_refused_by_name(tmp_path):
    from fieldprint.memory.store import SQLiteStateStore

    garbage = tmp_path / "states.db"
    garbage.write_bytes(b"not a database, just bytes " * 200)
    with pytest.raises(StateError, match="is not a state store"):
        SQLiteStateStore(garbage)
    assert garbage.read_bytes() == b"not a database, just bytes " * 200  # left as it was
    with pytest.raises(StateError, match="does not exist; create it first"):
        SQLiteStateStore(tmp_path / "no-such-folder" / "states.db")
    with pytest.raises(StateError, match="it is a folder"):
        SQLiteStateStore(tmp_path)


@pytest.mark.parametrize("sql,column", [
    ("UPDATE states SET parents = 'not json'", "parents"),
    ("UPDATE states SET sources = '[1, 2]'", "sources"),
    ("UPDATE states SET taint = '{}'", "taint"),
    ("UPDATE states SET time_ns = 'soon'", "time_ns"),
    ("UPDATE states SET leaf_index = 'first'", "leaf_index"),
    ("UPDATE states SET tensor_digest = 'blake3:00'", "tensor_digest"),
])
def test_a_damaged_row_is_a_state_error_naming_its_column(memory, sql, column):
    s = add(memory, "user_input", text="meet at noon")
    memory.store.execute(sql + " WHERE state_id = ?", (s.state_id,))
    with pytest.raises(StateError, match=f"stored row of state {s.state_id}.*damaged.*{column}"):
        memory.gate.explain(s.state_id)
    with pytest.raises(StateError, match=column):
        memory.store.get(s.state_id)


@pytest.mark.slow
def test_a_read_only_folder_is_read_and_every_write_is_a_state_error(tmp_path):
    from memory_harness import run_on_read_only_folder

    m = make_memory(str(tmp_path))
    s = add(m, "user_input", text="meet at noon")
    m.close()
    code = f"""
import os, numpy as np
from fieldprint.errors import StateError
from fieldprint.memory.store import PolicyRecord, SQLiteStateStore
from fieldprint.memory.vectors import LanceVectorStore

def attempt(name, fn):
    try:
        print(name, "ok", fn())
    except StateError as e:
        print(name, "StateError", e)

root = {str(tmp_path)!r}
store = SQLiteStateStore(os.path.join(root, "states.db"))
attempt("store-read", lambda: store.get({s.state_id!r}).text)
attempt("store-write", lambda: store.insert_record(PolicyRecord(9, "override", {s.state_id!r}, None, "x")))
attempt("store-new", lambda: SQLiteStateStore(os.path.join(root, "other.db")))
vectors = LanceVectorStore(os.path.join(root, "vectors"))
query = np.zeros(384, dtype=np.float32); query[0] = 1
attempt("vectors-read", lambda: len(vectors.search(query, 1)))
attempt("vectors-write", lambda: vectors.add(["blake3:" + "01" * 32], query[None], ["s"], ["belief"], [True]))
attempt("vectors-new", lambda: LanceVectorStore(os.path.join(root, "other-vectors")))
"""
    out = dict(line.split(" ", 1) for line in run_on_read_only_folder(str(tmp_path), code).splitlines())
    assert out["store-read"] == "ok meet at noon"
    assert out["vectors-read"] == "ok 1"
    assert out["store-write"].startswith("StateError the state store at") and "is read-only" in out["store-write"]
    assert out["store-new"].startswith("StateError cannot open the state store"), out["store-new"]
    for name in ("vectors-write", "vectors-new"):
        assert out[name].startswith("StateError the vector store at") and "read-only" in out[name], out[name]


def test_a_sequencer_that_returns_the_wrong_count_stores_nothing(memory):
    from fieldprint.memory.state import new_state

    state = new_state("user_input", session="s-1", creator="agent", text="x", sources=("u",), time_ns=1)
    with pytest.raises(StateError, match="returned 0 leaf indices for 1 states; nothing was stored"):
        memory.store.insert_committed([state], list)
    assert len(memory.store) == 0 and memory.store.get(state.state_id) is None


def test_the_layers_import_one_way():
    # store.py is storage only: it imports neither the gate nor the Pacemaker (no static cycle), and
    # the gate never imports the Pacemaker.
    import ast

    from fieldprint.memory import policy, store

    def imports(module) -> set[str]:
        tree = ast.parse(open(module.__file__, encoding="utf-8").read())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    assert not imports(store) & {"fieldprint.memory.policy", "fieldprint.memory.pacemaker"}
    assert "fieldprint.memory.pacemaker" not in imports(policy)
    assert "sqlite3" not in {n.names[0].name for n in ast.walk(ast.parse(open(policy.__file__).read()))
                             if isinstance(n, ast.Import)}
