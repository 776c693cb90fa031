#!/usr/bin/env bash
# The parity check of scripts/finetune-parity.sh, once on SmolLM2-135M-Instruct (the quickstart's
# Q4_1 GGUF, dequantised to f32): a LoRA run (r 8 on all seven projections) and a full
# fine-tuning run, 21 steps each with --record-batches, replayed in PyTorch + transformers + peft
# by tests/python/finetune_parity.py from the same f32 weights. PyTorch reads the dequantised base
# as `nstream finetune --method full` writes it after one step at a learning rate of 1e-30 (the
# weights unchanged, in the Hugging Face layout). Not part of CI (minutes, and the model cache of
# scripts/models.sh); docs/finetune.md reports its figures.
#
# Usage: benches/finetune/parity-smollm2.sh [NSTREAM_BIN]   (default: target/release/nstream)
set -euo pipefail
cd "$(dirname "$0")/../.."
nstream="${1:-target/release/nstream}"
python="$(scripts/python-finetune-env.sh)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1 RAYON_NUM_THREADS=2
model=(--model examples/quickstart.yaml --name smollm2-135m-instruct)
"$python" tests/python/finetune_parity_data.py "$work/train.jsonl"
"$nstream" finetune "${model[@]}" --data "$work/train.jsonl" --out-dir "$work/base" --method full \
  --max-steps 1 --batch-size 1 --learning-rate 1e-30 --progress quiet >&2
common=(--data "$work/train.jsonl" --validation-split 0.2 --max-steps 21 --batch-size 3
  --gradient-accumulation 2 --warmup 2 --record-batches --progress quiet)
"$nstream" finetune "${model[@]}" "${common[@]}" --out-dir "$work/lora" --learning-rate 3e-3 \
  --rank 8 --alpha 16 --target-modules all-linear >&2
"$python" tests/python/finetune_parity.py "$work/lora" "$work/base"
"$nstream" finetune "${model[@]}" "${common[@]}" --out-dir "$work/full" --method full \
  --learning-rate 1e-4 >&2
"$python" tests/python/finetune_parity.py "$work/full" "$work/base"
