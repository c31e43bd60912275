"""Two engines on one PostgreSQL log and memory: what one remembers, the other promotes and proves."""

import pytest
from pg import import_psycopg, pg_dsn  # noqa: F401  (pg_dsn: a module fixture, a fresh database)

import_psycopg()

from fieldprint.engine.engine import Engine, EngineConfig  # noqa: E402
from fieldprint.engine.receipt import verify_receipt  # noqa: E402
from fieldprint.engine.runner import RunnerConfig  # noqa: E402
from fieldprint.engine.sequence import SamplingParams  # noqa: E402

pytestmark = pytest.mark.slow  # two SmolLM2 engines on the CPU


def test_two_engines_share_one_log_and_memory(pg_dsn, tmp_path):  # noqa: F811
    import shutil

    config = EngineConfig(runner=RunnerConfig(cpu_cache_tokens=2048, anchor_blocks=64, max_model_len=512, max_anchor_len=512))
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    with Engine("smollm2", data_dir=str(first_dir), config=config, database=pg_dsn) as first:
        fact = first.memory.pacemaker.add("user_input", session="shared", creator="user", sources=["user"],
                                         text="Ada is vegetarian and allergic to peanuts.")
        log_key = first.memory.log_key
        first.new_session("ada")  # a session begun here, continued and rolled back on the other engine
        turn_one = first.generate("Hello, I am Ada.", greedy, session="ada")[0]
        first.generate("I live in Lyon.", greedy, session="ada")
    second_dir.mkdir()
    for name in ("ledger.key", "ledger.pub", "operator.key", "operator.pub"):  # every engine holds the keys
        shutil.copy(first_dir / name, second_dir / name)
    with Engine("smollm2", data_dir=str(second_dir), config=config, database=pg_dsn) as second:
        out = second.generate("What should I cook for Ada?", SamplingParams(max_tokens=8), anchors=[fact.state_id])[0]
        receipt = second.bind(out.receipt)
        assert out.anchors == [fact.state_id]
        report = verify_receipt(receipt, log_key)
        assert report.bound and report.anchors == [fact.state_id]
        assert second.memory.log.size >= 3  # the fact, the anchor set's K/V entry, the generation
        # The session the first engine served, with its two turns and their K/V commits (stored as they landed).
        turns = second.memory.session("ada").turns
        assert len(turns) == 2 and all(t.kv_index is not None for t in turns)
        third = second.generate("What is my name?", greedy, session="ada")[0]
        assert len(third.receipt["prompt"]["token_ids"]) > len(turn_one.receipt["prompt"]["token_ids"]) + 10
        back = second.rollback("ada", turns=2)
        assert back["to_turn"] == 1 and back["kv_commit"] == turns[0].kv_index
