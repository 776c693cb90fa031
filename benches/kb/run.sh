#!/usr/bin/env bash
# nstream's vector stores vs Chroma (embedded, sentence-transformers all-MiniLM-L6-v2 as its
# embedding function): ingest chunks/s, query p50/p99, recall@10 against exact search, at 10k and
# 100k chunks, in one run; the same for the PostgreSQL + pgvector store (a throwaway server from
# scripts/pg-test-server.sh; NSTREAM_BENCH_KB_PG=0 skips it). Prints a markdown table; writes
# benches/kb/results/<date>.json.
#
#   benches/kb/run.sh                     # both sizes
#   benches/kb/run.sh -- --sizes 10000    # pass ARGS to bench.py (see bench.py --help)
#
# Run it on a quiet machine: both sides embed on the CPU. Needs cargo, python3 and PyPI on the
# first run. Environment: CARGO_TARGET_DIR (default ~/.cache/nstream-target), NSTREAM_BENCH_KB_VENV
# (default ~/.cache/nstream/venv-kb), NSTREAM_BENCH_SKIP_BUILD=1 to use the binary already built.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/nstream-target}"
export HF_HUB_OFFLINE=1
venv="${NSTREAM_BENCH_KB_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/nstream/venv-kb}"
pins=(chromadb==1.5.9 torch==2.15.0 sentence-transformers==6.2.0 transformers==5.24.0 numpy==2.4.6 openai==3.57.0)

log() { printf 'run.sh: %s\n' "$*" >&2; }
extra=()
[[ "${1:-}" == "--" ]] && { shift; extra=("$@"); }

if [[ "${NSTREAM_BENCH_SKIP_BUILD:-0}" != 1 ]]; then
  log "building the release server into $CARGO_TARGET_DIR"
  cargo build --release --quiet -p nstream-server-bin
fi
server_bin="$CARGO_TARGET_DIR/release/nstream-server"
[[ -x "$server_bin" ]] || { log "no $server_bin"; exit 1; }

scripts/offline-models.sh
if ! "$venv/bin/python" -c 'import chromadb, sentence_transformers, openai' 2>/dev/null; then
  log "creating $venv with ${pins[*]} (once)"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet "${pins[@]}"
fi
# The pgvector store on a throwaway PostgreSQL 15 + pgvector server (skipped if it cannot start).
pg=()
if [[ "${NSTREAM_BENCH_KB_PG:-1}" == 1 ]] && started="$(scripts/pg-test-server.sh start)"; then
  eval "$started"
  trap 'scripts/pg-test-server.sh stop' EXIT
  pg=(--pg-url "$NSTREAM_TEST_PG_URL")
else
  log "no PostgreSQL server: the pgvector store is not measured"
fi
"$venv/bin/python" benches/kb/bench.py --server-bin "$server_bin" "${pg[@]}" "${extra[@]}"
