#!/usr/bin/env python3
"""Writes the small seed inputs of the fuzz targets (fuzz/seeds/<target>/) from the real fixtures:
the SmolLM2 GGUF header (vocabulary cut to its first tokens), tests/fixtures, examples/. Seeds stay
small (a few KB each); the corpora that fuzzing grows are kept outside the repository.

    python3 fuzz/seeds/make_seeds.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""
import glob
import json
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEEDS = os.path.join(ROOT, "fuzz", "seeds")

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
FIXED = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}


def read_value(data, at, kind):
    if kind in FIXED:
        size = struct.calcsize(FIXED[kind])
        return struct.unpack_from(FIXED[kind], data, at)[0], at + size
    if kind == STRING:
        (length,) = struct.unpack_from("<Q", data, at)
        return data[at + 8 : at + 8 + length].decode("utf-8", "replace"), at + 8 + length
    (element, count) = struct.unpack_from("<IQ", data, at)
    at += 12
    values = []
    for _ in range(count):
        value, at = read_value(data, at, element)
        values.append(value)
    return (element, values), at


def read_metadata(path):
    with open(path, "rb") as file:
        data = file.read(8 << 20)
    magic, version, tensors, entries = struct.unpack_from("<4sIQQ", data, 0)
    assert magic == b"GGUF" and version >= 2, path
    at = 24
    metadata = []
    for _ in range(entries):
        key, at = read_value(data, at, STRING)
        (kind,) = struct.unpack_from("<I", data, at)
        value, at = read_value(data, at + 4, kind)
        metadata.append((key, kind, value))
    return metadata


def write_value(kind, value):
    if kind in FIXED:
        return struct.pack(FIXED[kind], value)
    if kind == STRING:
        raw = value.encode()
        return struct.pack("<Q", len(raw)) + raw
    element, values = value
    return struct.pack("<IQ", element, len(values)) + b"".join(write_value(element, v) for v in values)


def gguf(metadata, tensors):
    """metadata: [(key, kind, value)]; tensors: [(name, dims innermost first, ggml type, bytes)]."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, kind, value in metadata:
        out += write_value(STRING, key) + struct.pack("<I", kind) + write_value(kind, value)
    offset = 0
    for name, dims, kind, raw in tensors:
        out += write_value(STRING, name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", kind, offset)
        offset += (len(raw) + 31) // 32 * 32
    out += b"\0" * (-len(out) % 32)
    for _, _, _, raw in tensors:
        out += raw + b"\0" * (-len(raw) % 32)
    return bytes(out)


def cut_vocabulary(metadata, keep):
    """The tokenizer metadata with the first `keep` tokens and the merges among them."""
    out = []
    tokens = None
    for key, kind, value in metadata:
        if key == "tokenizer.ggml.tokens":
            tokens = value[1][:keep]
            value = (value[0], tokens)
        elif key == "tokenizer.ggml.token_type":
            value = (value[0], value[1][:keep])
        out.append((key, kind, value))
    vocabulary = set(tokens)
    result = []
    for key, kind, value in out:
        if key == "tokenizer.ggml.merges":
            merges = [m for m in value[1] if all(p in vocabulary for p in m.split(" ")) and m.replace(" ", "") in vocabulary]
            value = (value[0], merges[:400])
        elif key.startswith("tokenizer.ggml.") and key.endswith("_token_id") and value >= keep:
            value = 0
        result.append((key, kind, value))
    return result


def f32(values):
    return struct.pack(f"<{len(values)}f", *values)


def f16(values):
    return struct.pack(f"<{len(values)}e", *values)


def tiny_llama(tokenizer, kind):
    """A whole one-block Llama GGUF: 8 wide, 2 heads of 4, 1 K/V head, MLP 16, the cut vocabulary."""
    vocab = len(next(v for k, _, v in tokenizer if k == "tokenizer.ggml.tokens")[1])
    pack = f32 if kind == 0 else f16
    weights = lambda rows, cols: pack([((r * 7 + c * 3) % 11 - 5) / 10 for r in range(rows) for c in range(cols)])
    ones = lambda n: f32([1.0] * n)
    metadata = [
        ("general.architecture", STRING, "llama"),
        ("llama.attention.head_count", U32, 2),
        ("llama.attention.head_count_kv", U32, 1),
        ("llama.embedding_length", U32, 8),
        ("llama.block_count", U32, 1),
        ("llama.context_length", U32, 64),
        ("llama.rope.dimension_count", U32, 4),
        ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
    ] + tokenizer
    tensors = [
        ("token_embd.weight", [8, vocab], kind, weights(vocab, 8)),
        ("output_norm.weight", [8], 0, ones(8)),
        ("blk.0.attn_q.weight", [8, 8], kind, weights(8, 8)),
        ("blk.0.attn_k.weight", [8, 4], kind, weights(4, 8)),
        ("blk.0.attn_v.weight", [8, 4], kind, weights(4, 8)),
        ("blk.0.attn_output.weight", [8, 8], kind, weights(8, 8)),
        ("blk.0.attn_norm.weight", [8], 0, ones(8)),
        ("blk.0.ffn_gate.weight", [8, 16], kind, weights(16, 8)),
        ("blk.0.ffn_up.weight", [8, 16], kind, weights(16, 8)),
        ("blk.0.ffn_down.weight", [16, 8], kind, weights(8, 16)),
        ("blk.0.ffn_norm.weight", [8], 0, ones(8)),
    ]
    return gguf(metadata, tensors)


def safetensors(tensors, metadata=None):
    header = {}
    data = b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def write(target, name, data):
    folder = os.path.join(SEEDS, target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as file:
        file.write(data if isinstance(data, bytes) else data.encode())


def main():
    default = glob.glob(os.path.expanduser(
        "~/.cache/huggingface/hub/models--QuantFactory--SmolLM2-135M-Instruct-GGUF/snapshots/*/*.gguf"))
    path = sys.argv[1] if len(sys.argv) > 1 else default[0]
    metadata = read_metadata(path)
    tokenizer = [(k, t, v) for k, t, v in metadata if k.startswith("tokenizer.")]
    # GGUF: a whole tiny model (F32 and F16 weights) and the SmolLM2 tokenizer metadata.
    small = cut_vocabulary(tokenizer, 64)
    write("gguf_load", "tiny-llama-f32.gguf", tiny_llama(small, 0))
    write("gguf_load", "tiny-llama-f16.gguf", tiny_llama(small, 1))
    header = [(k, t, v) for k, t, v in metadata if not k.startswith("tokenizer.")]
    write("gguf_load", "smollm2-header-no-tensors.gguf", gguf(header + small, []))
    write("gguf_tokenizer", "smollm2-vocabulary-600.gguf", gguf(cut_vocabulary(tokenizer, 600), []) + "Hello <|im_start|>user\nHi 🤗!".encode())
    write("gguf_tokenizer", "smollm2-vocabulary-64.gguf", gguf(small, []) + b"abc")

    # safetensors: the dtypes the readers take, and metadata.
    write("safetensors_header", "three-dtypes.safetensors", safetensors([
        ("a", "F32", [2, 2], f32([1, 2, 3, 4])),
        ("b", "F16", [3], f16([1, 2, 3])),
        ("c", "BF16", [1, 2], b"\x80\x3f\x00\x40"),
    ], {"step": "7"}))
    write("safetensors_header", "empty.safetensors", safetensors([]))

    # tokenizer.json: the tiny fixtures' (byte-level BPE and SentencePiece-style).
    for variant in ["f32", "sentencepiece"]:
        source = os.path.join(ROOT, "tests/fixtures/llm/tiny-llama", variant, "tokenizer.json")
        write("tokenizer_json", f"tiny-llama-{variant}.json", open(source, "rb").read())
    # Two files the tokenizers crate (0.22) reads and then panics on, found by 10-minute runs
    # (docs/reliability.md): nstream must answer each with an error.
    bare = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": None, "post_processor": None, "decoder": None}
    write("tokenizer_json", "strip-decoder-stop.json", json.dumps({
        **bare, "decoder": {"type": "Sequence", "decoders": [{"type": "Strip", "content": " ", "start": 0, "stop": 2}]},
        "model": {"type": "WordLevel", "vocab": {" ": 0, "a": 1, "<s>": 2, "</s>": 3}, "unk_token": "a"}}).encode())
    write("tokenizer_json", "template-undeclared-special-token.json", json.dumps({
        **bare, "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<t>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "model": {"type": "WordLevel", "vocab": {"a": 0, "<s>": 1, "</s>": 2}, "unk_token": "a"}}).encode())

    # Chat templates: source, NUL, conversation.
    conversation = json.dumps([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\":2}"}}]},
        {"role": "tool", "content": "4", "tool_call_id": "c1"},
    ])
    templates = {"smollm2": next(v for k, _, v in metadata if k == "tokenizer.chat_template")}
    for source in glob.glob(os.path.join(ROOT, "tests/fixtures/llm/tiny-llama/*/chat_template.jinja")):
        templates["tiny-llama-" + os.path.basename(os.path.dirname(source))] = open(source).read()
    for name, template in templates.items():
        write("chat_template", f"{name}.jinja", template + "\0" + conversation)

    # Server-sent events: OpenAI and Anthropic streams, CR/LF variants, comments.
    write("sse_events", "openai.txt", 'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\ndata: [DONE]\n\n')
    write("sse_events", "anthropic.txt",
          'event: message_start\ndata: {"type":"message_start"}\n\n: ping\r\n'
          'event: content_block_delta\r\ndata: {"type":"content_block_delta",\r\ndata: "delta":{"text":"x"}}\r\r\n')
    write("sse_events", "fields.txt", "id: 1\nretry: 10\nevent:\ndata\ndata:  two\n\n:comment\nevent: x\n")

    # Journal: every entry kind, then a torn last line.
    lines = [
        {"t": "run", "at": "2026-01-01T00:00:00Z", "settings": {"model": "m"}},
        {"t": "attempt", "key": "k1", "n": 1, "at": "2026-01-01T00:00:00.001Z"},
        {"t": "done", "key": "k1", "record": {"row": {"messages": []}, "provenance": {"cost_usd": 0.5}}},
        {"t": "attempt", "key": "k2", "n": 1, "at": "2026-01-01T00:00:01.000Z"},
        {"t": "attempt_failed", "key": "k2", "n": 1, "error": {"kind": "http", "message": "503", "status": 503}},
        {"t": "failed", "key": "k2", "record": {"error": {"kind": "http"}, "provenance": {}}},
    ]
    journal = "".join(json.dumps(line) + "\n" for line in lines)
    write("journal_read", "every-entry.jsonl", journal)
    write("journal_read", "torn-last-line.jsonl", journal + '{"t":"done","key":"k3","rec')

    # YAML resources: the examples, valid and invalid.
    for source in sorted(glob.glob(os.path.join(ROOT, "examples/*.yaml")))[:10] + sorted(glob.glob(os.path.join(ROOT, "examples/invalid/*.yaml")))[::7]:
        write("yaml_load", os.path.basename(source), open(source, "rb").read())


if __name__ == "__main__":
    main()
