#!/usr/bin/env bash
# Embedded-store candidates on the same vectors: build time, query latency, recall@10 vs exact.
#   benches/kb-ann/run.sh [COUNT] [DIMENSION] [QUERIES]
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nstream-kb-ann-target}"
cargo build --release --quiet
"$CARGO_TARGET_DIR/release/kb-ann-bench" "$@"
