import json
import os

import pytest

from fieldprint.cli import main
from fieldprint.demo import run_demo

pytestmark = pytest.mark.slow  # a real model answers twice, twice over (about 100 s on 2 cores)


def test_demo_answers_from_verified_memory_and_its_receipt_verifies_offline(tmp_path, capsys):
    lines = []
    receipt = run_demo(str(tmp_path), say=lines.append)
    text = "\n".join(lines)
    # the tainted forum post is retrieved but not promoted; the trusted memories are
    assert "not    tool_output" in text and "ANCHOR user_input" in text
    assert "with anchors:" in text and "without anchors:" in text
    assert "refused: anchor set" in text and "differs from what was committed" in text
    assert receipt["generation"]["bound"] is True
    assert len(receipt["anchors"]["states"]) == len(receipt["anchors"]["set"]["manifest"]["state_ids"]) >= 2

    path = str(tmp_path / "r.json")
    with open(path, "w") as f:
        json.dump(receipt, f)
    key = str(tmp_path / "ledger.pub")
    assert main(["verify", path, "--log-key", key]) == 0
    assert "bound: the log records this output" in capsys.readouterr().out
    # the same machine re-runs the greedy generation from the receipt alone: the same tokens, the same anchor bytes
    assert main(["verify", path, "--log-key", key, "--model", "smollm2", "--replay"]) == 0
    out = capsys.readouterr().out
    assert "replay: the same" in out and "bitwise equal to the committed ones" in out

    receipt["output"]["token_ids"][0] ^= 1  # a changed output no longer matches its logged digest
    with open(path, "w") as f:
        json.dump(receipt, f)
    assert main(["verify", path, "--log-key", key]) == 1
    assert "output digest differs" in capsys.readouterr().err

    # the console command on the same data: the log is proven append-only since the first run
    assert main(["demo", "--data-dir", str(tmp_path)]) == 0
    assert "append-only since the last run" in capsys.readouterr().out
    assert os.path.isdir(tmp_path / "anchor-sets")


def test_generate_goes_on_in_a_session_across_commands(tmp_path, capsys):
    """`fieldprint generate --session S` twice on one data folder (two runs of the command): the first
    creates the session, the second is its next turn, whose prompt carries the first (it was refused
    as 'already exists'); an invalid name is still refused."""
    data = str(tmp_path / "data")
    common = ["--data-dir", data, "--max-tokens", "4", "--json", "--session", "pets"]
    assert main(["generate", "My dog is called Rex.", *common]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["generate", "What is my dog called?", *common]) == 0
    second = json.loads(capsys.readouterr().out)
    prompts = []
    for out in (first, second):
        with open(out["receipt"]) as f:
            prompts.append(json.load(f)["prompt"]["token_ids"])
    assert len(prompts[1]) > len(prompts[0]) + 5
    assert main(["generate", "Hi.", "--data-dir", data, "--max-tokens", "2", "--session", "no spaces"]) == 1
    assert "session" in capsys.readouterr().err
