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


def test_add_lines_skips_blank_lines(tmp_path, capsys):
    d = str(tmp_path / "data")
    assert run(capsys, "ledger", "--data-dir", d, "init")[0] == 0
    (tmp_path / "lines").write_bytes(b"alpha\n\n  \nbeta\r\n\n")
    rc, out, err = run(capsys, "ledger", "--data-dir", d, "add", "--raw", "--lines", str(tmp_path / "lines"))
    assert rc == 0 and [line.split("\t")[0] for line in out.splitlines()] == ["0", "1"]
    assert "skipped 3 blank lines" in err
