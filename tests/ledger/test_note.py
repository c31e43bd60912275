"""Signed notes and checkpoints: the Go reference vector byte for byte, and every malformed input."""

import base64
import json
import os

import pytest

from fieldprint.errors import NoteError
from fieldprint.ledger.note import (
    Checkpoint,
    Signer,
    Verifier,
    generate_key,
    open_note,
    sign_note,
)


@pytest.fixture(scope="module")
def go_vector(testdata_dir):
    with open(os.path.join(testdata_dir, "note", "go-sumdb-note-vector.json")) as f:
        return json.load(f)


def test_go_vector_byte_for_byte(go_vector):
    note = sign_note(go_vector["text"], go_vector["signer_key"])
    assert note.encode() == go_vector["note"].encode()
    assert open_note(go_vector["note"], [go_vector["verifier_key"]]) == go_vector["text"]
    assert Signer.parse(go_vector["signer_key"]).verifier_key() == go_vector["verifier_key"]


def test_go_vector_tampered_is_rejected(go_vector):
    note = go_vector["note"]
    with pytest.raises(NoteError, match="invalid signature"):
        open_note(note.replace("cryptography", "Cryptography"), [go_vector["verifier_key"]])
    other_signer, other_verifier = generate_key("PeterNeumann")
    with pytest.raises(NoteError, match="no signature by any"):
        open_note(note, [other_verifier])
    with pytest.raises(NoteError, match="no signature by any"):
        open_note(note, [])


def test_generated_keys_round_trip():
    signer, verifier = generate_key("example.com/log")
    assert signer.startswith("PRIVATE+KEY+example.com/log+") and verifier.startswith("example.com/log+")
    assert Signer.parse(signer).verifier_key() == verifier
    note = sign_note("hello\nworld\n", signer)
    assert open_note(note, [verifier]) == "hello\nworld\n"
    # A second signature by an unknown key is ignored; one known valid signature suffices.
    s2, v2 = generate_key("other")
    both = note + sign_note("hello\nworld\n", s2).split("\n\n")[1]
    assert open_note(both, [verifier]) == "hello\nworld\n"
    assert open_note(both, [v2]) == "hello\nworld\n"


@pytest.mark.parametrize(
    "key",
    [
        "",
        "name+1234abcd",
        "name+zzzzzzzz+AQ==",
        "name+12345678+!!!",
        "na me+12345678+" + base64.b64encode(b"\x01" + bytes(32)).decode(),
        "name+12345678+" + base64.b64encode(b"\x02" + bytes(32)).decode(),
        "name+12345678+" + base64.b64encode(b"\x01" + bytes(31)).decode(),
        "name+12345678+" + base64.b64encode(b"\x01" + bytes(32)).decode(),  # key id does not match
        "PRIVATE+KEY+name+12345678+" + base64.b64encode(b"\x01" + bytes(32)).decode(),
        None,
    ],
)
def test_malformed_verifier_keys(key):
    with pytest.raises(NoteError):
        Verifier.parse(key)


def test_malformed_signer_keys(go_vector):
    with pytest.raises(NoteError):
        Signer.parse(go_vector["verifier_key"])
    with pytest.raises(NoteError, match="does not match"):
        Signer.parse(go_vector["signer_key"].replace("c74f20a3", "c74f20a4"))
    with pytest.raises(NoteError):
        generate_key("bad name")
    with pytest.raises(NoteError):
        generate_key("a+b")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda n: n.replace("\n\n", "\n"),  # no signature block
        lambda n: n[:-1],  # no final newline
        lambda n: n.replace("\u2014 ", "- "),  # wrong prefix
        lambda n: n.replace("PeterNeumann x08", "PeterNeumann  x08"),
        lambda n: n.replace("x08go", "x08g!"),  # bad base64
        lambda n: n + "\u2014 PeterNeumann AAAA\n",  # signature too short
        lambda n: n.replace("problem,", "problem,\x07"),  # control character
        lambda n: n.split("\n\n")[0] + "\n\n",  # empty signature block
    ],
)
def test_malformed_notes(go_vector, mutate):
    with pytest.raises(NoteError):
        open_note(mutate(go_vector["note"]), [go_vector["verifier_key"]])


def test_sign_rejects_bad_text():
    signer, _ = generate_key("x")
    with pytest.raises(NoteError, match="ending in a newline"):
        sign_note("no newline", signer)
    with pytest.raises(NoteError, match="control"):
        sign_note("a\tb\n", signer)


def test_checkpoint_parse_and_reject():
    signer, verifier = generate_key("example.com/log")
    root = bytes(range(32))
    note = sign_note(Checkpoint.body("example.com/log", 42, root), signer)
    cp = Checkpoint.open(note, [verifier], origin="example.com/log")
    assert (cp.origin, cp.size, cp.root_hash, cp.note) == ("example.com/log", 42, root, note)
    b64 = base64.b64encode(root).decode()
    for body in [
        "example.com/log\n42\n",
        "\n42\n" + b64 + "\n",
        "example.com/log\n042\n" + b64 + "\n",
        "example.com/log\n-1\n" + b64 + "\n",
        "example.com/log\n42\n" + base64.b64encode(root[:31]).decode() + "\n",
    ]:
        with pytest.raises(NoteError):
            Checkpoint.open(sign_note(body, signer), [verifier], origin="example.com/log")
    # Extension lines after the root are allowed by C2SP tlog-checkpoint.
    assert Checkpoint.open(sign_note(Checkpoint.body("o", 1, root) + "ext\n", signer), [verifier], origin="o").size == 1


def test_checkpoint_of_another_origin_is_refused():
    # The same key signs for two logs: a valid signature does not make the other log's checkpoint ours.
    signer, verifier = generate_key("example.com/log")
    root = bytes(range(32))
    other = sign_note(Checkpoint.body("other.example/another-log", 7, root), signer)
    with pytest.raises(NoteError, match="'other.example/another-log', expected 'example.com/log'"):
        Checkpoint.open(other, [verifier], origin="example.com/log")
    assert Checkpoint.open(other, [verifier], origin="other.example/another-log").size == 7
    with pytest.raises(TypeError):
        Checkpoint.open(other, [verifier])  # the origin is required: there is no default to forget
    for bad in ("", None, 3):
        with pytest.raises(NoteError, match="expected origin"):
            Checkpoint.open(other, [verifier], origin=bad)
