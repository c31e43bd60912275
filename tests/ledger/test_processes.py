"""The ledger with real OS processes: racing inits, a second writer, audit beside a writer, Ctrl-C and
closed pipes during `add`, unbounded standard input, a damaged write-ahead log, a read-only folder."""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fieldprint.errors import LogError
from fieldprint.ledger.log import TransparencyLog
from fieldprint.ledger.reader import LogReader

CLI = [sys.executable, "-c", "import sys; from fieldprint.cli import main; sys.exit(main())"]
REPORT = re.compile(r"the first (\d+) of (\d+) entries are in the log at indices 0\.\.(\d+)|none of the (\d+) entries")


def cli(*args, **kwargs):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120, **kwargs)


def _init(d):
    out = cli("ledger", "--data-dir", d, "init")
    assert out.returncode == 0, out.stderr
    return (d / "ledger.key").read_text().strip(), (d / "ledger.pub").read_text().strip()


def _records(n):
    return [b'{"i":%d,"kind":"state","v":1}' % i for i in range(n)]


@pytest.mark.slow
def test_three_inits_at_once_leave_one_whole_ledger(tmp_path):
    for trial in range(4):
        d = tmp_path / f"d{trial}"
        procs = [subprocess.Popen([*CLI, "ledger", "--data-dir", str(d), "init"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
        results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
        winners = [out for rc, out, _ in results if rc == 0]
        assert len(winners) == 1, results
        for rc, _, err in results:
            if rc != 0:
                assert rc == 1 and "Traceback" not in err, err
                assert "another `fieldprint ledger init` is creating" in err or "already holds a ledger" in err, err
        # The winner's files are all there and belong together: the key it printed signs the log.
        printed_key = winners[0].split("verifier key: ")[1].strip()
        assert (d / "ledger.pub").read_text().strip() == printed_key
        assert sorted(p for p in os.listdir(d) if not p.endswith(".lock")) == [
            "ledger.key", "ledger.pub", "ledger.sqlite", "ledger.sqlite.checkpoint"]
        assert cli("ledger", "--data-dir", d, "audit").returncode == 0
        added = cli("ledger", "--data-dir", d, "add", input='{"kind":"state","v":1}')
        assert added.returncode == 0 and added.stdout.startswith("0\t"), added.stderr


WRITER = textwrap.dedent("""
    import os, sys, time
    from fieldprint.ledger.log import TransparencyLog, wait_all
    db, key_file, stop = sys.argv[1:4]
    with TransparencyLog.open(db, open(key_file).read().strip(), checkpoint_interval_s=0.05) as log:
        print("ready", flush=True)
        i = 0
        while not os.path.exists(stop):
            wait_all([log.add(b'{"i":%d,"kind":"state","v":1}' % (i + k)) for k in range(37)])
            i += 37
            if i % 370 == 0:
                log.checkpoint()
""")


@pytest.mark.slow
def test_second_writer_refused_while_readers_audit_one_snapshot(tmp_path):
    d = tmp_path / "data"
    signer, verifier = _init(d)
    db, stop = str(d / "ledger.sqlite"), str(tmp_path / "stop")
    child = subprocess.Popen([sys.executable, "-c", WRITER, db, str(d / "ledger.key"), stop],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(LogError, match=rf"another process is writing this log \(pid {child.pid}\)"):
            TransparencyLog.open(db, signer)
        out = cli("ledger", "--data-dir", d, "add", input='{"kind":"state","v":1}')
        assert out.returncode == 1 and f"another process is writing this log (pid {child.pid})" in out.stderr
        sizes = []
        deadline = time.monotonic() + 60
        with LogReader.open(db, verifier) as reader:
            # Each audit reads one snapshot while the child commits batches. At least 12 of them, and
            # on until one sees the log grow: twelve audits can take less time than the child needs for
            # its next checkpoint on a busy machine (CI saw all twelve at one size).
            while len(sizes) < 12 or (sizes[-1] == sizes[0] and time.monotonic() < deadline):
                report = reader.audit()
                assert report.ok, report.problems
                sizes.append(report.size)
        out = cli("ledger", "--data-dir", d, "audit")
        assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr
        assert sizes[-1] > sizes[0], f"the writer made no progress while audited: {sizes}"
    finally:
        open(stop, "w").close()
        assert child.wait(timeout=60) == 0
    with TransparencyLog.open(db, signer, checkpoint_interval_s=None) as log:  # the lock went with the writer
        assert log.audit().ok


def _ctrl_c_live() -> None:
    """In the child: SIGINT back to its default, so Python installs its Ctrl-C handler even when the
    test runner was started with SIGINT ignored (nohup, a background job), which children inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _add_lines_process(d, tmp_path, n, **kwargs):
    lines = tmp_path / "lines"
    lines.write_bytes(b"\n".join(_records(n)) + b"\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([*CLI, "ledger", "--data-dir", str(d), "add", "--lines", str(lines)], preexec_fn=_ctrl_c_live,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, **kwargs)


def _check_report(d, verifier, err, total):
    assert "Traceback" not in err, err
    m = REPORT.search(err)
    assert m, err
    added = 0 if m.group(4) else int(m.group(1))
    assert m.group(4) == str(total) if m.group(4) else (int(m.group(2)), int(m.group(3))) == (total, added - 1)
    with LogReader.open(str(d / "ledger.sqlite"), verifier) as log:
        assert log.size == added, f"the report says {added} entries were added, the log holds {log.size}"
        records = _records(total)
        for i in {0, added // 2, added - 1} if added else ():
            assert log.entry(i) == records[i]
        assert log.audit().ok
    return added


@pytest.mark.slow
def test_ctrl_c_during_add_reports_exactly_what_was_sequenced(tmp_path):
    d = tmp_path / "data"
    _, verifier = _init(d)
    total = 100_000
    proc = _add_lines_process(d, tmp_path, total)
    first = proc.stdout.readline()
    assert first.startswith(b"0\t")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    added = _check_report(d, verifier, err.decode(), total)
    # A write cut by the signal may leave one partial line; every whole line names a sequenced entry.
    printed = [int(m.group(1)) for m in re.finditer(rb"^(\d+)\t[0-9a-f]{64}$", first + out, re.MULTILINE)]
    assert printed and printed == sorted(set(printed)) and printed[-1] < added < total


@pytest.mark.slow
def test_closed_pipe_during_add_reports_exactly_what_was_sequenced(tmp_path):
    d = tmp_path / "data"
    _, verifier = _init(d)
    total = 50_000
    proc = _add_lines_process(d, tmp_path, total)
    assert proc.stdout.readline().startswith(b"0\t")
    proc.stdout.close()  # as `| head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1, err
    assert "standard output was closed" in err
    _check_report(d, verifier, err, total)


def test_ctrl_c_while_reading_input_writes_nothing(tmp_path):
    d = tmp_path / "data"
    _, verifier = _init(d)
    proc = subprocess.Popen([*CLI, "ledger", "--data-dir", str(d), "add", "--lines"], preexec_fn=_ctrl_c_live,
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(b'{"kind":"state","v":1}\n')
    proc.stdin.flush()
    lock = d / "ledger.sqlite.lock"
    deadline = time.monotonic() + 60  # the writer lock names the child once it has opened the log
    while not (lock.exists() and lock.read_text() == str(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in err and b"nothing was written" in err, err
    with LogReader.open(str(d / "ledger.sqlite"), verifier) as log:
        assert log.size == 0


def test_endless_standard_input_is_refused_without_reading_it_all(tmp_path):
    d = tmp_path / "data"
    _init(d)
    with open("/dev/zero", "rb") as zero:
        out = subprocess.run([*CLI, "ledger", "--data-dir", str(d), "add"], stdin=zero, capture_output=True, timeout=60)
        assert out.returncode == 1 and b"at most 65536 bytes" in out.stderr and b"Traceback" not in out.stderr
        out = subprocess.run([*CLI, "ledger", "--data-dir", str(d), "add", "--lines"], stdin=zero,
                             capture_output=True, timeout=60)
        assert out.returncode == 1 and b"reads at most 67108864 bytes" in out.stderr, out.stderr


CRASHER = textwrap.dedent("""
    import sys, time
    from fieldprint.ledger.log import TransparencyLog, wait_all
    db, key_file = sys.argv[1:3]
    log = TransparencyLog.open(db, open(key_file).read().strip(), checkpoint_interval_s=None)
    for part in range(4):
        wait_all([log.add(b'{"i":%d,"kind":"state","part":%d,"v":1}' % (i, part)) for i in range(500)])
        log.checkpoint()
    print("done", flush=True)
    time.sleep(600)  # killed here: the write-ahead log is never folded into the database
""")


@pytest.mark.parametrize("seed", range(3))
def test_damaged_wal_rollback_is_refused(tmp_path, seed):
    d = tmp_path / "data"
    signer, verifier = _init(d)
    db = str(d / "ledger.sqlite")
    child = subprocess.Popen([sys.executable, "-c", CRASHER, db, str(d / "ledger.key")], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "done"
    child.kill()
    child.wait()
    wal = db + "-wal"
    size = os.path.getsize(wal)
    assert size > 100_000
    shutil.copy(d / "ledger.sqlite.checkpoint", tmp_path / "saved-checkpoint")
    with open(wal, "r+b") as f:  # one flipped byte in the first 60% of the WAL: SQLite drops every later frame
        pos = random.Random(seed).randrange(32, int(size * 0.6))
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(LogError, match="but the log already published a checkpoint for 2000|contradicts"):
        TransparencyLog.open(db, signer)
    out = cli("ledger", "--data-dir", d, "add", input='{"kind":"state","v":1}')
    assert out.returncode == 1 and "Restore it from a backup" in out.stderr and "Traceback" not in out.stderr
    out = cli("ledger", "--data-dir", d, "audit", "--against", tmp_path / "saved-checkpoint")
    assert out.returncode == 1 and "checkpoint it must extend" in out.stdout, out.stdout + out.stderr


def _as_unprivileged(cmd):
    """Run as root without the capability to override file permissions, so a read-only folder is one."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be made read-only for this test")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *cmd]


@pytest.mark.slow
def test_read_only_folder_still_proves_verifies_and_audits(tmp_path):
    d = tmp_path / "data"
    _init(d)
    entries = tmp_path / "entries"
    entries.write_bytes(b"\n".join(_records(40)) + b"\n")
    assert cli("ledger", "--data-dir", d, "add", "--lines", entries).returncode == 0
    assert cli("ledger", "--data-dir", d, "checkpoint").returncode == 0
    os.remove(d / "ledger.key")  # only the public key is left
    os.remove(d / "ledger.sqlite.lock")
    for p in d.iterdir():
        p.chmod(0o444)
    d.chmod(0o555)
    listing = sorted((p.name, p.stat().st_mtime_ns) for p in d.iterdir())
    try:
        def run(*args):
            return subprocess.run(_as_unprivileged([*CLI, "ledger", "--data-dir", str(d), *map(str, args)]),
                                  capture_output=True, text=True, timeout=120)

        probe = subprocess.run(_as_unprivileged(["touch", str(d / "probe")]), capture_output=True)
        assert probe.returncode != 0, "the folder is not read-only for the commands under test"
        bundle, cbundle = tmp_path / "b.json", tmp_path / "c.json"
        for args in (("prove", 7, "-o", bundle), ("consistency", 0, 40, "-o", cbundle), ("verify", bundle),
                     ("verify", cbundle), ("audit",)):
            out = run(*args)
            assert out.returncode == 0 and "Traceback" not in out.stderr, (args, out.stdout, out.stderr)
        out = run("add", entries)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert sorted((p.name, p.stat().st_mtime_ns) for p in d.iterdir()) == listing
    finally:
        d.chmod(0o755)
