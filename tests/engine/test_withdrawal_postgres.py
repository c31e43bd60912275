"""Engines sharing one PostgreSQL log: a rollback by one withdraws its states for every one of them."""

import shutil

from pg import import_psycopg, pg_dsn  # noqa: F401  (pg_dsn: a module fixture, a fresh database)

import_psycopg()

from turns import record_turn  # noqa: E402

from fieldprint.engine.memory import Memory  # noqa: E402
from fieldprint.memory.embed import HashingEmbedderForTests  # noqa: E402


def test_a_rollback_by_one_engine_withdraws_its_states_for_the_others(pg_dsn, tmp_path):  # noqa: F811
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    first = Memory.open(str(first_dir), embedder=HashingEmbedderForTests(), database=pg_dsn)
    second_dir.mkdir()
    for name in ("ledger.key", "ledger.pub", "operator.key", "operator.pub"):  # every engine holds the keys
        shutil.copy(first_dir / name, second_dir / name)
    second = Memory.open(str(second_dir), embedder=HashingEmbedderForTests(), database=pg_dsn)
    try:
        first.new_session("alice")
        kept = record_turn(first, "alice", "My dog is called Rex.")
        dropped = record_turn(first, "alice", "My cat is called Tom.")
        first.ensure_checkpoint()
        assert second.gate.is_anchor(dropped.user_state)  # the other engine promotes it while it stands
        first.rollback("alice")
        d = second.gate.explain(dropped.user_state)  # no restart, no file shared: the log says so
        assert not d.anchor and d.basis == "withdrawn" and "withdrawn by a session rollback" in d.sentence
        assert second.gate.is_anchor(kept.user_state) and not second.gate.is_anchor(dropped.output_state)
    finally:
        second.close()
        first.close()
