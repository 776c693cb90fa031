#!/usr/bin/env bash
# LoRA adapters vs the bare base on one nstream-server (SmolLM2-135M-Instruct Q4_1 GGUF, CPU):
# builds the release server and runs benches/adapters/bench.py (decode with one adapter vs the base;
# 16 streams over 4 adapters vs 16 of the base; see its docstring).
#
#   benches/adapters/run.sh                 # the full run
#   benches/adapters/run.sh -- ARGS...      # pass ARGS to bench.py, e.g. -- --rounds 1 --no-write
#
# Environment: CARGO_TARGET_DIR (default ~/.cache/nstream-target), NSTREAM_BENCH_SKIP_BUILD=1 to
# use the nstream-server already built.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/nstream-target}"
export HF_HUB_OFFLINE=1
extra=()
[[ "${1:-}" == "--" ]] && { shift; extra=("$@"); }
if [[ "${NSTREAM_BENCH_SKIP_BUILD:-0}" != 1 ]]; then
  cargo build --release --quiet -p nstream-server-bin
fi
scripts/offline-models.sh >&2
exec python3 benches/adapters/bench.py --server-bin "$CARGO_TARGET_DIR/release/nstream-server" "${extra[@]}"
