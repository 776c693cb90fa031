#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this). Installs what the tests need
# (offline model weights, a Python venv for the official openai client), cached outside the repo.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${XDG_CACHE_HOME:-$HOME/.cache}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/nstream-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== model weights (offline Hugging Face cache)"
scripts/offline-models.sh

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== tests"
cargo test --workspace --locked
