"""Reading with the public key only, the published checkpoint file, origins and consistency bundles."""

import os
import shutil
import sqlite3

import pytest

from fieldprint.errors import LogError, NoteError, ProofError
from fieldprint.ledger.bundle import (
    consistency_bundle,
    inclusion_bundle,
    verify_bundle,
    verify_consistency_bundle,
)
from fieldprint.ledger.log import TransparencyLog, wait_all
from fieldprint.ledger.merkle import verify_consistency, verify_inclusion
from fieldprint.ledger.note import Checkpoint, generate_key, sign_note
from fieldprint.ledger.published import published_path
from fieldprint.ledger.reader import LogReader, leaf_span

SIGNER, VERIFIER = generate_key("test.fieldprint/published")


def _fill(db, batches=(10, 7, 30)):
    """A log with a checkpoint after each batch; returns the checkpoints."""
    cps = []
    with TransparencyLog.open(db, SIGNER, checkpoint_interval_s=None) as log:
        for n in batches:
            wait_all([log.add(b"e%d-%d" % (log.size, i)) for i in range(n)])
            cps.append(log.checkpoint())
    return cps


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "ledger.sqlite")


def test_reader_proves_and_audits_with_the_public_key_only(db):
    cps = _fill(db)
    with LogReader.open(db, VERIFIER) as log:
        assert not hasattr(log, "add") and not hasattr(log, "checkpoint")
        assert log.size == 47 and log.latest_checkpoint() == cps[-1] and log.checkpoints() == cps
        verify_inclusion(inclusion_bundle_hash(log, 12), 12, 47, log.inclusion_proof(12, 47), cps[-1].root_hash)
        verify_consistency(10, 47, log.consistency_proof(10, 47), cps[0].root_hash, cps[-1].root_hash)
        assert verify_bundle(inclusion_bundle(log, 12), VERIFIER) == cps[-1]
        assert verify_consistency_bundle(consistency_bundle(log, 10, 47), VERIFIER) == (cps[0], cps[-1])
        assert log.audit().ok
    with pytest.raises(LogError, match="is the log of verifier key"):
        LogReader.open(db, generate_key("test.fieldprint/published")[1])
    with TransparencyLog.open_readonly(db, VERIFIER) as log:
        assert log.root_hash() == cps[-1].root_hash


def inclusion_bundle_hash(log, index):
    from fieldprint.ledger.merkle import leaf_hash

    return leaf_hash(log.entry(index))


def test_reader_works_beside_an_open_writer(db):
    _fill(db)
    with TransparencyLog.open(db, SIGNER, checkpoint_interval_s=None) as writer:
        with pytest.raises(LogError, match="another process is writing this log"):
            TransparencyLog.open(db, SIGNER)
        with LogReader.open(db, VERIFIER) as reader:
            wait_all([writer.add(b"more %d" % i) for i in range(5)])
            assert reader.size == 52 and reader.entry(51) == b"more 4"
            writer.checkpoint()
            assert reader.audit().ok


def test_inclusion_proof_from_a_reader_needs_a_covering_checkpoint(db):
    _fill(db, batches=(4,))
    with TransparencyLog.open(db, SIGNER, checkpoint_interval_s=None) as log:
        log.add(b"uncovered").result()
    with LogReader.open(db, VERIFIER) as log:
        with pytest.raises(LogError, match="no signed checkpoint covers entry 4"):
            inclusion_bundle(log, 4)
        with pytest.raises(LogError, match="no signed checkpoint is stored for size 5"):
            consistency_bundle(log, 4, 5)


def test_bundles_of_another_origin_are_refused(db):
    # One key, two logs: the other log's checkpoint verifies by signature, and is still not ours.
    cps = _fill(db)
    with LogReader.open(db, VERIFIER) as log:
        bundle = inclusion_bundle(log, 3)
        cbundle = consistency_bundle(log, 10, 47)
    forged = dict(bundle, checkpoint=sign_note(Checkpoint.body("other.example/another-log", 47, cps[-1].root_hash), SIGNER))
    with pytest.raises(NoteError, match="'other.example/another-log', expected 'test.fieldprint/published'"):
        verify_bundle(forged, VERIFIER)
    assert verify_bundle(forged, VERIFIER, origin="other.example/another-log").size == 47  # when that log is meant
    with pytest.raises(NoteError, match="expected 'somewhere.else/log'"):
        verify_bundle(bundle, VERIFIER, origin="somewhere.else/log")
    with pytest.raises(NoteError, match="expected 'somewhere.else/log'"):
        verify_consistency_bundle(cbundle, VERIFIER, origin="somewhere.else/log")
    for mutate in (lambda b: b["proof"].reverse(), lambda b: b.__setitem__("size1", 17),
                   lambda b: b.__setitem__("checkpoint1", b["checkpoint2"]), lambda b: b.pop("proof")):
        bad = {k: (list(v) if isinstance(v, list) else v) for k, v in cbundle.items()}
        mutate(bad)
        with pytest.raises((ProofError, NoteError)):
            verify_consistency_bundle(bad, VERIFIER)


def test_publishes_its_latest_checkpoint_beside_the_database(db):
    cps = _fill(db)
    with open(published_path(db)) as f:
        assert f.read() == cps[-1].note
    os.remove(published_path(db))  # a lost file is published again from the database at the next open
    TransparencyLog.open(db, SIGNER, checkpoint_interval_s=None).close()
    with open(published_path(db)) as f:
        assert f.read() == cps[-1].note


@pytest.mark.parametrize("damage", ["zero-bytes", "missing", "older-copy", "other-content"])
def test_a_database_behind_its_published_checkpoint_is_refused(db, tmp_path, damage):
    older, fork = str(tmp_path / "older.sqlite"), str(tmp_path / "fork.sqlite")
    _fill(db, batches=(10,))
    shutil.copy(db, older)
    _fill(db, batches=(5,))  # published: the checkpoint for 15
    with TransparencyLog.open(fork, SIGNER, checkpoint_interval_s=None) as log:  # same key, same size, other entries
        wait_all([log.add(b"e0-%d" % i) for i in range(10)] + [log.add(b"fork %d" % i) for i in range(5)])
    if damage == "zero-bytes":
        open(db, "wb").close()
    elif damage == "missing":
        os.remove(db)
    else:
        shutil.copy(older if damage == "older-copy" else fork, db)
    match = {
        "older-copy": "holds 10 entries but the log already published a checkpoint for 15",
        "other-content": "contradicts the checkpoint it published for size 15",
    }.get(damage, "missing or empty but the log published a checkpoint")
    before = sorted(os.listdir(tmp_path)), os.path.getsize(db) if os.path.exists(db) else None
    with pytest.raises(LogError, match=match):
        TransparencyLog.open(db, SIGNER)
    assert (sorted(os.listdir(tmp_path)), os.path.getsize(db) if os.path.exists(db) else None) == before  # nothing written
    if damage in ("older-copy", "other-content"):
        with LogReader.open(db, VERIFIER) as reader:  # the reader opens it, and its audit says what is wrong
            problems = reader.audit().problems
            assert any("checkpoint it must extend" in p for p in problems), problems


def test_an_existing_log_is_never_created_anew(db):
    with pytest.raises(LogError, match="missing or empty but this log exists"):
        TransparencyLog.open(db, SIGNER, create=False)
    assert not os.path.exists(db)
    open(db, "wb").close()
    with pytest.raises(LogError, match="missing or empty but this log exists"):
        TransparencyLog.open(db, SIGNER, create=False)
    assert os.path.getsize(db) == 0


def test_audit_against_a_checkpoint_saved_elsewhere(db, tmp_path):
    cps = _fill(db)
    fork_db = str(tmp_path / "fork.sqlite")
    with TransparencyLog.open(fork_db, SIGNER, checkpoint_interval_s=None) as fork:
        wait_all([fork.add(b"fork %d" % i) for i in range(20)])
        fork_cp = fork.checkpoint()
        wait_all([fork.add(b"fork more %d" % i) for i in range(40)])
        beyond = fork.checkpoint()
    with LogReader.open(db, VERIFIER) as log:
        assert log.audit([cps[0], cps[1]]).ok
        problems = log.audit([fork_cp]).problems
        assert any("a checkpoint it must extend has root" in p and "size 20" in p for p in problems), problems
        problems = log.audit([beyond]).problems
        assert any("holds 47 entries but a checkpoint it must extend is for size 60" in p for p in problems), problems


def test_audit_ranges_are_never_reversed(db):
    _fill(db)
    for first, last in [(0, 0), (46, 46), (20, 25), (40, 46)]:
        conn = sqlite3.connect(db)
        rows = conn.execute("SELECT idx, hash, data FROM leaves WHERE idx BETWEEN ? AND ?", (first, last)).fetchall()
        conn.execute("DELETE FROM leaves WHERE idx BETWEEN ? AND ?", (first, last))
        conn.commit()
        with LogReader.open(db, VERIFIER) as log:
            problems = log.audit().problems
        conn.executemany("INSERT INTO leaves (idx, hash, data) VALUES (?, ?, ?)", rows)
        conn.commit()
        conn.close()
        assert problems
        for p in problems:
            for a, b in _ranges(p):
                assert a <= b, p
    assert leaf_span(3, 4) == "leaf 3" and leaf_span(3, 6) == "leaves 3..5" and leaf_span(87, 87) == "no leaves"


def _ranges(text):
    import re

    return [(int(a), int(b)) for a, b in re.findall(r"(-?\d+)\.\.(-?\d+)", text)]
