import base64
import json

import pytest

from fieldprint.cli import main
from fieldprint.demo import run_demo
from fieldprint.errors import ProofError
from fieldprint.ledger.entry import StateEntry
from fieldprint.ledger.receipt import verify_bundle


def test_demo_runs_twice_and_its_receipts_verify_offline(tmp_path, capsys):
    lines = []
    first = run_demo(str(tmp_path), say=lines.append)
    assert main(["demo", "--data-dir", str(tmp_path)]) == 0  # the console command, on the same data
    out = capsys.readouterr().out
    assert "append-only since the last run" in out and "forged override refused" in out

    key = first["log_verifier_key"]
    kinds = set()
    for pair in first["anchors"]:
        verify_bundle(pair["state"], key)
        verify_bundle(pair["kv"], key)
        state = StateEntry.decode(base64.b64decode(pair["state"]["entry"]))
        kv = StateEntry.decode(base64.b64decode(pair["kv"]["entry"]))
        assert kv.parents == (state.state_id,)  # the K/V commit derives from the anchor state
        kinds.add(state.state_type)
    # tool outputs are never anchors; the overridden summary is
    assert kinds == {"instruction", "user_input", "summary", "belief"}

    tampered = json.loads(json.dumps(first["anchors"][0]["state"]))
    tampered["index"] += 1
    with pytest.raises(ProofError):
        verify_bundle(tampered, key)


def test_demo_key_pair_is_created_once_and_a_half_pair_is_refused(tmp_path):
    import os

    from fieldprint.demo import _key_pair
    from fieldprint.errors import NoteError

    pair = _key_pair(str(tmp_path), "operator", "fieldprint.local/operator")
    assert _key_pair(str(tmp_path), "operator", "fieldprint.local/operator") == pair
    os.remove(tmp_path / "operator.pub")  # as a crash between the two files used to leave it
    with pytest.raises(NoteError, match="remove"):
        _key_pair(str(tmp_path), "operator", "fieldprint.local/operator")
