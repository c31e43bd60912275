"""tests/pg.py: without a reachable server the PostgreSQL tests skip and say why, and with
FIELDPRINT_REQUIRE_POSTGRES=1 that skip is a failure (CI must not pass by skipping them)."""

import os
import subprocess
import sys

import pg

PROBE = """
from pg import pg_dsn  # noqa: F401

def test_needs_postgres(pg_dsn):
    assert pg_dsn
"""


def _run_probe(tmp_path, **env):
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(pg.__file__), **env}  # None: unset it
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={k: v for k, v in env.items() if v is not None})


def test_unreachable_server_skips_with_the_reason(tmp_path):
    out = _run_probe(tmp_path, FIELDPRINT_POSTGRES_DSN="postgresql://nobody@127.0.0.1:1/none", FIELDPRINT_REQUIRE_POSTGRES=None)
    assert out.returncode == 0 and "1 skipped" in out.stdout, out.stdout + out.stderr
    assert "no PostgreSQL for these tests: cannot connect to 127.0.0.1:1/none" in out.stdout, out.stdout


def test_unreachable_server_fails_when_postgres_is_required(tmp_path):
    out = _run_probe(tmp_path, FIELDPRINT_POSTGRES_DSN="postgresql://nobody@127.0.0.1:1/none", FIELDPRINT_REQUIRE_POSTGRES="1")
    assert out.returncode == 1 and "1 error" in out.stdout, out.stdout + out.stderr
    assert "PostgreSQL is required (FIELDPRINT_REQUIRE_POSTGRES=1) but cannot connect" in out.stdout, out.stdout
