"""A rollback's withdrawals survive a restart; a damaged record of them is refused, not ignored."""

import pytest
from turns import memory, record_turn

from fieldprint.engine.memory import WITHDRAWN_FILE
from fieldprint.errors import EngineError
from fieldprint.ledger.entry import decode_entry


def test_withdrawn_states_stay_withdrawn_after_reopening(tmp_path):
    with memory(tmp_path) as mem:
        mem.new_session("alice")
        kept = record_turn(mem, "alice", "My dog is called Rex.")
        dropped = record_turn(mem, "alice", "My cat is called Tom.")
        result = mem.rollback("alice")
        assert decode_entry(mem.log.entry(result["log_index"]))["withdrawn"] == [dropped.user_state, dropped.output_state]
    with memory(tmp_path) as again:
        assert {dropped.user_state, dropped.output_state} <= again.withdrawn
        assert kept.user_state not in again.withdrawn


def test_a_damaged_withdrawn_file_is_refused(tmp_path):
    memory(tmp_path).close()
    (tmp_path / WITHDRAWN_FILE).write_text('{"not": "a list"}')
    with pytest.raises(EngineError, match="damaged"):
        memory(tmp_path)
    (tmp_path / WITHDRAWN_FILE).write_text("[]")  # the refused open released the log: it opens again at once
    memory(tmp_path).close()


def test_sessions_survive_a_restart_and_can_still_be_rolled_back(tmp_path):
    with memory(tmp_path) as mem:
        mem.new_session("alice")
        first = record_turn(mem, "alice", "My dog is called Rex.")
        second = record_turn(mem, "alice", "My cat is called Tom.")
    with memory(tmp_path) as mem:
        alice = mem.session("alice")
        assert [t.user_state for t in alice.turns] == [first.user_state, second.user_state]
        assert [m["content"] for m in alice.history][::2] == ["My dog is called Rex.", "My cat is called Tom."]
        with pytest.raises(EngineError, match="already exists"):
            mem.new_session("alice")
        result = mem.rollback("alice")
        assert result["withdrawn"] == [second.user_state, second.output_state]
    with memory(tmp_path) as mem:
        assert len(mem.session("alice").turns) == 1 and second.user_state in mem.withdrawn


def test_a_damaged_sessions_file_is_refused(tmp_path):
    from fieldprint.engine.memory import SESSIONS_FILE

    memory(tmp_path).close()
    (tmp_path / SESSIONS_FILE).write_text('{"alice": {"history": []}}')
    with pytest.raises(EngineError, match="damaged"):
        memory(tmp_path)


def test_a_damaged_profile_file_is_refused_and_kept(tmp_path):
    import os

    from fieldprint.engine.memory import load_or_calibrate_profile

    path = tmp_path / "profiles" / "blake3-00.k-channel-v-token.json"
    os.makedirs(path.parent)
    path.write_bytes(b'{"dqp": 1')
    with pytest.raises(EngineError, match="damaged"):
        load_or_calibrate_profile(str(tmp_path), "blake3:00", lambda: pytest.fail("must not recalibrate over it"),
                                  "k-channel-v-token")
    assert path.read_bytes() == b'{"dqp": 1'


def test_a_second_memory_on_the_same_folder_is_refused_and_the_first_keeps_working(tmp_path):
    from fieldprint.errors import LogError

    with memory(tmp_path) as first:
        with pytest.raises(LogError, match="another process is writing this log"):
            memory(tmp_path)
        first.new_session("alice")
        record_turn(first, "alice", "still served")
        assert first.log.size == 2


@pytest.mark.parametrize("name, text", [
    (WITHDRAWN_FILE, '{"through": 0, "states": "blake3:00"}'),  # a string where the list belongs
    (WITHDRAWN_FILE, '{"through": true, "states": []}'),  # a bool is no log size
    (WITHDRAWN_FILE, '{"through": 999999, "states": []}'),  # past the log's end: not this log's record
    ("sessions.json", '{"alice": {"history": "hello", "turns": []}}'),  # a string where the messages belong
    ("sessions.json", '{"alice": {"history": [], "turns": [{"user_state": 1, "output_state": "b", '
                      '"receipt_entry": "-", "kv_index": null}]}}'),
])
def test_stored_records_of_the_wrong_type_are_refused_not_taken(tmp_path, name, text):
    memory(tmp_path).close()
    (tmp_path / name).write_text(text)
    with pytest.raises(EngineError, match="damaged"):
        memory(tmp_path)


def test_the_withdrawn_cache_keeps_up_with_a_long_log_without_a_write_per_decision(tmp_path, monkeypatch):
    import json

    from fieldprint.engine import memory as memory_module

    monkeypatch.setattr(memory_module, "RESCAN_LIMIT", 5)
    with memory(tmp_path) as mem:
        mem.new_session("alice")
        for i in range(3):  # each turn logs two states: 6 entries, past the limit
            record_turn(mem, "alice", f"Fact number {i}.")
        mem.why_withdrawn("blake3:00")
        saved = json.loads((tmp_path / WITHDRAWN_FILE).read_text())
        assert saved == {"through": mem.log.size, "states": []}  # a restart re-reads nothing before this
        record_turn(mem, "alice", "One more fact.")
        mem.why_withdrawn("blake3:00")
        assert json.loads((tmp_path / WITHDRAWN_FILE).read_text()) == saved  # 2 entries later: no write


def test_a_turn_whose_session_file_cannot_be_written_leaves_the_session_as_it_was(tmp_path, monkeypatch):
    with memory(tmp_path) as mem:
        mem.new_session("alice")
        kept = record_turn(mem, "alice", "My dog is called Rex.")

        def full_disk(path, data, **kw):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr("fieldprint.engine.memory.replace_file", full_disk)
        with pytest.raises(OSError, match="No space left"):
            record_turn(mem, "alice", "My cat is called Tom.")
        with pytest.raises(OSError, match="No space left"):
            mem.new_session("bob")
        monkeypatch.undo()
        with pytest.raises(EngineError, match="'bob' does not exist"):
            mem.session("bob")
        assert [t.output_state for t in mem.session("alice").turns] == [kept.output_state]
    with memory(tmp_path) as mem:  # and so does the file
        assert [t.output_state for t in mem.session("alice").turns] == [kept.output_state]


def test_a_rollback_logged_but_not_written_to_the_session_still_holds(tmp_path, monkeypatch):
    """The log is the record: a rollback whose session write failed after it was logged is in force anyway."""
    with memory(tmp_path) as mem:
        mem.new_session("alice")
        kept = record_turn(mem, "alice", "My dog is called Rex.")
        dropped = record_turn(mem, "alice", "My cat is called Tom.")

        def full_disk(path, data, **kw):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr("fieldprint.engine.memory.replace_file", full_disk)
        with pytest.raises(OSError, match="No space left"):
            mem.rollback("alice")
        monkeypatch.undo()
        assert [t.output_state for t in mem.session("alice").turns] == [kept.output_state]
        after = record_turn(mem, "alice", "My horse is called Ed.")  # follows the kept turn, not the dropped one
        assert [t.output_state for t in mem.session("alice").turns] == [kept.output_state, after.output_state]
        assert dropped.user_state in mem.withdrawn
    with memory(tmp_path) as mem:
        assert [t.output_state for t in mem.session("alice").turns] == [kept.output_state, after.output_state]


def test_a_replayed_rollback_entry_cuts_nothing_more(tmp_path):
    """The same rollback bytes appended again (`ledger add --raw`) withdraw the same states, and nothing
    of what the session said after them."""
    with memory(tmp_path) as mem:
        mem.new_session("alice")
        kept = record_turn(mem, "alice", "My dog is called Rex.")
        record_turn(mem, "alice", "My cat is called Tom.")
        index = mem.rollback("alice")["log_index"]
        later = record_turn(mem, "alice", "My horse is called Ed.")
        withdrawn = set(mem.withdrawn)
        mem.log.add(mem.log.entry(index)).result()
        assert [t.output_state for t in mem.session("alice").turns] == [kept.output_state, later.output_state]
        assert mem.withdrawn == withdrawn


def test_a_session_named_by_anything_but_a_string_is_refused(tmp_path):
    with memory(tmp_path) as mem:
        mem.new_session("alice")
        for bad in (["alice"], None, 7):
            with pytest.raises(EngineError, match="session"):
                mem.session(bad)
            with pytest.raises(EngineError, match="session"):
                record_turn(mem, bad, "Hello.")
            with pytest.raises(EngineError, match="session"):
                mem.rollback(bad)
            with pytest.raises(EngineError, match="session"):
                mem.new_session(bad)
