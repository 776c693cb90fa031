#!/usr/bin/env bash
# Parity of nstream's run-time LoRA adapters with Python peft on the committed tiny checkpoint
# (tests/fixtures/llm/tiny-llama/f32): tests/python/lora_parity.py makes PEFT adapters with
# non-zero B (all linear modules; rsLoRA on some modules), and compares PeftModel's greedy tokens
# and logits with nstream-llm's `lora_greedy` example (adapter applied unmerged): tokens equal,
# logits within 1e-4. Builds the pinned venv of scripts/python-finetune-env.sh on first use.
#
# Usage: scripts/lora-parity.sh
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${XDG_CACHE_HOME:-$HOME/.cache}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/nstream-target}"
cargo build --locked -p nstream-llm --example lora_greedy >&2
python="$(scripts/python-finetune-env.sh)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" tests/python/lora_parity.py "$PWD/tests/fixtures/llm/tiny-llama/f32" "$work" \
  "$CARGO_TARGET_DIR/debug/examples/lora_greedy"
