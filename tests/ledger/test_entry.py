import pytest

from fieldprint.canon import parse_digest, tag_digest
from fieldprint.errors import EntryError
from fieldprint.ledger.entry import (
    MAX_ENTRY_BYTES,
    StateEntry,
    decode_entry,
    encode_entry,
)

D1 = tag_digest("blake3", bytes(range(32)))
D2 = tag_digest("sha256", bytes(32))


def _state(**over):
    base = dict(state_id=D1, state_type="belief", digest=D2, profile=None, parents=(D2, D1, D2),
                taint=("web", "email"), session="s-1", time_ns=1_700_000_000_000_000_000)
    base.update(over)
    return StateEntry(**base)


def test_state_entry_round_trips_canonically():
    data = _state().encode()
    assert data.startswith(b'{"digest":"sha256:')
    back = StateEntry.decode(data)
    assert back.parents == tuple(sorted({D1, D2})) and back.taint == ("email", "web")
    assert back.encode() == data
    # the same logical record in another field order encodes to the same bytes
    assert _state(parents=(D1, D2), taint=("email", "web")).encode() == data


@pytest.mark.parametrize(
    "data, message",
    [
        (b'{"kind":"state", "v":1}', "canonical"),
        (b'{"kind":"state","v":2}', "version-1"),
        (b"\xff", "UTF-8"),
        (b'{"kind":"nope","v":1}', "kind"),
        (b'{"kind":"state","v":1,"x":1.5}', "floats"),
    ],
)
def test_decode_rejects_non_canonical_or_unknown(data, message):
    with pytest.raises(EntryError, match=message):
        decode_entry(data)


def test_oversize_and_bad_fields_rejected():
    with pytest.raises(EntryError, match="at most 65536"):
        encode_entry("override", {"note": "x" * MAX_ENTRY_BYTES})
    with pytest.raises(EntryError, match="32 bytes"):
        tag_digest("blake3", b"short")
    with pytest.raises(EntryError, match="algorithm"):
        parse_digest("md5:" + "00" * 16)
    with pytest.raises(EntryError, match="session"):
        _state(session="has space").encode()
    with pytest.raises(EntryError, match="time_ns"):
        _state(time_ns=-1).encode()
    with pytest.raises(EntryError, match="set 'v'"):
        encode_entry("state", {"v": 3})


@pytest.mark.parametrize("bad", [True, False, 1.0, "1"])
def test_time_ns_must_be_a_plain_integer(bad):
    with pytest.raises(EntryError, match="time_ns"):
        _state(time_ns=bad).encode()


def test_boolean_version_is_rejected():
    with pytest.raises(EntryError, match="version-1"):
        decode_entry(b'{"kind":"state","v":true}')
