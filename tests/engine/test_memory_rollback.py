"""A rollback's withdrawals survive a restart; a damaged record of them is refused, not ignored."""

import pytest

from fieldprint.engine.memory import WITHDRAWN_FILE, Memory
from fieldprint.errors import EngineError
from fieldprint.ledger.entry import decode_entry
from fieldprint.memory.embed import HashingEmbedderForTests


def _turn(mem: Memory, session: str, text: str):
    return mem.record_turn(session, text, f"noted: {text}", {"generation": {"entry": "-"}}, None)


def test_withdrawn_states_stay_withdrawn_after_reopening(tmp_path):
    mem = Memory.open(str(tmp_path), embedder=HashingEmbedderForTests())
    try:
        mem.new_session("alice")
        kept = _turn(mem, "alice", "My dog is called Rex.")
        dropped = _turn(mem, "alice", "My cat is called Tom.")
        result = mem.rollback("alice")
        assert decode_entry(mem.log.entry(result["log_index"]))["withdrawn"] == [dropped.user_state, dropped.output_state]
    finally:
        mem.close()
    again = Memory.open(str(tmp_path), embedder=HashingEmbedderForTests())
    try:
        assert {dropped.user_state, dropped.output_state} <= again.withdrawn
        assert kept.user_state not in again.withdrawn
    finally:
        again.close()


def test_a_damaged_withdrawn_file_is_refused(tmp_path):
    Memory.open(str(tmp_path), embedder=HashingEmbedderForTests()).close()
    (tmp_path / WITHDRAWN_FILE).write_text('{"not": "a list"}')
    with pytest.raises(EngineError, match="damaged"):
        Memory.open(str(tmp_path), embedder=HashingEmbedderForTests())
    (tmp_path / WITHDRAWN_FILE).write_text("[]")  # the refused open released the log: it opens again at once
    Memory.open(str(tmp_path), embedder=HashingEmbedderForTests()).close()


def test_sessions_survive_a_restart_and_can_still_be_rolled_back(tmp_path):
    mem = Memory.open(str(tmp_path), embedder=HashingEmbedderForTests())
    try:
        mem.new_session("alice")
        first = _turn(mem, "alice", "My dog is called Rex.")
        second = _turn(mem, "alice", "My cat is called Tom.")
    finally:
        mem.close()
    mem = Memory.open(str(tmp_path), embedder=HashingEmbedderForTests())
    try:
        alice = mem.sessions["alice"]
        assert [t.user_state for t in alice.turns] == [first.user_state, second.user_state]
        assert [m["content"] for m in alice.history][::2] == ["My dog is called Rex.", "My cat is called Tom."]
        with pytest.raises(EngineError, match="already exists"):
            mem.new_session("alice")
        result = mem.rollback("alice")
        assert result["withdrawn"] == [second.user_state, second.output_state]
    finally:
        mem.close()
    mem = Memory.open(str(tmp_path), embedder=HashingEmbedderForTests())
    try:
        assert len(mem.sessions["alice"].turns) == 1 and second.user_state in mem.withdrawn
    finally:
        mem.close()


def test_a_damaged_sessions_file_is_refused(tmp_path):
    from fieldprint.engine.memory import SESSIONS_FILE

    Memory.open(str(tmp_path), embedder=HashingEmbedderForTests()).close()
    (tmp_path / SESSIONS_FILE).write_text('{"alice": {"history": []}}')
    with pytest.raises(EngineError, match="damaged"):
        Memory.open(str(tmp_path), embedder=HashingEmbedderForTests())


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

    first = Memory.open(str(tmp_path), embedder=HashingEmbedderForTests())
    try:
        with pytest.raises(LogError, match="another process is writing this log"):
            Memory.open(str(tmp_path), embedder=HashingEmbedderForTests())
        first.new_session("alice")
        _turn(first, "alice", "still served")
        assert first.log.size == 2
    finally:
        first.close()
