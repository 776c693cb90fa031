#!/usr/bin/env bash
# The demonstration run of docs/finetune.md: LoRA on SmolLM2-135M-Instruct (the quickstart's Q4_1
# GGUF, dequantised) over benches/finetune/make_task.py's unit-conversion task, 10% held out for
# validation. Writes runs/smollm2-units/ (adapter, metrics, report, loss_curve.svg).
#
# Usage: benches/finetune/run-smollm2.sh [NSTREAM_BIN] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/../.."
nstream="${1:-target/release/nstream}"
steps="${2:-60}"
work="${NSTREAM_FINETUNE_WORK:-runs}"
mkdir -p "$work"
python3 benches/finetune/make_task.py "$work/units.jsonl" 240
rm -rf "$work/smollm2-units"
HF_HUB_OFFLINE=1 "$nstream" finetune --model examples/quickstart.yaml --name smollm2-135m-instruct \
  --data "$work/units.jsonl" --validation-split 0.1 --out-dir "$work/smollm2-units" \
  --max-steps "$steps" --batch-size 4 --learning-rate 1e-3 --warmup 5 --rank 8 --alpha 16 \
  --target-modules q_proj,k_proj,v_proj,o_proj --max-seq-len 96 --eval-every 10 --progress lines
cat "$work/smollm2-units/report.md"
