"""A state a rollback withdrew is refused by the memory's gate itself, on every path, before and after a restart."""

import time

from turns import memory, record_turn

from fieldprint.engine.memory import Memory
from fieldprint.memory.records import Override, sign_record

HOUR = 3600 * 10**9



def _refused_as_withdrawn(mem: Memory, state_id: str) -> None:
    mem.ensure_checkpoint()
    d = mem.gate.explain(state_id)
    assert not d.anchor and d.verified and d.basis == "withdrawn", d
    assert "withdrawn by a session rollback" in d.sentence
    assert not mem.gate.is_anchor(state_id) and not mem.gate.eligible_as_writer(state_id)


def test_the_gate_refuses_withdrawn_states_even_with_a_signed_override(tmp_path):
    with memory(tmp_path) as mem:
        mem.new_session("alice")
        kept = record_turn(mem, "alice", "My dog is called Rex.")
        dropped = record_turn(mem, "alice", "My cat is called Tom.")
        mem.ensure_checkpoint()
        assert mem.gate.is_anchor(dropped.user_state)
        mem.rollback("alice")
        _refused_as_withdrawn(mem, dropped.user_state)
        now = time.time_ns()
        note = sign_record(Override(dropped.user_state, "promote", "ops", "bring it back", now, now + HOUR), mem.operator_key)
        d = mem.pacemaker.apply(note)  # logged and stored, but the withdrawal wins
        assert not d.anchor and d.basis == "withdrawn"
        hits = mem.pacemaker.search("My cat is called Tom.", 5, anchors_only=True)
        assert dropped.user_state not in {h.state.state_id for h in hits}
        assert mem.gate.is_anchor(kept.user_state)
    with memory(tmp_path) as again:
        _refused_as_withdrawn(again, dropped.user_state)  # withdrawn.json wires the reopened gate too
        assert again.gate.is_anchor(kept.user_state)


def test_withdrawals_are_read_back_from_the_log_when_the_cache_file_is_gone(tmp_path):
    with memory(tmp_path) as mem:
        mem.new_session("alice")
        record_turn(mem, "alice", "My dog is called Rex.")
        dropped = record_turn(mem, "alice", "My cat is called Tom.")
        mem.rollback("alice")
    (tmp_path / "withdrawn.json").unlink()  # the log stays the record: the set is rebuilt from its rollback entries
    with memory(tmp_path) as again:
        _refused_as_withdrawn(again, dropped.user_state)
        assert (tmp_path / "withdrawn.json").exists()


def test_malformed_or_raw_rollback_entries_withdraw_nothing_and_block_nothing(tmp_path):
    from fieldprint.ledger.entry import encode_entry

    with memory(tmp_path) as mem:
        mem.new_session("alice")
        turn = record_turn(mem, "alice", "My dog is called Rex.")
        mem.log.add(encode_entry("rollback", {"withdrawn": "not a list"})).result()
        mem.log.add(b'{"kind":"rollback", not json').result()  # raw bytes, as `ledger add --raw` may log
        mem.ensure_checkpoint()
        assert mem.gate.is_anchor(turn.user_state)  # decisions go on; nothing was withdrawn
