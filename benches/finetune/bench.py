#!/usr/bin/env python3
"""Training throughput, nstream finetune vs PyTorch + transformers + peft, same machine, same run.

Both sides train SmolLM2-135M-Instruct (the quickstart's Q4_1 GGUF dequantised to f32: nstream
reads the GGUF; PyTorch reads the same weights written by `nstream finetune --method full` with a
learning rate of 1e-30, i.e. the dequantised base in the Hugging Face layout) on the same
batches: `--batch` sequences of `--seq-len` tokens with the loss on every token after the first,
LoRA rank `--rank` on q/k/v/o (or full fine-tuning with `--method full`), AdamW, `--threads`
threads. Reports training tokens/s of each (steps after the first, which warms up) and the ratio.

Usage (the venv of scripts/python-finetune-env.sh):
    "$(scripts/python-finetune-env.sh)" benches/finetune/bench.py --nstream target/release/nstream
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def records(path, count, words):
    """Prompt/completion records whose completion is long enough to fill the sequence."""
    with open(path, "w") as out:
        for index in range(count):
            text = " ".join(f"w{(index * 7 + k) % 97}" for k in range(words))
            out.write(json.dumps({"prompt": "Repeat.", "completion": text}) + "\n")


def run_nstream(args, work, method, steps, batch, seq_len, extra=()):
    output = work / f"nstream-{method}-{steps}"
    command = [args.nstream, "finetune", "--model", str(ROOT / "examples/quickstart.yaml"), "--name",
               "smollm2-135m-instruct", "--data", str(work / "data.jsonl"), "--out-dir", str(output),
               "--max-steps", str(steps), "--batch-size", str(batch), "--max-seq-len", str(seq_len),
               "--rank", str(args.rank), "--method", method, "--progress", "quiet", *extra]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    subprocess.run(command, check=True, env=env)
    return output


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--nstream", default=str(ROOT / "target/release/nstream"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--out", type=Path,
                        help="also write the result to this file (benches/finetune/results/DATE-METHOD.json) and "
                             "draw the chart of that date's results next to it")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="nstream-finetune-bench-"))
    records(work / "data.jsonl", 64, args.seq_len)
    # The dequantised base in the Hugging Face layout, for PyTorch.
    base = run_nstream(args, work, "full", 1, 1, 64, ["--learning-rate", "1e-30"])
    ours = run_nstream(args, work, args.method, args.steps, args.batch, args.seq_len)
    metrics = [json.loads(line) for line in (ours / "metrics.jsonl").read_text().splitlines()]
    rates = [entry["tokens_per_second"] for entry in metrics if "tokens_per_second" in entry][1:]
    ours_rate = sum(rates) / len(rates)

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if args.method == "lora":
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                 task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(args.steps):
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), generator=generator)
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    torch_rate = args.batch * args.seq_len / (sum(times[1:]) / len(times[1:]))
    line = json.dumps({
        "method": args.method, "batch": args.batch, "seq_len": args.seq_len, "rank": args.rank,
        "threads": args.threads, "steps": args.steps,
        "nstream_tokens_per_second": round(ours_rate, 1), "torch_tokens_per_second": round(torch_rate, 1),
        "ratio": round(ours_rate / torch_rate, 3), "torch": torch.__version__,
    })
    print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
        # One chart per date: the methods' files of the same date side by side (2026-12-06-lora.json, -full.json).
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import chart  # benches/chart.py
        date = args.out.stem.split("-")[:3]
        chart.after_run(*sorted({args.out, *args.out.parent.glob("-".join(date) + "-*.json")}), bench="finetune")


if __name__ == "__main__":
    main()
