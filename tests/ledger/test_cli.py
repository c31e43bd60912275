"""`fieldprint ledger init|add|checkpoint|prove|verify|audit` end to end, through main(argv)."""

import json
import os
import sqlite3
import stat
import subprocess
import sys

from fieldprint.cli import build_parser, main


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_ledger_round_trip(tmp_path, capsys):
    d = str(tmp_path / "data")
    rc, out, _ = run(capsys, "ledger", "--data-dir", d, "init", "--origin", "example.org/ledger")
    assert rc == 0 and "verifier key: example.org/ledger+" in out
    assert stat.S_IMODE(os.stat(os.path.join(d, "ledger.key")).st_mode) == 0o600
    (tmp_path / "e1").write_bytes(b'{"kind":"state","v":1}')
    (tmp_path / "lines").write_bytes(b'{"kind":"state","n":1,"v":1}\n{"kind":"state","n":2,"v":1}\n{"kind":"state","n":3,"v":1}\n')
    rc, out, _ = run(capsys, "ledger", "--data-dir", d, "add", str(tmp_path / "e1"))
    assert rc == 0 and out.startswith("0\t")
    rc, out, _ = run(capsys, "ledger", "--data-dir", d, "add", "--lines", str(tmp_path / "lines"))
    assert rc == 0 and [line.split("\t")[0] for line in out.splitlines()] == ["1", "2", "3"]
    rc, out, _ = run(capsys, "ledger", "--data-dir", d, "checkpoint")
    assert rc == 0 and out.startswith("example.org/ledger\n4\n")
    bundle_file = str(tmp_path / "b.json")
    rc, _, _ = run(capsys, "ledger", "--data-dir", d, "prove", "2", "-o", bundle_file)
    bundle = json.load(open(bundle_file))
    assert rc == 0 and bundle["index"] == 2 and bundle["size"] == 4 and bundle["checkpoint"].startswith("example.org")
    rc, out, _ = run(capsys, "ledger", "--data-dir", d, "verify", bundle_file)
    assert rc == 0 and out.startswith("OK: entry 2 is included in example.org/ledger at size 4")
    pub = open(os.path.join(d, "ledger.pub")).read().strip()
    rc, out, _ = run(capsys, "ledger", "--data-dir", str(tmp_path / "elsewhere"), "verify", bundle_file, "--key", pub)
    assert rc == 0  # offline: only the bundle and the verifier key are needed
    rc, out, _ = run(capsys, "ledger", "--data-dir", d, "audit")
    assert rc == 0 and "OK" in out

    # A bundle with a changed proof, index or entry, or checked with another key, is refused.
    for mutate in [
        lambda b: b["proof"].__setitem__(0, b["proof"][1]),
        lambda b: b.__setitem__("index", 1),
        lambda b: b.__setitem__("entry", "eHg="),
        lambda b: b.__setitem__("size", 3),
        lambda b: b.pop("checkpoint"),
    ]:
        bad = json.loads(json.dumps(bundle))
        mutate(bad)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        rc, _, err = run(capsys, "ledger", "--data-dir", d, "verify", str(tmp_path / "bad.json"))
        assert rc == 1 and "fieldprint: error:" in err
    rc, _, err = run(capsys, "ledger", "--data-dir", d, "verify", bundle_file, "--key", "x+00000000+AQ==")
    assert rc == 1

    conn = sqlite3.connect(os.path.join(d, "ledger.sqlite"))
    conn.execute("UPDATE leaves SET data = ? WHERE idx = 3", (b"gamma!",))  # the audit reads the log read-only
    conn.commit()
    conn.close()
    rc, out, _ = run(capsys, "ledger", "--data-dir", d, "audit")
    assert rc == 1 and "leaf 3:" in out


def test_cli_errors(tmp_path, capsys):
    d = str(tmp_path / "data")
    rc, _, err = run(capsys, "ledger", "--data-dir", d, "add", "-")
    assert rc == 1 and "init" in err
    assert run(capsys, "ledger", "--data-dir", d, "init")[0] == 0
    rc, _, err = run(capsys, "ledger", "--data-dir", d, "init")
    assert rc == 1 and "already holds a ledger" in err
    big = tmp_path / "big"
    big.write_bytes(b"x" * 70000)
    rc, _, err = run(capsys, "ledger", "--data-dir", d, "add", str(tmp_path / "e-missing"))
    assert rc == 1 and "cannot read" in err
    rc, _, err = run(capsys, "ledger", "--data-dir", d, "add", str(big))
    assert rc == 1 and "at most 65536" in err
    rc, _, err = run(capsys, "ledger", "--data-dir", d, "prove", "0")
    assert rc == 1 and "does not exist" in err
    rc, _, err = run(capsys, "ledger", "--data-dir", str(tmp_path / "d2"), "init", "--origin", "bad origin")
    assert rc == 1 and not os.path.exists(tmp_path / "d2" / "ledger.key")
    assert run(capsys, "ledger")[0] == 2


def test_parser_is_extensible():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "ledger" in sub.choices


def test_console_entry_point(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from fieldprint.cli import main; sys.exit(main())", "ledger", "--data-dir", str(tmp_path), "init"],
        capture_output=True, text=True,
    )
    assert out.returncode == 0 and "verifier key" in out.stdout


def test_init_failure_leaves_nothing_and_init_works_after(tmp_path, capsys, monkeypatch):
    from fieldprint.errors import LogError
    from fieldprint.ledger.log import TransparencyLog

    d = tmp_path / "data"
    real_open = TransparencyLog.open

    def failing_open(path, *args, **kwargs):
        open(path, "wb").close()  # as if the database file was created before the failure
        raise LogError("simulated failure opening the log")

    monkeypatch.setattr(TransparencyLog, "open", failing_open)
    rc, _, err = run(capsys, "ledger", "--data-dir", str(d), "init")
    assert rc == 1 and "simulated failure" in err
    assert not d.exists()  # the folder init created, keys and database are all gone

    d.mkdir()  # a folder that existed before init is kept, emptied of what init wrote
    rc, _, err = run(capsys, "ledger", "--data-dir", str(d), "init")
    assert rc == 1 and os.listdir(d) == []

    monkeypatch.setattr(TransparencyLog, "open", real_open)
    rc, out, _ = run(capsys, "ledger", "--data-dir", str(d), "init")
    assert rc == 0 and "verifier key" in out
    assert sorted(os.listdir(d)) == ["ledger.key", "ledger.pub", "ledger.sqlite", "ledger.sqlite.checkpoint"]
    assert run(capsys, "ledger", "--data-dir", str(d), "checkpoint")[0] == 0


def test_interrupted_init_says_what_to_remove(tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    (d / "ledger.sqlite").write_bytes(b"")  # a database left without its key by a killed init
    for cmd in (["init"], ["checkpoint"]):
        rc, _, err = run(capsys, "ledger", "--data-dir", str(d), *cmd)
        assert rc == 1 and f"remove {d / 'ledger.sqlite'}" in err


def test_verify_and_prove_io_errors_are_reported(tmp_path, capsys):
    d = str(tmp_path / "data")
    assert run(capsys, "ledger", "--data-dir", d, "init")[0] == 0
    (tmp_path / "e").write_bytes(b"entry")
    assert run(capsys, "ledger", "--data-dir", d, "add", "--raw", str(tmp_path / "e"))[0] == 0
    (tmp_path / "latin1.json").write_bytes(b'{"index": "\xe9"}')
    rc, _, err = run(capsys, "ledger", "--data-dir", d, "verify", str(tmp_path / "latin1.json"))
    assert rc == 1 and "not UTF-8" in err
    target = tmp_path / "missing-dir" / "b.json"
    rc, _, err = run(capsys, "ledger", "--data-dir", d, "prove", "0", "-o", str(target))
    assert rc == 1 and "cannot write the bundle" in err and not target.exists()


def test_a_bundle_written_over_an_old_file_replaces_it_whole_or_not_at_all(tmp_path, capsys, monkeypatch):
    d = str(tmp_path / "data")
    assert run(capsys, "ledger", "--data-dir", d, "init")[0] == 0
    (tmp_path / "e").write_bytes(b"entry")
    assert run(capsys, "ledger", "--data-dir", d, "add", "--raw", str(tmp_path / "e"))[0] == 0
    target = tmp_path / "b.json"
    target.write_text("the old bundle")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("fieldprint.atomic.os.replace", full_disk)
    rc, _, err = run(capsys, "ledger", "--data-dir", d, "prove", "0", "-o", str(target))
    assert rc == 1 and "No space left" in err
    assert target.read_text() == "the old bundle" and sorted(os.listdir(tmp_path)) == ["b.json", "data", "e"]
    monkeypatch.undo()
    assert run(capsys, "ledger", "--data-dir", d, "prove", "0", "-o", str(target))[0] == 0
    assert json.loads(target.read_text())["index"] == 0


def test_add_lines_skips_blank_lines(tmp_path, capsys):
    d = str(tmp_path / "data")
    assert run(capsys, "ledger", "--data-dir", d, "init")[0] == 0
    (tmp_path / "lines").write_bytes(b"alpha\n\n  \nbeta\r\n\n")
    rc, out, err = run(capsys, "ledger", "--data-dir", d, "add", "--raw", "--lines", str(tmp_path / "lines"))
    assert rc == 0 and [line.split("\t")[0] for line in out.splitlines()] == ["0", "1"]
    assert "skipped 3 blank lines" in err


def _ledger(tmp_path, capsys):
    d = str(tmp_path / "data")
    assert run(capsys, "ledger", "--data-dir", d, "init", "--origin", "example.org/ledger")[0] == 0
    return d


def _size(d):
    from fieldprint.ledger.reader import LogReader

    with LogReader.open(os.path.join(d, "ledger.sqlite"), open(os.path.join(d, "ledger.pub")).read().strip()) as log:
        return log.size


def test_add_takes_canonical_records_or_raw_bytes_named_as_such(tmp_path, capsys):
    d = _ledger(tmp_path, capsys)
    cases = {
        "empty": (b"", "empty entry"),
        "not-utf8": (b'{"kind":"state","v":1,"x":"\xff"}', "not UTF-8 JSON"),
        "not-json": (b"hello world", "not UTF-8 JSON"),
        "spaces": (b'{"kind": "state", "v": 1}', "not in canonical form"),
        "unsorted": (b'{"v":1,"kind":"state"}', "not in canonical form"),
        "array": (b"[1,2]", "not a version-1 record"),
        "float": (b'{"kind":"state","v":1,"x":1.5}', "floats are not allowed"),
    }
    (tmp_path / "ok").write_bytes(b'{"kind":"state","v":1}')
    for name, (data, why) in cases.items():
        (tmp_path / name).write_bytes(data)
        rc, _, err = run(capsys, "ledger", "--data-dir", d, "add", str(tmp_path / "ok"), str(tmp_path / name))
        assert rc == 1 and f"{tmp_path / name}: " in err and why in err, (name, err)
        assert name == "empty" or "--raw" in err  # what to do when the bytes are meant as they are
    (tmp_path / "lines").write_bytes(b'{"kind":"state","v":1}\n\n{"kind":"state","v":1} \n')
    rc, _, err = run(capsys, "ledger", "--data-dir", d, "add", "--lines", str(tmp_path / "lines"))
    assert rc == 1 and f"{tmp_path / 'lines'} line 3: " in err
    assert _size(d) == 0  # every command above was refused whole, before anything was written
    rc, out, _ = run(capsys, "ledger", "--data-dir", d, "add", "--raw", str(tmp_path / "not-json"), str(tmp_path / "not-utf8"))
    assert rc == 0 and len(out.splitlines()) == 2
    rc, _, err = run(capsys, "ledger", "--data-dir", d, "add", "--raw", str(tmp_path / "empty"))
    assert rc == 1 and "empty entry" in err and _size(d) == 2


def test_key_files_that_are_not_keys(tmp_path, capsys):
    d = _ledger(tmp_path, capsys)
    key = os.path.join(d, "ledger.key")
    os.rename(key, key + ".saved")
    os.mkdir(key)
    rc, _, err = run(capsys, "ledger", "--data-dir", d, "checkpoint")
    assert rc == 1 and "is a folder" in err
    os.rmdir(key)
    with open(key, "wb") as f:
        f.write(b"PRIVATE+KEY+\xff\xfe")
    rc, _, err = run(capsys, "ledger", "--data-dir", d, "checkpoint")
    assert rc == 1 and "is not UTF-8 text" in err
    pub = os.path.join(d, "ledger.pub")
    os.rename(pub, pub + ".saved")
    with open(pub, "wb") as f:
        f.write(b"\x80" * 10)
    for cmd in (["audit"], ["prove", "0"]):
        rc, _, err = run(capsys, "ledger", "--data-dir", d, *cmd)
        assert rc == 1 and "is not UTF-8 text" in err, cmd


def test_consistency_command_and_verify_checks_the_origin(tmp_path, capsys):
    from fieldprint.ledger.note import Checkpoint, sign_note

    d = _ledger(tmp_path, capsys)
    for n in range(3):
        (tmp_path / "e").write_bytes(b'{"kind":"state","n":%d,"v":1}' % n)
        assert run(capsys, "ledger", "--data-dir", d, "add", str(tmp_path / "e"))[0] == 0  # each add signs a checkpoint
    cfile = str(tmp_path / "c.json")
    assert run(capsys, "ledger", "--data-dir", d, "consistency", "1", "3", "-o", cfile)[0] == 0
    rc, out, _ = run(capsys, "ledger", "--data-dir", d, "verify", cfile)
    assert rc == 0 and out.startswith("OK: example.org/ledger at size 3") and "extends its tree at size 1" in out
    rc, out, _ = run(capsys, "ledger", "--data-dir", d, "consistency", "0", "2")
    assert rc == 0 and json.loads(out)["size1"] == 0
    rc, _, err = run(capsys, "ledger", "--data-dir", d, "consistency", "2", "9")
    assert rc == 1 and "SIZE2 <= 3" in err

    # The same key signing a checkpoint for another log: refused unless that origin is asked for.
    bfile = str(tmp_path / "b.json")
    assert run(capsys, "ledger", "--data-dir", d, "prove", "1", "-o", bfile)[0] == 0
    bundle = json.load(open(bfile))
    signer = open(os.path.join(d, "ledger.key")).read().strip()
    cp = Checkpoint.open(bundle["checkpoint"], [open(os.path.join(d, "ledger.pub")).read().strip()], origin="example.org/ledger")
    bundle["checkpoint"] = sign_note(Checkpoint.body("other.example/another-log", cp.size, cp.root_hash), signer)
    (tmp_path / "other.json").write_text(json.dumps(bundle))
    rc, out, err = run(capsys, "ledger", "--data-dir", d, "verify", str(tmp_path / "other.json"))
    assert rc == 1 and "OK" not in out and "expected 'example.org/ledger'" in err
    rc, out, _ = run(capsys, "ledger", "--data-dir", d, "verify", str(tmp_path / "other.json"), "--origin", "other.example/another-log")
    assert rc == 0 and "included in other.example/another-log" in out
    rc, _, err = run(capsys, "ledger", "--data-dir", d, "verify", bfile, "--origin", "other.example/another-log")
    assert rc == 1 and "expected 'other.example/another-log'" in err

    # audit --against: a checkpoint saved earlier passes; another log's is refused by its origin.
    (tmp_path / "cp").write_text(cp.note)
    rc, out, _ = run(capsys, "ledger", "--data-dir", d, "audit", "--against", str(tmp_path / "cp"))
    assert rc == 0 and "OK" in out
    (tmp_path / "cp-other").write_text(bundle["checkpoint"])
    rc, _, err = run(capsys, "ledger", "--data-dir", d, "audit", "--against", str(tmp_path / "cp-other"))
    assert rc == 1 and "another log's checkpoint" in err
