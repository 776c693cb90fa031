#!/usr/bin/env bash
# Parity of `nstream finetune` with PyTorch + transformers + peft on the committed tiny checkpoint
# (tests/fixtures/llm/tiny-llama/f32): a 21-step LoRA run and a 21-step full fine-tuning run with
# --record-batches, each replayed in PyTorch by tests/python/finetune_parity.py (step-1 loss within
# 1e-4 relative, every later step within 1%, the logits of what we wrote within 1e-3). Builds the pinned venv of
# scripts/python-finetune-env.sh on first use (torch from PyPI: minutes, a few GB).
#
# Usage: scripts/finetune-parity.sh [NSTREAM_BIN]   (default: builds the debug nstream)
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${XDG_CACHE_HOME:-$HOME/.cache}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/nstream-target}"
nstream="${1:-}"
if [[ -z "$nstream" ]]; then
  cargo build --locked -p nstream >&2
  nstream="$CARGO_TARGET_DIR/debug/nstream"
fi
python="$(scripts/python-finetune-env.sh)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
revision=0123456789abcdef0123456789abcdef01234567
repo="$work/hub/models--nstream-test--tiny-llama-f32"
mkdir -p "$repo/snapshots/$revision" "$repo/refs"
printf '%s' "$revision" >"$repo/refs/main"
for file in tests/fixtures/llm/tiny-llama/f32/*; do
  [[ "$(basename "$file")" == reference.json ]] || cp "$file" "$repo/snapshots/$revision/"
done
cat >"$work/base.yaml" <<'YAML'
apiVersion: llm.nstream.ai/v1
kind: BaseModel
metadata:
  name: tiny
spec:
  baseModelName: tiny
  baseModelServingInfo:
    hfModelId: nstream-test/tiny-llama-f32
    modelProvider: HUGGINGFACE
YAML
"$python" tests/python/finetune_parity_data.py "$work/train.jsonl"
HF_HUB_CACHE="$work/hub" HF_HUB_OFFLINE=1 RAYON_NUM_THREADS=2 "$nstream" finetune \
  --model "$work/base.yaml" --data "$work/train.jsonl" --validation-split 0.2 --out-dir "$work/out" \
  --max-steps 21 --batch-size 3 --gradient-accumulation 2 --learning-rate 3e-3 --warmup 2 \
  --rank 4 --alpha 8 --target-modules all-linear --record-batches --progress quiet >&2
"$python" tests/python/finetune_parity.py "$work/out" "$repo/snapshots/$revision"
# Full fine-tuning: every weight trained (the gradients summed by the kernels' sink), a smaller rate.
HF_HUB_CACHE="$work/hub" HF_HUB_OFFLINE=1 RAYON_NUM_THREADS=2 "$nstream" finetune \
  --model "$work/base.yaml" --data "$work/train.jsonl" --validation-split 0.2 --out-dir "$work/full" \
  --method full --max-steps 21 --batch-size 3 --gradient-accumulation 2 --learning-rate 1e-3 \
  --warmup 2 --record-batches --progress quiet >&2
"$python" tests/python/finetune_parity.py "$work/full" "$repo/snapshots/$revision"
