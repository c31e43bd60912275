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
