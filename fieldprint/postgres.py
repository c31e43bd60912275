"""What the PostgreSQL backends (the log's storage, the state store, the pgvector index) share."""

from __future__ import annotations

from fieldprint.errors import FieldprintError

try:
    import psycopg
except ImportError:  # the optional dependency group "postgres"
    psycopg = None


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
