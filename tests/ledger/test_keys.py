"""Key pairs on disk: created atomically, loaded back, half pairs and failures refused with what to do."""

import os
import stat

import pytest

from fieldprint.errors import LogError, NoteError
from fieldprint.ledger.keys import ensure_key_pair, key_paths
from fieldprint.ledger.note import Signer


def test_creates_then_loads_the_same_pair(tmp_path):
    signer, verifier = ensure_key_pair(tmp_path, "ledger", "example.org/log")
    key_file, pub_file = key_paths(tmp_path, "ledger")
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert Signer.parse(signer).verifier_key() == verifier
    assert ensure_key_pair(tmp_path, "ledger", "example.org/log") == (signer, verifier)
    assert sorted(os.listdir(tmp_path)) == ["ledger.key", "ledger.pub"]  # no temporary file left


@pytest.mark.parametrize("present", ["ledger.key", "ledger.pub"])
def test_half_pair_is_refused_and_names_the_file_to_remove(tmp_path, present):
    ensure_key_pair(tmp_path, "ledger", "example.org/log")
    missing = {"ledger.key": "ledger.pub", "ledger.pub": "ledger.key"}[present]
    os.remove(tmp_path / missing)
    with pytest.raises(NoteError, match=f"remove {tmp_path / present}"):
        ensure_key_pair(tmp_path, "ledger", "example.org/log")
    os.remove(tmp_path / present)  # what the message says to do
    ensure_key_pair(tmp_path, "ledger", "example.org/log")


def test_mismatched_pair_is_refused(tmp_path):
    ensure_key_pair(tmp_path, "a", "example.org/log")
    ensure_key_pair(tmp_path, "b", "example.org/log")
    os.replace(tmp_path / "b.pub", tmp_path / "a.pub")
    with pytest.raises(NoteError, match="not the verifier key"):
        ensure_key_pair(tmp_path, "a", "example.org/log")


def test_failure_before_publish_leaves_nothing(tmp_path):
    def fail(signer, verifier):
        assert os.listdir(tmp_path)  # the temporary files exist while the caller prepares
        raise LogError("simulated failure")

    with pytest.raises(LogError, match="simulated"):
        ensure_key_pair(tmp_path, "ledger", "example.org/log", before_publish=fail)
    assert os.listdir(tmp_path) == []
    ensure_key_pair(tmp_path, "ledger", "example.org/log")


def test_failed_link_leaves_no_half_pair(tmp_path, monkeypatch):
    real, calls = os.link, []

    def link(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "link", link)
    with pytest.raises(NoteError, match="nothing was kept"):
        ensure_key_pair(tmp_path, "ledger", "example.org/log")
    assert os.listdir(tmp_path) == []


def test_bad_name_creates_nothing(tmp_path):
    with pytest.raises(NoteError):
        ensure_key_pair(tmp_path, "ledger", "bad name")
    assert os.listdir(tmp_path) == []


def test_a_key_published_meanwhile_is_never_replaced(tmp_path):
    # Two creators racing: the second must not overwrite the first one's key (a rename would).
    def someone_else_publishes(signer, verifier):
        (tmp_path / "ledger.pub").write_text("the other process's key\n")

    with pytest.raises(NoteError, match="ledger.pub appeared while this key pair was being created"):
        ensure_key_pair(tmp_path, "ledger", "example.org/log", before_publish=someone_else_publishes)
    assert os.listdir(tmp_path) == ["ledger.pub"]
    assert (tmp_path / "ledger.pub").read_text() == "the other process's key\n"
