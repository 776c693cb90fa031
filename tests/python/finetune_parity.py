#!/usr/bin/env python3
"""Parity of `nstream finetune` with PyTorch + transformers + peft.

Given the output folder of a run made with `--record-batches` (it holds the step-0 adapter of a
LoRA run, every step's token batches and our final logits on one example) and the base checkpoint
folder, this replays the run in PyTorch: `PeftModel.from_pretrained(base, initial_adapter,
is_trainable=True)` for LoRA, every weight of the base trainable for `--method full`, the same
batches, `torch.optim.AdamW`, transformers' `get_cosine_schedule_with_warmup`, `clip_grad_norm_`,
and compares

- the step-1 loss (before any update): equal within 1e-4 relative;
- the loss of every later step, in particular after 20 AdamW steps: within 1% relative;
- the logits of what we wrote (`PeftModel.from_pretrained(base, our_final_adapter)`, or the fully
  fine-tuned model folder loaded by `AutoModelForCausalLM`) on the probe example against our own
  forward: max |difference| within 1e-3 (logits of order 1-10; f32).

Run with the venv of scripts/python-finetune-env.sh:
    "$(scripts/python-finetune-env.sh)" tests/python/finetune_parity.py OUTPUT BASE_DIR
Prints one JSON line with the figures; exits 1 when a check fails.
"""
import json
import math
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup


def main():
    output, base_dir = Path(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    torch.set_num_threads(2)
    args = json.loads((output / "training_args.json").read_text())
    steps = json.loads((output / "parity" / "batches-from-0.json").read_text())
    ours = {}
    for line in (output / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("loss") is not None:
            ours[entry["step"]] = entry["loss"]
    if args["dropout"] != 0.0:
        sys.exit("parity needs --dropout 0 (dropout masks are drawn differently)")

    full = args["method"] == "full"
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if full:
        model = base
    else:
        model = PeftModel.from_pretrained(base, str(output / "parity" / "initial_adapter"), is_trainable=True)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args["learning_rate"], betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=args["weight_decay"], foreach=False)
    total = args["max_steps"] or len(steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args["warmup"], total)
    theirs = {}
    for step in steps:
        targets_total = sum(len(micro["targets"]) for micro in step["micro_batches"])
        loss_value = 0.0
        for micro in step["micro_batches"]:
            ids = torch.tensor(micro["tokens"], dtype=torch.long).reshape(micro["batch"], micro["length"])
            logits = model(input_ids=ids).logits.reshape(-1, base.config.vocab_size)
            rows = torch.tensor(micro["target_rows"], dtype=torch.long)
            targets = torch.tensor(micro["targets"], dtype=torch.long)
            loss = torch.nn.functional.cross_entropy(logits[rows], targets, reduction="sum") / targets_total
            loss.backward()
            loss_value += loss.item()
        if args["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(parameters, args["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        theirs[step["step"]] = loss_value

    failures = []
    first = min(theirs)
    relative = lambda a, b: abs(a - b) / max(abs(b), 1e-12)
    step_one = relative(ours[first], theirs[first])
    if step_one > 1e-4:
        failures.append(f"step {first} loss: ours {ours[first]} vs torch {theirs[first]}")
    worst_step, worst = max(((s, relative(ours[s], theirs[s])) for s in theirs), key=lambda item: item[1])
    if worst > 0.01:
        failures.append(f"step {worst_step} loss: ours {ours[worst_step]} vs torch {theirs[worst_step]}")

    probe = json.loads((output / "parity" / "probe.json").read_text())
    if full:
        trained = AutoModelForCausalLM.from_pretrained(str(output), dtype=torch.float32)
    else:
        fresh = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        trained = PeftModel.from_pretrained(fresh, str(output))
    trained.eval()
    with torch.no_grad():
        logits = trained(input_ids=torch.tensor([probe["tokens"]], dtype=torch.long)).logits[0]
    logits = logits[probe["first_position"]:]
    ours_logits = torch.tensor(probe["logits"])
    logit_difference = (logits - ours_logits).abs().max().item()
    if not logit_difference <= 1e-3:
        failures.append(f"final {'model' if full else 'adapter'} logits differ by {logit_difference}")
    last = max(theirs)
    print(json.dumps({
        "method": args["method"],
        "steps": len(theirs),
        "step1_loss": {"ours": ours[first], "torch": theirs[first], "relative": step_one},
        "last_loss": {"step": last, "ours": ours[last], "torch": theirs[last], "relative": relative(ours[last], theirs[last])},
        "worst_step_relative": {"step": worst_step, "relative": worst},
        "logits_max_abs_difference": logit_difference,
        "versions": {"torch": torch.__version__, "peft": __import__("peft").__version__,
                     "transformers": __import__("transformers").__version__},
    }))
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
