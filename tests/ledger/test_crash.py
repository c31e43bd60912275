"""Crash safety: a child adding concurrently is SIGKILLed at random moments, then the log is reopened."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from fieldprint.ledger.log import TransparencyLog
from fieldprint.ledger.merkle import verify_consistency
from fieldprint.ledger.note import generate_key

CHILD = os.path.join(os.path.dirname(__file__), "crash_child.py")
KILLS = 22


def _resolved(path):
    """Complete lines only: a kill can cut the last write short."""
    out = {}
    if not os.path.exists(path):
        return out
    with open(path, "rb") as f:
        for line in f.read().split(b"\n")[:-1]:
            idx, hexdata = line.split(b" ")
            assert int(idx) not in out, f"index {int(idx)} was handed out twice"
            out[int(idx)] = bytes.fromhex(hexdata.decode())
    return out


def _drop_torn_tail(path):
    """Cut a line the last kill left half-written, so the next child's first line starts clean."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


@pytest.mark.slow
def test_sigkill_at_random_moments(tmp_path):
    signer, verifier = generate_key("crash.test/log")
    key_file, db, results = tmp_path / "key", str(tmp_path / "l.sqlite"), str(tmp_path / "resolved")
    key_file.write_text(signer)
    rng = random.Random(1234)
    seen_roots: dict[int, bytes] = {}
    progress = []
    for round_ in range(KILLS):
        _drop_torn_tail(results)
        before = os.path.getsize(results) if os.path.exists(results) else 0
        child = subprocess.Popen([sys.executable, CHILD, db, str(key_file), results, f"r{round_}"])
        # Kill at a random moment: sometimes during start-up or recovery, mostly while adding.
        if rng.random() < 0.15:
            time.sleep(rng.uniform(0.0, 0.3))
        else:
            deadline = time.monotonic() + 20
            while (os.path.getsize(results) if os.path.exists(results) else 0) == before and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.25))
        child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL, "the child ended before it was killed"

        resolved = _resolved(results)
        with TransparencyLog.open(db, signer, checkpoint_interval_s=None) as log:
            assert log.size >= (max(resolved) + 1 if resolved else 0)
            for idx, data in resolved.items():
                assert log.entry(idx) == data, f"resolved entry {idx} is not at its index after restart"
            report = log.audit()
            assert report.ok, report.problems
            new = log.checkpoint()
            for cp in log.checkpoints():
                assert seen_roots.setdefault(cp.size, cp.root_hash) == cp.root_hash, f"two roots for size {cp.size}"
            for size, root in seen_roots.items():
                verify_consistency(size, new.size, log.consistency_proof(size, new.size), root, new.root_hash)
            progress.append(log.size)
    print("log size after each restart:", progress)
    assert progress[-1] > 1000 and len(set(progress)) > KILLS // 2, f"the children made too little progress: {progress}"
