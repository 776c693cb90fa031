#!/usr/bin/env bash
# Installs PostgreSQL (Debian's package) and the pgvector extension 0.8.6 from the source tarball
# vendored in vendor/ (PostgreSQL License; Debian 12 ships no pgvector package, and GitHub is not
# one of the registries a CI box can always reach). About 30 s; idempotent. Needs root for apt-get
# and `make install`. Prints `PGBIN=...` (the server's bin folder) as its last line.
#
#   scripts/pgvector-install.sh           # install when missing
#   scripts/pgvector-install.sh --check   # exit 0 when installed, 1 otherwise
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
VERSION=0.8.6
TARBALL="$HERE/../vendor/pgvector-$VERSION.tar.gz"

newest_server() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 | xargs -r dirname | xargs -r basename
}

MAJOR=$(newest_server || true)
if [ -z "$MAJOR" ]; then
  [ "${1:-}" = --check ] && exit 1
  apt-get update -qq >/dev/null && apt-get install -y -qq postgresql >/dev/null
  MAJOR=$(newest_server)
fi
PGBIN=/usr/lib/postgresql/$MAJOR/bin
if [ -f "/usr/share/postgresql/$MAJOR/extension/vector.control" ] && [ -f "/usr/lib/postgresql/$MAJOR/lib/vector.so" ]; then
  echo "pgvector already installed for PostgreSQL $MAJOR" >&2
  echo "PGBIN=$PGBIN"
  exit 0
fi
[ "${1:-}" = --check ] && exit 1
if [ ! -d "/usr/include/postgresql/$MAJOR/server" ]; then
  apt-get update -qq >/dev/null && apt-get install -y -qq "postgresql-server-dev-$MAJOR" >/dev/null
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
tar xzf "$TARBALL" -C "$WORK"
# OPTFLAGS="": no -march=native, so the extension also runs on other CPUs of the same architecture.
make -C "$WORK/pgvector-$VERSION" -j"$(nproc)" OPTFLAGS="" PG_CONFIG="$PGBIN/pg_config" >"$WORK/build.log" 2>&1 \
  || { tail -20 "$WORK/build.log" >&2; exit 1; }
make -C "$WORK/pgvector-$VERSION" install PG_CONFIG="$PGBIN/pg_config" >>"$WORK/build.log" 2>&1 \
  || { tail -20 "$WORK/build.log" >&2; exit 1; }
echo "pgvector $VERSION installed for PostgreSQL $MAJOR" >&2
echo "PGBIN=$PGBIN"
