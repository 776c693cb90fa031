#!/usr/bin/env python3
"""Parity of nstream's run-time LoRA with Python peft on the committed tiny f32 Llama.

Makes PEFT adapters with non-zero B (`init_lora_weights=False`, seeded; B scaled down so the
answers stay varied), saves them with `save_pretrained` (the folder nstream serves), computes
`PeftModel`'s greedy tokens and logits for fixed prompts, then runs nstream's
`lora_greedy` example (nstream-llm: the adapter read from the folder, laid out over the base
its `base_model_name_or_path` names, applied unmerged) and compares:

- greedy tokens: equal;
- logits at every step: max |difference| within 1e-4 (f32, logits of order 1-10).

Run with the venv of scripts/python-finetune-env.sh (scripts/lora-parity.sh does it all):
    "$(scripts/python-finetune-env.sh)" tests/python/lora_parity.py BASE_DIR WORK_DIR LORA_GREEDY_BIN
Prints one JSON line per adapter with the figures; exits 1 when a check fails.
"""
import json
import subprocess
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "all-linear": dict(r=4, lora_alpha=8, target_modules=ALL, seed=1),
    "rslora-some": dict(r=8, lora_alpha=4, target_modules=["q_proj", "k_proj", "down_proj"], use_rslora=True, seed=2),
}
PROMPTS = [[1, 17, 42, 99, 7, 250, 3], [1, 300, 5]]
STEPS = 12


def make_adapter(base_dir, folder, settings):
    settings = dict(settings)
    torch.manual_seed(settings.pop("seed"))
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, lora_dropout=0.0, **settings)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.2)
    model.eval()
    model.save_pretrained(folder)
    return model


def greedy(model, prompt):
    ids = list(prompt)
    logits_per_step = []
    with torch.no_grad():
        for _ in range(STEPS + 1):
            logits = model(torch.tensor([ids])).logits[0, -1]
            logits_per_step.append(logits.tolist())
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt):], logits_per_step


def main():
    base_dir, work, binary = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    failed = False
    for name, settings in ADAPTERS.items():
        folder = work / name
        model = make_adapter(base_dir, folder, settings)
        for prompt in PROMPTS:
            expected_tokens, expected_logits = greedy(model, prompt)
            output = subprocess.run(
                [binary, str(folder), ",".join(map(str, prompt)), str(STEPS)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            ours = json.loads(output)
            difference = max(
                abs(a - b) for ours_row, row in zip(ours["logits"], expected_logits) for a, b in zip(ours_row, row)
            )
            with model.disable_adapter():
                base_tokens, _ = greedy(model, prompt)
            ok = ours["tokens"] == expected_tokens and difference < 1e-4 and base_tokens != expected_tokens
            failed |= not ok
            print(json.dumps({
                "adapter": name,
                "prompt": prompt,
                "peft_greedy": expected_tokens,
                "nstream_greedy": ours["tokens"],
                "bare_base_greedy": base_tokens,
                "max_logit_difference": difference,
                "ok": ok,
            }))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
