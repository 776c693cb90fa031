#!/usr/bin/env python3
"""Writes the chat records the fine-tuning parity runs train on (scripts/finetune-parity.sh,
benches/finetune/parity-smollm2.sh): 16 additions in the OpenAI fine-tuning format.

Usage: python finetune_parity_data.py OUT.jsonl
"""
import json
import sys

with open(sys.argv[1], "w") as out:
    for i in range(16):
        messages = [{"role": "system", "content": "You add numbers."},
                    {"role": "user", "content": f"What is {i} plus {i + 3}?"},
                    {"role": "assistant", "content": f"{i} plus {i + 3} is {2 * i + 3}."}]
        out.write(json.dumps({"messages": messages}) + "\n")
