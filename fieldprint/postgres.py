"""What the PostgreSQL backends (the log's storage, the state store, the pgvector index) share."""

from __future__ import annotations

from fieldprint.errors import FieldprintError

try:
    import psycopg
    from psycopg import sql
except ImportError:  # the optional dependency group "postgres"
    psycopg = sql = None


def require_psycopg(error: type[FieldprintError]) -> None:
    """Raise `error` saying what to install when psycopg 3 is missing."""
    if psycopg is None:
        raise error("the PostgreSQL backends need psycopg 3: pip install 'fieldprint[postgres]'")


def redact(url: str) -> str:
    """The URL to name in messages: user, host, port and database, never the password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return "<a PostgreSQL URL that cannot be parsed>"
    user = f"{info['user']}@" if info.get("user") else ""
    port = f":{info['port']}" if info.get("port") else ""
    return f"postgresql://{user}{info.get('host') or 'localhost'}{port}/{info.get('dbname') or ''}"


def execute_simple(conn, query: str, *values):
    """Run one statement as one simple-protocol message: no parameters, never prepared; `values`, if
    any, fill the query's {} as SQL literals (without values the query goes as it is, braces and all).

    For the statements a writer runs while it holds a lock other writers wait for (the log's head row,
    the memory's locks). With parameters a statement is several extended-protocol messages (Parse,
    Bind, Execute, Sync), and libpq sends more than 8 KB of them in more than one write. A writer
    stopped between two writes leaves its backend waiting for the rest, where neither the
    idle-in-transaction timeout (armed only between statements) nor statement_timeout (ignored while
    the server reads a command) fires: the lock stayed held for as long as the process lived
    (PostgreSQL 16, measured; the tests cut such statements in half through a proxy, tests/pg.py).
    Stopped anywhere in one simple message, the transaction is idle, and its idle timeout ends it.
    """
    if values:
        query = sql.SQL(query).format(*(sql.Literal(v) for v in values))
    return conn.execute(query, prepare=False)
