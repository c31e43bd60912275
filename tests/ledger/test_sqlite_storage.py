"""SQLiteStorage failure paths: a file that is not a database, a damaged schema, reader connections."""

import gc
import sqlite3
import threading

import pytest

from fieldprint.errors import LogError
from fieldprint.ledger.storage.sqlite import SQLiteStorage


def test_not_a_database_is_a_log_error_and_leaks_no_connection(tmp_path, monkeypatch):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"this is not an SQLite database, just text that is long enough " * 100)
    opened = []
    real = sqlite3.connect

    def connect(*args, **kwargs):
        conn = real(*args, **kwargs)
        opened.append(conn)
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect)
    with pytest.raises(LogError, match=f"{path}.*is it a Fieldprint log"):
        SQLiteStorage(path)
    assert opened
    for conn in opened:
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            conn.execute("SELECT 1")


def test_read_failures_are_log_errors_naming_the_file(tmp_path):
    path = str(tmp_path / "l.sqlite")
    storage = SQLiteStorage(path)
    storage.append(0, [b"a"], [bytes(32)], [])
    other = sqlite3.connect(path)
    other.execute("DROP TABLE leaves")
    other.execute("DROP TABLE checkpoints")
    other.commit()
    other.close()
    try:
        for call in [storage.size, lambda: storage.entry(0), lambda: list(storage.leaves(0, 1)),
                     lambda: storage.leaf_hashes([(0, 1)]), storage.checkpoints, storage.latest_checkpoint]:
            with pytest.raises(LogError, match=f"log database {path}"):
                call()
    finally:
        storage.close()


def test_reader_connections_close_when_their_threads_end(tmp_path):
    storage = SQLiteStorage(str(tmp_path / "l.sqlite"))
    try:
        storage.size()
        assert len(storage._readers) == 1  # this thread's reader

        def read():
            assert storage.size() == 0

        for _ in range(3):
            threads = [threading.Thread(target=read) for _ in range(8)]
            [t.start() for t in threads]
            [t.join() for t in threads]
        gc.collect()
        assert len(storage._readers) == 1  # 24 threads came and went; only the live thread's reader remains
    finally:
        storage.close()
    assert storage._readers == {}


def test_append_with_mismatched_hashes_is_refused_and_writes_nothing(tmp_path):
    # Was an assert (gone under python -O, when zip() would silently drop the extra entries).
    storage = SQLiteStorage(tmp_path / "l.sqlite")
    try:
        with pytest.raises(LogError, match="2 entries but 1 leaf hashes; nothing was written"):
            storage.append(0, [b"a", b"b"], [bytes(32)], [])
        assert storage.size() == 0
    finally:
        storage.close()


def test_one_writer_at_a_time_and_readers_beside_it(tmp_path):
    import os

    path = tmp_path / "l.sqlite"
    writer = SQLiteStorage(path)
    try:
        with pytest.raises(LogError, match=rf"another process is writing this log \(pid {os.getpid()} \(this process\)\)"):
            SQLiteStorage(path)
        writer.append(0, [b"a"], [bytes(32)], [])
        reader = SQLiteStorage(path, readonly=True)
        with pytest.raises(LogError, match="open read-only"):
            reader.append(1, [b"b"], [bytes(32)], [])
        assert reader.size() == 1 and reader.entry(0) == b"a"
        reader.close()
    finally:
        writer.close()
    SQLiteStorage(path).close()  # closing released the lock


def test_snapshot_sees_one_state_while_the_writer_commits(tmp_path):
    path = tmp_path / "l.sqlite"
    writer = SQLiteStorage(path)
    reader = SQLiteStorage(path, readonly=True)
    try:
        writer.append(0, [b"a"], [bytes(32)], [])
        with reader.snapshot():
            assert reader.size() == 1
            writer.append(1, [b"b"], [bytes(32)], [])
            assert reader.size() == 1 and reader.entry(1) is None  # still the snapshot
        assert reader.size() == 2
    finally:
        reader.close()
        writer.close()


def test_readonly_open_of_what_is_not_a_log(tmp_path):
    with pytest.raises(LogError, match="no log database"):
        SQLiteStorage(tmp_path / "missing.sqlite", readonly=True)
    (tmp_path / "empty.sqlite").write_bytes(b"")
    with pytest.raises(LogError, match="not a Fieldprint log database"):
        SQLiteStorage(tmp_path / "empty.sqlite", readonly=True)
    assert (tmp_path / "empty.sqlite").read_bytes() == b""  # nothing was written to it
