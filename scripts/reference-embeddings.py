#!/usr/bin/env python3
"""Reference embeddings of all-MiniLM-L6-v2 from sentence-transformers, for nstream-embed's tests.

Writes, under tests/fixtures/embeddings/:
  corpus.jsonl                          {"id": N, "text": "..."} per line; deterministic (seeded)
  all-minilm-l6-v2.reference.jsonl      {"id": N, "tokens": T, "embedding": [384 floats]} per line,
                                        T = token count before truncation, special tokens included
  all-minilm-l6-v2.reference.meta.json  versions used, model revision, settings

Run after scripts/offline-models.sh, in a venv with sentence-transformers and torch:
  python3 -m venv /root/.cache/nstream/venv-ref
  /root/.cache/nstream/venv-ref/bin/pip install torch sentence-transformers
  HF_HUB_OFFLINE=1 /root/.cache/nstream/venv-ref/bin/python scripts/reference-embeddings.py

With --bench, it also times sentence-transformers' encode() over the corpus (the peer number for
the nstream-embed benchmark) and prints sentences/s; nothing is written then.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "embeddings"
SEED = 20261125

WORDS = (
    "model embedding vector search query document index token batch server latency throughput "
    "the a of and to in is for on with as by at from that this it be are was were will can "
    "river mountain city ocean forest library kitchen garden window station market bridge "
    "quickly slowly carefully quietly brightly softly suddenly rarely always never often "
    "build read write learn measure compare deploy train serve cache load split join sort "
    "red green blue small large ancient modern simple complex bright dark warm cold"
).split()

FIXED = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    ".",
    " ",
    "a",
    "Café au lait, crème brûlée and a piñata: naïve façades in São Paulo.",
    "Größenordnung und Übermaß: Straßenbahn fährt über die Brücke.",
    "東京は日本の首都です。",
    "机器学习模型可以把句子转换成向量。",
    "한국어 문장도 임베딩할 수 있습니다.",
    "Привет, как дела? Это тест на кириллице.",
    "مرحبا بالعالم، هذا اختبار.",
    "🚀 Launch day! 🎉🎉 Embeddings for emoji 😀 and symbols ∑∫√.",
    "I ❤️ NY — “smart quotes”, ‘single’, and an ellipsis…",
    "Ελληνικά: η γρήγορη καφέ αλεπού.",
    "e = mc^2; f(x) = x**2 + 3x - 7; #hashtag @mention https://example.com/path?q=1",
    "UPPER CASE SENTENCE WITH SHOUTING",
    "tabs\tand\nnewlines\r\nin one input",
    "ᚠᛇᚻ᛫ᛒᛦᚦ runes and 𝔣𝔯𝔞𝔨𝔱𝔲𝔯 math letters",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


def corpus() -> list[str]:
    rng = random.Random(SEED)
    texts = list(FIXED)
    # Short and medium sentences.
    while len(texts) < 200:
        n = rng.choice([2, 3, 5, 8, 12, 16, 24, 32, 48, 64])
        words = [rng.choice(WORDS) for _ in range(n)]
        text = " ".join(words).capitalize() + rng.choice([".", "!", "?", ""])
        if rng.random() < 0.15:
            text += " " + rng.choice(FIXED[5:15])
        texts.append(text)
    # Long inputs, well past the 256-token limit.
    for n in (300, 450, 700, 1200):
        texts.append(" ".join(rng.choice(WORDS) for _ in range(n)) + ".")
    texts.append(("日本語の長い文章。" * 60) + " end")
    texts.append(" ".join(FIXED[5:15]) * 6)
    return texts


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
    tmp.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", help="time encode() and write nothing")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch
    import transformers
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(MODEL, device="cpu")
    texts = corpus()

    if args.bench:
        print(f"torch threads: {torch.get_num_threads()}", file=sys.stderr)
        model.encode(texts[:64], batch_size=args.batch_size)
        best = float("inf")
        for _ in range(args.rounds):
            start = time.perf_counter()
            model.encode(texts, batch_size=args.batch_size)
            best = min(best, time.perf_counter() - start)
        print(
            json.dumps(
                {
                    "peer": f"sentence-transformers {sentence_transformers.__version__}",
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "sentences": len(texts),
                    "batch_size": args.batch_size,
                    "best_seconds": round(best, 4),
                    "sentences_per_second": round(len(texts) / best, 1),
                }
            )
        )
        return 0

    embeddings = model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
    token_counts = [len(ids) for ids in model.tokenizer(texts)["input_ids"]]

    FIXTURES.mkdir(parents=True, exist_ok=True)
    write_jsonl(FIXTURES / "corpus.jsonl", [{"id": i, "text": t} for i, t in enumerate(texts)])
    write_jsonl(
        FIXTURES / "all-minilm-l6-v2.reference.jsonl",
        [
            {"id": i, "tokens": n, "embedding": [float(f"{x:.7g}") for x in e.tolist()]}
            for i, (n, e) in enumerate(zip(token_counts, embeddings))
        ],
    )
    from huggingface_hub import hf_hub_download

    snapshot = Path(hf_hub_download(MODEL, "config.json")).parent
    meta = {
        "model": MODEL,
        "model_snapshot": snapshot.name,
        "max_seq_length": model.max_seq_length,
        "normalized": True,
        "sentences": len(texts),
        "dimension": int(embeddings.shape[1]),
        "seed": SEED,
        "float_format": "float32 rounded to 7 significant digits",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
        },
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE"),
    }
    (FIXTURES / "all-minilm-l6-v2.reference.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {len(texts)} embeddings to {FIXTURES}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
