"""Files replaced whole, and the temporaries a killed writer leaves behind swept when their folder is opened."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from fieldprint.atomic import replace_file, sweep_temporaries, temporary
from fieldprint.ledger.keys import ensure_key_pair


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_replace_file_writes_bytes_text_or_a_writer_with_the_mode_asked(tmp_path):
    path = tmp_path / "f.json"
    replace_file(path, b"one")
    assert path.read_bytes() == b"one" and (path.stat().st_mode & 0o777) == 0o600
    replace_file(path, "twö", mode=0o644)
    assert path.read_text("utf-8") == "twö" and (path.stat().st_mode & 0o777) == 0o644
    replace_file(path, lambda f: f.write(b"three"), durable=False)
    assert path.read_bytes() == b"three"
    assert os.listdir(tmp_path) == ["f.json"]


def test_a_writer_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "set.bin"
    replace_file(path, b"old")

    def half(f):
        f.write(b"new, half of it")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_file(path, half)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["set.bin"]


def test_a_writer_killed_mid_write_leaves_the_old_file_and_its_temporary_is_swept(tmp_path):
    path = tmp_path / "set.bin"
    replace_file(path, b"old")
    code = textwrap.dedent(f"""
        import sys, time
        from fieldprint.atomic import replace_file
        def slow(f):
            f.write(b"x" * 100_000)
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
        replace_file({str(path)!r}, slow)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        left = [n for n in os.listdir(tmp_path) if n != "set.bin"]
        assert len(left) == 1 and f".{child.pid}." in left[0]
        assert sweep_temporaries(tmp_path) == []  # its writer still runs: never swept from under it
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        child.kill()
        child.stdout.close()
    assert path.read_bytes() == b"old"
    assert sweep_temporaries(tmp_path) == [str(tmp_path / left[0])]
    assert os.listdir(tmp_path) == ["set.bin"]


def test_the_sweep_keeps_live_writers_and_names_it_did_not_make(tmp_path):
    fd, mine = temporary(tmp_path, "sessions.json")  # this process's: it may be writing it now
    os.close(fd)
    dead = _dead_pid()
    others = [f".a.json.{dead}.tmp", f"a.json.{dead}.tmp", f".a.json.{dead}.abcdefgh.txt", f".a.{dead}.abc.tmp",
              "notes.tmp", f".x.{dead}.abcdefgh.tmp.bak"]
    for name in others:
        (tmp_path / name).write_bytes(b"")
    stale = tmp_path / f".a.json.{dead}.abcdefgh.tmp"
    stale.write_bytes(b"")
    stale_dir = tmp_path / f".tokenizer.{dead}.k2j4h5g6.tmp"
    stale_dir.mkdir()
    (stale_dir / "vocab.json").write_text("{}")
    assert sorted(sweep_temporaries(tmp_path)) == sorted([str(stale), str(stale_dir)])
    assert sorted(os.listdir(tmp_path)) == sorted(others + [os.path.basename(mine)])
    assert sweep_temporaries(tmp_path / "absent") == []


def test_opening_a_key_folder_sweeps_a_killed_creations_private_key(tmp_path):
    leftover = tmp_path / f".log.key.{_dead_pid()}.q1w2e3r4.tmp"
    leftover.write_text("PRIVATE+KEY+hal")
    ensure_key_pair(tmp_path, "log", "example.com/log")
    assert sorted(os.listdir(tmp_path)) == ["log.key", "log.pub"]
