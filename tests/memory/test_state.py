"""States: content addressing, type rules, and how labels propagate."""

import pytest

from fieldprint.errors import StateError
from fieldprint.ledger.entry import StateEntry
from fieldprint.memory.state import (
    STATE_TYPES,
    Integrity,
    Label,
    State,
    TensorRef,
    content_digest,
    new_state,
)


def committed(state: State, index: int = 0) -> State:
    return state.committed(index)


def root(text="the sky is blue", state_type="user_input", taint=(), sources=("user:alice",), time_ns=1):
    return committed(new_state(state_type, session="s-1", creator="agent", text=text, sources=sources, taint=taint,
                               time_ns=time_ns))


def test_state_id_is_a_content_address():
    a = root(time_ns=5)
    b = root(time_ns=5)
    assert a.state_id == b.state_id and a.state_id.startswith("blake3:")
    assert a.compute_id() == a.state_id
    for other in (root(text="the sky is grey", time_ns=5), root(time_ns=6), root(sources=("user:bob",), time_ns=5),
                  root(state_type="observation", time_ns=5), root(taint=("web",), time_ns=5)):
        assert other.state_id != a.state_id


def test_entry_round_trips_through_the_ledger_encoding():
    a = root(taint=("web:example.com",))
    entry = a.entry()
    assert StateEntry.decode(entry.encode()) == entry
    assert entry.taint == ("web:example.com",) and entry.digest == content_digest(a.text, None)


def test_tensor_content_binds_text_and_tensor():
    t = TensorRef("blake3:" + "11" * 32, "blake3:" + "22" * 32)
    only = new_state("observation", session="s", creator="c", tensor=t, sources=("cam",), time_ns=1)
    both = new_state("observation", session="s", creator="c", tensor=t, text="x", sources=("cam",), time_ns=1)
    assert only.digest == t.digest and only.entry().profile == t.profile
    assert both.digest not in (t.digest, content_digest("x", None))


def test_derived_label_is_the_join_of_parents():
    clean = root(text="a")
    dirty = root(text="b", taint=("web:evil.example",), sources=())
    summary = new_state("summary", session="s-1", creator="agent", text="a and b", parents=[clean, dirty], time_ns=2)
    assert summary.label.integrity is Integrity.UNTRUSTED
    assert summary.label.taint == {"web:evil.example"}
    assert summary.label.sources == {"user:alice", "web:evil.example"}
    # A summary of a summary of a tainted state is still tainted: nothing removes a source.
    again = new_state("summary", session="s-1", creator="agent", text="ab", parents=[committed(summary, 3)],
                      sources=("model",), time_ns=3)
    assert again.label.tainted and "model" in again.label.sources
    assert Label.join([clean.label]).integrity is Integrity.TRUSTED


@pytest.mark.parametrize("parent_type,child_type", [
    ("tool_output", "instruction"), ("observation", "instruction"), ("summary", "instruction"), ("belief", "instruction"),
])
def test_data_never_becomes_an_instruction(parent_type, child_type):
    parent = root(state_type=parent_type, text="run rm -rf /") if STATE_TYPES[parent_type].root else None
    if parent is None:
        base = root()
        parent = committed(new_state(parent_type, session="s-1", creator="a", text="x", parents=[base], time_ns=2), 1)
    with pytest.raises(StateError, match="may become"):
        new_state(child_type, session="s-1", creator="agent", text="do it", parents=[parent], time_ns=3)


def test_user_input_may_become_an_instruction():
    s = new_state("instruction", session="s-1", creator="agent", text="book it", parents=[root()], time_ns=2)
    assert not s.label.tainted


@pytest.mark.parametrize("kwargs,match", [
    ({"state_type": "memo", "text": "x", "sources": ("u",)}, "unknown state type"),
    ({"state_type": "belief", "sources": ("u",)}, "needs content"),
    ({"state_type": "summary", "text": "x", "sources": ("u",)}, "give at least one parent"),
    ({"state_type": "belief", "text": "x"}, "at least one source"),
    ({"state_type": "belief", "text": "x", "sources": ("bad source",)}, "source"),
    ({"state_type": "belief", "text": "x", "sources": ("u",), "time_ns": -1}, "time_ns"),
    ({"state_type": "belief", "text": b"x", "sources": ("u",)}, "must be a str"),
    ({"state_type": "belief", "text": "\ud800", "sources": ("u",)}, "lone surrogates"),
    ({"state_type": "belief", "tensor": "blake3:00", "sources": ("u",)}, "TensorRef"),
    ({"state_type": "belief", "text": "x" * (1 << 20 + 1), "sources": ("u",)}, "over"),
])
def test_bad_input_is_a_clear_state_error(kwargs, match):
    state_type = kwargs.pop("state_type")
    with pytest.raises(StateError, match=match):
        new_state(state_type, session="s-1", creator="agent", **kwargs)


def test_roots_cannot_have_parents_and_parents_must_be_committed():
    with pytest.raises(StateError, match="cannot have parents"):
        new_state("observation", session="s", creator="c", text="x", parents=[root()], time_ns=1)
    uncommitted = new_state("user_input", session="s", creator="c", text="y", sources=("u",), time_ns=1)
    with pytest.raises(StateError, match="not committed"):
        new_state("belief", session="s", creator="c", text="x", parents=[uncommitted], time_ns=2)
    with pytest.raises(StateError, match="tensor digest"):
        TensorRef("nope", "blake3:" + "00" * 32)


def test_contracts_hold_under_python_dash_o():
    # These were asserts, which `python -O` strips; they are StateErrors now.
    with pytest.raises(StateError, match="not among its sources"):
        Label(frozenset(), frozenset({"web:evil"}))
    with pytest.raises(StateError, match="leaf index"):
        root().committed(-1)
    with pytest.raises(StateError, match="leaf index"):
        root().committed(True)


@pytest.mark.parametrize("kwargs,match", [
    ({"sources": "user"}, r"sources must be a list or tuple, got str 'user'"),
    ({"taint": "web:forum"}, r"taint sources must be a list or tuple, got str 'web:forum'"),
    ({"sources": b"user"}, "got bytes"),
    ({"sources": ("user",), "text": ""}, "text is empty"),
])
def test_string_label_collections_and_empty_text_are_refused(kwargs, match):
    kwargs = {"text": "x", **kwargs}
    with pytest.raises(StateError, match=match):
        new_state("observation", session="s", creator="c", time_ns=1, **kwargs)
    # Sets are collections too (order does not matter for labels).
    assert new_state("observation", session="s", creator="c", text="x", sources={"u"}, time_ns=1).label.sources == {"u"}
