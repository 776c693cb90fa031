#!/usr/bin/env bash
# The distillation demo in one command (docs/distill.md): lays out the offline weights, builds
# nstream, starts the local teacher (teacher.py, a rule-based stand-in for GPT-4o) and runs
# `nstream distill -f examples/distill/distill.yaml`: the teacher answers 400 orders, SmolLM2-135M
# is fine-tuned with LoRA on 80% of them, and the base, the student and the teacher are scored on
# the other 20%. Writes runs/distill-orders/ (report.md, student.yaml, eval/, student/).
# Run it again after a kill: every stage resumes. Extra arguments go to `nstream distill`
# (e.g. --overwrite to start again).
set -euo pipefail
cd "$(dirname "$0")/../.."
cache="${XDG_CACHE_HOME:-$HOME/.cache}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/nstream-target}"
port=8765  # the endpoint of the teacher MegaModel in distill.yaml

scripts/offline-models.sh
if [ -z "${NSTREAM:-}" ]; then
  cargo build --release --locked -p nstream
  NSTREAM="$CARGO_TARGET_DIR/release/nstream"
fi
python3 examples/distill/teacher.py --port "$port" &
teacher=$!
trap 'kill "$teacher" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/stats')" 2>/dev/null && break
  sleep 0.1
done
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-$(nproc)}"
"$NSTREAM" distill -f examples/distill/distill.yaml --progress lines "$@"
