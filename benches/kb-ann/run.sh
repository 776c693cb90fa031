#!/usr/bin/env bash
# Embedded-store candidates on the same vectors: build time, query latency, recall@10 vs exact.
#   benches/kb-ann/run.sh [COUNT] [DIMENSION] [QUERIES]
# Writes results/<date>.txt and its chart results/<date>.svg (benches/chart.py).
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nstream-kb-ann-target}"
cargo build --release --quiet
results="results/$(date -u +%Y-%m-%d).txt"
mkdir -p results
"$CARGO_TARGET_DIR/release/kb-ann-bench" "$@" | tee "$results"
python3 ../chart.py --bench kb-ann "$results" || echo "chart: could not draw $results (the results are kept)" >&2
