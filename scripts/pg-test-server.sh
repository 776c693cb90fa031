#!/usr/bin/env bash
# A throwaway PostgreSQL 15 + pgvector server for the knowledge-base tests, bound to 127.0.0.1.
#
#   scripts/pg-test-server.sh start   # prints `export NSTREAM_TEST_PG_URL=postgres://...` and
#                                     # NSTREAM_TEST_PG_CA (the CA of its TLS certificate)
#   scripts/pg-test-server.sh stop
#
# Installs PostgreSQL and pgvector 0.8.6 first (scripts/pgvector-install.sh, from the source in
# vendor/; needs root for apt-get). PostgreSQL refuses to run as root, so the server runs as the
# `postgres` user (or the current user when not root). The data folder and port live in $STATE (one server at a time).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
STATE="${NSTREAM_PG_STATE:-${TMPDIR:-/tmp}/nstream-pg-test}"
PORT="${NSTREAM_PG_PORT:-54329}"

as_server_user() {
  if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$1"; else bash -c "$1"; fi
}

pgbin() {
  bash "$HERE/pgvector-install.sh" | sed -n 's/^PGBIN=//p'
}

case "${1:-}" in
  start)
    PGBIN=$(pgbin)
    [ -x "$PGBIN/initdb" ] || { echo "no PostgreSQL found (PGBIN=$PGBIN)" >&2; exit 1; }
    if [ -f "$STATE/data/postmaster.pid" ]; then
      as_server_user "$PGBIN/pg_ctl -D $STATE/data stop -m immediate" >/dev/null 2>&1 || true
    fi
    rm -rf "$STATE"; mkdir -p "$STATE"
    [ "$(id -u)" = 0 ] && chown postgres "$STATE"
    as_server_user "$PGBIN/initdb -D $STATE/data -A trust -U postgres" >"$STATE/initdb.log" 2>&1 \
      || { cat "$STATE/initdb.log" >&2; exit 1; }
    # TLS as well as plain connections: a throwaway CA and a server certificate for 127.0.0.1 and
    # localhost (the TLS test connects with sslmode=verify-full and this CA).
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=nstream test CA" \
      -keyout "$STATE/ca.key" -out "$STATE/ca.crt" >/dev/null 2>&1
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
      -keyout "$STATE/server.key" -out "$STATE/server.csr" >/dev/null 2>&1
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$STATE/san.ext"
    openssl x509 -req -in "$STATE/server.csr" -CA "$STATE/ca.crt" -CAkey "$STATE/ca.key" -CAcreateserial \
      -days 2 -extfile "$STATE/san.ext" -out "$STATE/server.crt" >/dev/null 2>&1
    chmod 600 "$STATE/server.key"
    [ "$(id -u)" = 0 ] && chown postgres "$STATE/server.key" "$STATE/server.crt"
    tls="-c ssl=on -c ssl_cert_file=$STATE/server.crt -c ssl_key_file=$STATE/server.key"
    as_server_user "$PGBIN/pg_ctl -D $STATE/data -w -o '-p $PORT -k $STATE -c listen_addresses=127.0.0.1 -c fsync=off $tls' -l $STATE/server.log start" >/dev/null \
      || { cat "$STATE/server.log" >&2; exit 1; }
    as_server_user "$PGBIN/psql -h 127.0.0.1 -p $PORT -U postgres -qc 'CREATE EXTENSION IF NOT EXISTS vector'" >/dev/null
    echo "export NSTREAM_TEST_PG_URL=postgres://postgres@127.0.0.1:$PORT/postgres"
    echo "export NSTREAM_TEST_PG_CA=$STATE/ca.crt"
    ;;
  stop)
    PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    if [ -n "$PGBIN" ] && [ -f "$STATE/data/postmaster.pid" ]; then
      as_server_user "$PGBIN/pg_ctl -D $STATE/data -w stop -m fast" >/dev/null
    fi
    rm -rf "$STATE"
    ;;
  *)
    echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
