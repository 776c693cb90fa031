#!/usr/bin/env python3
"""Tiny random Llama checkpoints in the Hugging Face safetensors layout, with transformers' outputs.

No download is possible here, so the fixture is made from scratch: a small byte-level BPE
tokenizer trained with the `tokenizers` package on a fixed text (ChatML special tokens added), and
random Llama models saved with `save_pretrained` (safetensors + config.json + generation_config.json
+ tokenizer.json + tokenizer_config.json with a ChatML chat template). For each model the reference
holds, per prompt, transformers' token ids, the logits after the prompt's last token and the greedy
continuation (with the top-2 margin at each step, to show how far from a tie each step is).

Models (tests/fixtures/llm/tiny-llama/):
- `f32`:  hidden 64, 2 layers, 4 heads, 2 KV heads (GQA), untied output head, float32.
- `bf16`: the same weights saved as bfloat16. Its reference is transformers in float32 on the
          bf16-rounded weights: nstream computes in f32 on CPU (bf16/f16 converted at load).
- `tied`: hidden 64, 2 layers, 4 heads, 1 KV head, tied embeddings (no lm_head tensor), float16,
          rope_theta 500000; reference again in float32 on the stored weights.
- `qwen2`: a Qwen2 (q/k/v biases, drawn random since transformers initialises biases to zero),
          4 heads, 2 KV heads, tied embeddings, bfloat16, rope_theta 1000000.

Also `sentencepiece/`: a Llama 2 / Mistral style `tokenizer.json` (BPE with byte fallback, `▁`
for spaces, a decoder that strips the leading space, a post-processor that adds `<s>`) with its
ids and decodings from `tokenizers`, for the tokenizer and incremental-decoding tests.

The weights are drawn with a larger initializer range than Llama's 0.02 so that the logits are
far from ties and greedy decoding is a meaningful comparison.

Usage (the reference venv: torch + transformers + tokenizers + safetensors):
    /root/.cache/nstream/venv-ref/bin/python scripts/llm-safetensors-reference.py
"""
import json
import os
import shutil

import safetensors
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "llm", "tiny-llama")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and 3.14159.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Once upon a time, in a small village by the mountains, there lived a cat.",
    "café naïve Zürich, emoji 😀 and symbols → ∞",
] * 4
PROMPTS = [
    "Hello world",
    "The capital of France is",
    "def add(a, b):\n    return",
    "Once upon a time, in a small village by the mountains, there lived",
]
CHAT = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "What is 2+2?"}]
GREEDY_TOKENS = 12


def build_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def build_sentencepiece_tokenizer():
    from tokenizers import normalizers, processors

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)
    ])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens, show_progress=False,
    )
    tok.train_from_iterator([" ".join(CORPUS[:6])] * 2, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    folder = os.path.join(ROOT, "sentencepiece")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    tok.save(os.path.join(folder, "tokenizer.json"))
    texts = ["Hello world", "The capital of France is Paris.", "café 😀 naïve", "  two  spaces"]
    cases = []
    for text in texts:
        with_special = tok.encode(text, add_special_tokens=True).ids
        ids = tok.encode(text, add_special_tokens=False).ids
        cases.append({"text": text, "ids": ids, "ids_with_special": with_special,
                      "decoded": tok.decode(ids, skip_special_tokens=True)})
    with open(os.path.join(folder, "expected.json"), "w") as f:
        json.dump({"cases": cases}, f, indent=1, ensure_ascii=False)
        f.write("\n")


def greedy(model, ids, n):
    out, margins = [], []
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            top2 = torch.topk(logits, 2).values
            best = int(torch.argmax(logits))
            out.append(best)
            margins.append(round(float(top2[0] - top2[1]), 5))
            ids.append(best)
    return out, margins


def reference(model, tokenizer):
    cases = []
    chat_text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    chat_ids = tokenizer(chat_text, add_special_tokens=False)["input_ids"]
    for text, ids, kind in [(p, tokenizer(p, add_special_tokens=False)["input_ids"], "text") for p in PROMPTS] + [
        (chat_text, chat_ids, "chat")
    ]:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        tokens, margins = greedy(model, ids, GREEDY_TOKENS)
        cases.append({
            "kind": kind,
            "text": text,
            "ids": ids,
            "last_logits": [round(float(x), 6) for x in logits],
            "greedy": tokens,
            "greedy_top2_margins": margins,
        })
    return {"chat_messages": CHAT, "cases": cases}


def save(name, model, tokenizer, dtype, torch_version_note):
    folder = os.path.join(ROOT, name)
    shutil.rmtree(folder, ignore_errors=True)
    model.to(dtype).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    # The reference runs in float32 on the weights as stored (nstream's CPU path).
    stored = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref = reference(stored, tokenizer)
    ref["versions"] = torch_version_note
    ref["stored_dtype"] = str(dtype).removeprefix("torch.")
    with open(os.path.join(folder, "reference.json"), "w") as f:
        json.dump(ref, f, indent=None, separators=(",", ":"))
        f.write("\n")
    return ref


def main():
    torch.manual_seed(0)
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "script": "scripts/llm-safetensors-reference.py",
    }
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.15, bos_token_id=eot,
        eos_token_id=eos, pad_token_id=eot,
    )
    gen = GenerationConfig(bos_token_id=eot, eos_token_id=[eos, eot], pad_token_id=eot)

    model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0, **common))
    model.generation_config = gen
    model.eval()
    summary = {}
    for name, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16)]:
        ref = save(name, model, tokenizer, dtype, versions)
        summary[name] = [min(c["greedy_top2_margins"]) for c in ref["cases"]]
        model = model.float()

    torch.manual_seed(1)
    tied = LlamaForCausalLM(LlamaConfig(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500000.0, **common))
    tied.generation_config = gen
    tied.eval()
    ref = save("tied", tied, tokenizer, torch.float16, versions)
    summary["tied"] = [min(c["greedy_top2_margins"]) for c in ref["cases"]]

    torch.manual_seed(2)
    qwen_common = {k: v for k, v in common.items() if k not in ("bos_token_id", "pad_token_id")}
    qwen = Qwen2ForCausalLM(Qwen2Config(
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False,
        bos_token_id=eot, pad_token_id=eot, **qwen_common,
    ))
    with torch.no_grad():
        for layer in qwen.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    qwen.generation_config = gen
    qwen.eval()
    ref = save("qwen2", qwen, tokenizer, torch.bfloat16, versions)
    summary["qwen2"] = [min(c["greedy_top2_margins"]) for c in ref["cases"]]
    build_sentencepiece_tokenizer()
    print("vocab", vocab, "smallest greedy top-2 margin per case:", json.dumps(summary))


if __name__ == "__main__":
    main()
