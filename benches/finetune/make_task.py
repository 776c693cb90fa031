#!/usr/bin/env python3
"""A small fine-tuning task for the SmolLM2 demonstration run: unit conversions answered in one
fixed sentence shape ("12 km is 12000 m."), which the instruct model does not follow by itself.
Deterministic (seeded); writes OpenAI chat records, the format `nstream generate` writes.

Usage: python3 benches/finetune/make_task.py OUT.jsonl [COUNT]
"""
import json
import random
import sys

UNITS = [("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60),
         ("minutes", "seconds", 60), ("litres", "millilitres", 1000), ("days", "hours", 24)]

def main():
    path = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 240
    rng = random.Random(7)
    with open(path, "w") as out:
        for _ in range(count):
            source, target, factor = rng.choice(UNITS)
            value = rng.randint(2, 99)
            messages = [
                {"role": "system", "content": "Convert units. Answer with one sentence."},
                {"role": "user", "content": f"How many {target} are in {value} {source}?"},
                {"role": "assistant", "content": f"{value} {source} is {value * factor} {target}."},
            ]
            out.write(json.dumps({"messages": messages}) + "\n")

if __name__ == "__main__":
    main()
