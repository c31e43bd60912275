"""Find or start a PostgreSQL server for the tests, and give each test module a fresh database.

    from pg import pg_dsn  # noqa: F401  (a module-scoped fixture: a DSN of a new, empty database)

Where the server comes from, in order: FIELDPRINT_POSTGRES_DSN (any server you point it at), else a
server that .ci/postgres.sh starts (or finds running) on 127.0.0.1 without installing anything.
When neither works the PostgreSQL tests skip and say why, unless FIELDPRINT_REQUIRE_POSTGRES=1
(CI sets it), where not having PostgreSQL is a failure.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

DSN_ENV = "FIELDPRINT_POSTGRES_DSN"
REQUIRE_ENV = "FIELDPRINT_REQUIRE_POSTGRES"
START_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".ci", "postgres.sh")


def unavailable(reason: str) -> None:
    """Skip the test for `reason`, or fail it when FIELDPRINT_REQUIRE_POSTGRES=1."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"PostgreSQL is required ({REQUIRE_ENV}=1) but {reason}", pytrace=False)
    pytest.skip(f"no PostgreSQL for these tests: {reason} (set {DSN_ENV}, or run .ci/postgres.sh)")


def import_psycopg():
    """The psycopg module, for a test module's top: without it the module skips (or fails, when required)."""
    try:
        import psycopg
    except ImportError:
        why = "psycopg is not installed (pip install 'fieldprint[postgres]')"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"PostgreSQL is required ({REQUIRE_ENV}=1) but {why}", pytrace=False)
        pytest.skip(f"no PostgreSQL for these tests: {why}", allow_module_level=True)
    return psycopg


@functools.cache
def _find_server() -> tuple[str | None, str]:
    """(admin DSN, '') of a reachable server, or (None, why not)."""
    try:
        import psycopg
    except ImportError:
        return None, "psycopg is not installed (pip install 'fieldprint[postgres]')"
    dsn = os.environ.get(DSN_ENV)
    if not dsn:
        if not os.path.exists(START_SCRIPT):
            return None, f"{DSN_ENV} is not set and {START_SCRIPT} is missing"
        try:
            out = subprocess.run(["bash", START_SCRIPT, "--no-install"], capture_output=True, text=True, timeout=180)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"{DSN_ENV} is not set and .ci/postgres.sh failed to run ({exc})"
        found = re.search(rf"export {DSN_ENV}=(\S+)", out.stdout)
        if out.returncode != 0 or not found:
            why = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
            return None, f"{DSN_ENV} is not set and .ci/postgres.sh could not start a server: {why}"
        dsn = found.group(1)
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return None, f"cannot connect to {dsn.split('@')[-1]}: {str(exc).strip().splitlines()[0]}"
    return dsn, ""


def server_dsn() -> str:
    """The DSN of a reachable PostgreSQL server (skips or fails the calling test when there is none)."""
    dsn, why = _find_server()
    if dsn is None:
        unavailable(why)
    return dsn


def _with_dbname(dsn: str, dbname: str) -> str:
    """The same server and user as `dsn`, database `dbname`, as a postgresql:// URL (what the log opens)."""
    from urllib.parse import quote

    import psycopg

    p = psycopg.conninfo.conninfo_to_dict(dsn)
    auth = quote(p.get("user", ""), safe="") + (":" + quote(p["password"], safe="") if p.get("password") else "")
    host = p.get("host", "")
    netloc = f"{auth}@" if auth else ""
    if host.startswith("/"):  # a unix socket folder goes in the query
        return f"postgresql://{netloc}/{dbname}?host={quote(host, safe='')}&port={p.get('port', '5432')}"
    return f"postgresql://{netloc}{host}:{p.get('port', '5432')}/{dbname}"


def fresh_database(label: str) -> tuple[str, callable]:
    """(DSN of a new empty database, drop()) on the test server."""
    import psycopg

    admin = server_dsn()
    name = "fp_" + re.sub(r"[^a-z0-9_]", "_", label.lower())[-40:] + "_" + secrets.token_hex(4)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return _with_dbname(admin, name), drop


@pytest.fixture(scope="module")
def pg_dsn(request):
    """A DSN of a database created for this test module (dropped after it)."""
    dsn, drop = fresh_database(request.module.__name__)
    yield dsn
    drop()


@contextmanager
def stopped_writer(code: str):
    """A child process running `code`, which prints "stopping" where a writer is to stop (holding a
    lock, say) and SIGSTOPs itself: alive, never answering, what a hung or debugged engine looks like
    to the database. Killed on exit."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "stopping"
        yield child
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


def seconds_blocked(fn, limit: float):
    """(seconds fn took, its result), fn run on a thread; fails the test if it is not done within `limit`."""
    out = {}

    def run():
        t = time.monotonic()
        try:
            out["result"] = fn()
        except BaseException as e:  # re-raised on the test's thread
            out["error"] = e
        out["seconds"] = time.monotonic() - t

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        pytest.fail(f"still blocked after {limit} s: the stopped writer's lock was never released")
    if "error" in out:
        raise out["error"]
    return out["seconds"], out["result"]


class FreezingProxy:
    """A TCP proxy in front of PostgreSQL that forwards the client's messages until one longer than
    `longer_than` bytes starts, forwards `keep` bytes of it and then nothing more from that client: the
    server sees a statement cut off mid-send, as from a client stopped between two of libpq's writes.
    `dsn`: the same database, user and options as `url`, through the proxy."""

    def __init__(self, url: str, longer_than: int = 8192, keep: int = 4096) -> None:
        import socket
        from urllib.parse import urlsplit

        u = urlsplit(url)
        self._target, self.longer_than, self.keep = (u.hostname, u.port), longer_than, keep
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.froze = threading.Event()
        self._sockets = []
        user = u.netloc.rpartition("@")[0]  # name and password, as given
        query = "&".join(filter(None, [u.query, "sslmode=disable&gssencmode=disable"]))  # it parses plain messages
        self.dsn = u._replace(netloc=f"{user}@127.0.0.1:{self.port}", query=query).geturl()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._target)
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()
            threading.Thread(target=self._client_to_server, args=(client, server), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            s.close()

    def _client_to_server(self, client, server) -> None:
        buf, typed = b"", False  # the startup message has no type byte; every later one has
        try:
            while data := client.recv(65536):
                buf += data
                while True:
                    head = 5 if typed else 4
                    if len(buf) < head:
                        break
                    length = int.from_bytes(buf[head - 4 : head], "big") + head - 4
                    if typed and length > self.longer_than:
                        server.sendall(buf[: self.keep])
                        self.froze.set()
                        return  # the rest never arrives; the client's socket stays open
                    if len(buf) < length:
                        break
                    server.sendall(buf[:length])
                    buf, typed = buf[length:], True
        except OSError:
            pass

    def start_cut(self, fn, what: str):
        """Run `fn`, whose large statement this proxy will cut, on a thread, and wait (30 s at most)
        for the cut; (thread, outcome), outcome["error"] being what fn raised once it ends."""
        outcome = {}

        def run():
            try:
                fn()
            except Exception as e:  # read by the test
                outcome["error"] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        assert self.froze.wait(30), f"the large {what} never started"
        return t, outcome

    def close(self) -> None:
        """Stop listening and drop every connection: the server then ends a cut-off session (and its
        locks) at once, so a test that failed does not leave threads blocked behind them."""
        import socket

        self._listener.close()
        for s in self._sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)  # close() alone neither wakes a thread in recv nor sends FIN
            except OSError:
                pass
            s.close()
