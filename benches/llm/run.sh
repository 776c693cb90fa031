#!/usr/bin/env bash
# nstream-server vs llama.cpp's llama-server (SmolLM2-135M-Instruct Q4_1 GGUF, CPU): builds both
# servers, prepares the model and runs the whole benchmark in one go, then prints a markdown table
# and writes benches/llm/results/<date>.md and .json.
#
#   benches/llm/run.sh                      # the full run (about 10 minutes on 2 cores)
#   benches/llm/run.sh -- ARGS...           # pass ARGS to bench.py (see bench.py --help), e.g. a
#                                           # smoke test: -- --rounds 1 --streams 1,4 --max-tokens 16 --no-write
#
# Needs cargo, cmake, a C++ compiler and python3 (PyPI only on the first run, for the
# llama-cpp-python sdist whose vendored llama.cpp becomes the peer; see build-llama-server.sh).
# Environment: CARGO_TARGET_DIR (default ~/.cache/nstream-target), NSTREAM_BENCH_SKIP_BUILD=1 to
# use the nstream-server already built, NSTREAM_BENCH_NICE (default 0) to build under `nice -n`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/nstream-target}"
export HF_HUB_OFFLINE=1
log() { printf 'run.sh: %s\n' "$*" >&2; }

extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --) shift; extra+=("$@"); break ;;
    *) extra+=("$1"); shift ;;
  esac
done

bench_pid=""
cleanup() {
  if [[ -n "$bench_pid" ]] && kill -0 "$bench_pid" 2>/dev/null; then
    kill -TERM "$bench_pid" 2>/dev/null || true   # bench.py stops the servers it started
    wait "$bench_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

nice_level="${NSTREAM_BENCH_NICE:-0}"
if [[ "${NSTREAM_BENCH_SKIP_BUILD:-0}" != 1 ]]; then
  log "building the release nstream-server into $CARGO_TARGET_DIR"
  nice -n "$nice_level" cargo build --release --quiet -p nstream-server-bin
fi
server_bin="$CARGO_TARGET_DIR/release/nstream-server"
[[ -x "$server_bin" ]] || { log "no $server_bin"; exit 1; }

log "llama-server (built once, cached)"
llama_server="$(nice -n "$nice_level" benches/llm/build-llama-server.sh)"

log "offline model weights"
scripts/offline-models.sh >&2

python3 benches/llm/bench.py --server-bin "$server_bin" --llama-server "$llama_server" "${extra[@]}" &
bench_pid=$!
status=0
wait "$bench_pid" || status=$?
bench_pid=""
exit "$status"
