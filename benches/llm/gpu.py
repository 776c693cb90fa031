#!/usr/bin/env python3
"""nstream-server vs Hugging Face transformers' `generate` on one CUDA GPU, same card, same run.

The model is a Llama-3-8B-shaped bf16 checkpoint (32 layers, hidden 4096, 32 query / 8 KV heads,
MLP 14336, vocabulary 128256) with transformers' random initialisation, made on the spot: no
download is possible on the lent GPU machines, and decode speed depends on the shapes, not on the
values. It is saved with `save_pretrained` into a Hugging Face cache, so nstream-server resolves it
through the same hub code as a downloaded model. The tokenizer is a word-level one with exactly
the model's vocabulary ("t0" ... "t128255"), so a prompt of N words is N tokens on both sides
and every generated id decodes to a visible piece.

Measured (greedy, `ignore_eos` / `min_new_tokens`, every prompt unique, --prompt-tokens long):

  * HBM bandwidth: a device-to-device copy of 4 GiB (bytes read + written per second);
  * the single-stream decode bound: that bandwidth over the bytes of weights read per token
    (every parameter except the embedding table, of which one row is read);
  * transformers: `model.generate` on batches of 1/8/32/64 prompts: aggregate tokens/s =
    batch x max_new_tokens / wall, and per-stream decode tokens/s = (max_new_tokens - 1) /
    (time for max_new_tokens - time for 1 token);
  * nstream-server (`--device cuda`, continuous batching): 1 stream (3 requests in a row, median)
    then 8/32/64 concurrent streaming /v1/completions requests; TTFT, per-stream decode tokens/s
    and aggregate tokens/s = all completion tokens / wall.

Run on the GPU machine (PyTorch and transformers there) with a CUDA build of nstream-server:

    python3 benches/llm/gpu.py --server-bin ./nstream-server --out $OUT

A smoke test of the whole flow on a CPU (tiny shape, CPU server build):

    python3 benches/llm/gpu.py --shape tiny --device cpu --server-bin target/release/nstream-server
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import http.client
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import transformers

SHAPES = {
    # meta-llama/Meta-Llama-3-8B's config.json
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048, max_position_embeddings=1024, rope_theta=10000.0,
                 rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
}
REPO = "nstream-bench/llama-3-8b-shape"
REVISION = "0" * 40
MODEL_NAME = "llama-3-8b-shape"
AGREEMENT_PROMPTS = 8
AGREEMENT_TOKENS = 16


def log(message: str) -> None:
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(command: list[str], cache: Path, logfile: Path, timeout: float = 900):
    """Starts nstream-server (`command` without `--port`) on a free port with the given hub cache,
    waits for /ready and yields (port, seconds to ready); stops it on exit."""
    port = free_port()
    environment = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", RUST_LOG="warn")
    log("starting " + " ".join(command))
    with open(logfile, "w") as output:
        process = subprocess.Popen([*command, "--port", str(port)], env=environment, stdout=output,
                                   stderr=subprocess.STDOUT)
        started = time.perf_counter()
        try:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"nstream-server exited with {process.returncode}: "
                                       + logfile.read_text()[-2000:])
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    conn.request("GET", "/ready")
                    if conn.getresponse().status == 200:
                        break
                except OSError:
                    pass
                if time.perf_counter() - started > timeout:
                    raise RuntimeError(f"nstream-server not ready after {timeout} s")
                time.sleep(0.5)
            yield port, round(time.perf_counter() - started, 1)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()



def word_level_tokenizer(vocab_size: int) -> dict:
    """A tokenizer.json whose tokens are "t0".."t<vocab-1>", split on whitespace, joined by spaces."""
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": False},
        "model": {"type": "WordLevel", "vocab": {f"t{i}": i for i in range(vocab_size)}, "unk_token": "t0"},
    }


def make_checkpoint(shape: str, cache: Path, device: str) -> tuple[transformers.PreTrainedModel, dict]:
    config = transformers.LlamaConfig(**SHAPES[shape])
    repo = cache / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.eval()
    made = time.perf_counter() - started
    model.save_pretrained(snapshot, max_shard_size="5GB")
    (snapshot / "tokenizer.json").write_text(json.dumps(word_level_tokenizer(config.vocab_size)))
    (snapshot / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": f"t{config.eos_token_id}", "add_bos_token": False}))
    saved = time.perf_counter() - started - made
    parameters = sum(p.numel() for p in model.parameters())
    embedding = model.model.embed_tokens.weight.numel()
    info = {
        "shape": shape, "config": SHAPES[shape], "parameters": parameters,
        "weight_bytes": parameters * 2, "bytes_read_per_token": (parameters - embedding) * 2,
        "made_s": round(made, 1), "saved_s": round(saved, 1),
        "files": sorted(p.name for p in snapshot.iterdir()),
    }
    log(f"checkpoint: {parameters / 1e9:.2f} B parameters, made in {made:.1f} s, saved in {saved:.1f} s")
    return model, info


def hbm_bandwidth(device: str) -> float:
    if device != "cuda":
        return float("nan")
    size = 4 << 30
    source = torch.empty(size, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    started = time.perf_counter()
    repeats = 20
    for _ in range(repeats):
        target.copy_(source)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    del source, target
    torch.cuda.empty_cache()
    return 2 * size * repeats / seconds


def prompts(count: int, length: int, vocab: int, salt: int) -> list[list[int]]:
    """Unique prompts: the first tokens encode (salt, index), the rest a fixed pseudo-random text."""
    out = []
    for index in range(count):
        head = [3 + salt % 1000, 3 + index % 1000, 3 + (index // 1000) % 1000]
        body = [3 + (7919 * (position + 1) * (index + 11)) % (vocab - 3) for position in range(length - len(head))]
        out.append(head + body)
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def transformers_rows(model, streams: list[int], prompt_tokens: int, max_tokens: int, device: str) -> list[dict]:
    vocab = model.config.vocab_size
    rows = []

    def generate(batch: list[list[int]], new_tokens: int) -> float:
        ids = torch.tensor(batch, device=device)
        sync(device)
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        sync(device)
        assert out.shape[1] == prompt_tokens + new_tokens, out.shape
        return time.perf_counter() - started

    generate(prompts(1, prompt_tokens, vocab, 1), 8)  # warm-up (kernels, allocator)
    agreement_prompts = prompts(AGREEMENT_PROMPTS, prompt_tokens, vocab, 999)
    with torch.no_grad():
        ids = torch.tensor(agreement_prompts, device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=AGREEMENT_TOKENS,
                             min_new_tokens=AGREEMENT_TOKENS, do_sample=False, pad_token_id=0)
    rows.append({"server": "transformers", "greedy": out[:, prompt_tokens:].tolist()})
    for salt, batch in enumerate(streams, start=10):
        generate(prompts(batch, prompt_tokens, vocab, salt), 4)
        first = generate(prompts(batch, prompt_tokens, vocab, salt + 100), 1)
        whole = generate(prompts(batch, prompt_tokens, vocab, salt + 200), max_tokens)
        row = {
            "server": "transformers", "streams": batch, "wall_s": round(whole, 3), "first_token_s": round(first, 4),
            "aggregate_tps": round(batch * max_tokens / whole, 1),
            "decode_tps_per_stream": round((max_tokens - 1) / (whole - first), 1),
        }
        log(f"transformers: {row}")
        rows.append(row)
    return rows


def stream_completion(port: int, prompt: list[int], max_tokens: int) -> dict:
    body = json.dumps({
        "model": MODEL_NAME, "prompt": " ".join(f"t{token}" for token in prompt), "max_tokens": max_tokens,
        "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    started = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
    first = last = None
    usage = None
    pieces = []
    while True:
        line = response.readline()
        if not line or line.strip() == b"data: [DONE]":
            break
        if not line.startswith(b"data: "):
            continue
        event = json.loads(line[6:])
        usage = event.get("usage") or usage
        texts = [choice.get("text") or "" for choice in event.get("choices") or []]
        if any(texts):
            last = time.perf_counter()
            first = first or last
            pieces.extend(texts)
    conn.close()
    if usage is None or first is None:
        raise RuntimeError("a stream without tokens or usage")
    if usage["prompt_tokens"] != len(prompt):
        raise RuntimeError(f"prompt_tokens {usage['prompt_tokens']} != {len(prompt)}")
    return {"ttft": first - started, "decode_s": last - first, "tokens": usage["completion_tokens"],
            "end": time.perf_counter(), "ids": [int(word[1:]) for word in "".join(pieces).split()]}


def concurrent(port: int, batch: list[list[int]], max_tokens: int) -> tuple[list[dict], float]:
    results, errors = [], []
    barrier = threading.Barrier(len(batch) + 1)

    def worker(prompt: list[int]) -> None:
        barrier.wait()
        try:
            results.append(stream_completion(port, prompt, max_tokens))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(repr(error))

    threads = [threading.Thread(target=worker, args=(prompt,), daemon=True) for prompt in batch]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError("; ".join(errors[:3]))
    return results, wall


def nstream_rows(server_bin: str, cache: Path, work: Path, device: str, streams: list[int], prompt_tokens: int,
                 max_tokens: int, vocab: int) -> tuple[list[dict], dict]:
    model_file = work / "model.yaml"
    model_file.write_text(f"""apiVersion: llm.nstream.ai/v1
kind: BaseModel
metadata:
  name: {MODEL_NAME}
spec:
  baseModelName: {MODEL_NAME}
  baseModelServingInfo:
    hfModelId: {REPO}
    modelProvider: HUGGINGFACE
  baseModelServingTemplate:
    replicas: 1
    resourceLimit:
      gpu: 1
""")
    command = [server_bin, "--model-file", str(model_file), "--device", device,
               "--max-running-sequences", str(max(streams)), "--context-length",
               str(prompt_tokens + max_tokens + 16)]
    meta = {"command": command}
    with running_server(command, cache, work / "nstream-server.log") as (port, ready_s):
        meta["ready_s"] = ready_s
        log(f"nstream-server ready in {meta['ready_s']} s")
        stream_completion(port, prompts(1, prompt_tokens, vocab, 1)[0], 8)  # warm-up (PTX JIT)
        concurrent(port, prompts(max(streams), prompt_tokens, vocab, 2), 4)
        rows = [{"server": "nstream", "greedy": [
            stream_completion(port, prompt, AGREEMENT_TOKENS)["ids"]
            for prompt in prompts(AGREEMENT_PROMPTS, prompt_tokens, vocab, 999)]}]
        for salt, batch in enumerate(streams, start=20):
            if batch == 1:
                singles = [stream_completion(port, prompt, max_tokens)
                           for prompt in prompts(3, prompt_tokens, vocab, salt)]
                rows.append({
                    "server": "nstream", "streams": 1,
                    "ttft_s": round(statistics.median(r["ttft"] for r in singles), 4),
                    "decode_tps_per_stream": round(
                        statistics.median((r["tokens"] - 1) / r["decode_s"] for r in singles), 1),
                    "aggregate_tps": round(
                        statistics.median(r["tokens"] / (r["ttft"] + r["decode_s"]) for r in singles), 1),
                })
                log(f"nstream: {rows[-1]}")
                continue
            results, wall = concurrent(port, prompts(batch, prompt_tokens, vocab, salt), max_tokens)
            rows.append({
                "server": "nstream", "streams": batch, "wall_s": round(wall, 3),
                "ttft_s": round(statistics.median(r["ttft"] for r in results), 4),
                "decode_tps_per_stream": round(statistics.median((r["tokens"] - 1) / r["decode_s"] for r in results), 1),
                "aggregate_tps": round(sum(r["tokens"] for r in results) / wall, 1),
            })
            log(f"nstream: {rows[-1]}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/metrics")
        (work / "metrics.txt").write_bytes(conn.getresponse().read())
        return rows, meta


def fixture_agreement(server_bin: str, fixtures: Path, work: Path, device: str) -> dict:
    """Greedy continuations of the committed tiny checkpoints (tests/fixtures/llm/tiny-llama: f32, bf16,
    tied f16, Qwen2 bf16) served on `device`, against transformers' float32 greedy ids stored with
    them (reference.json): identical continuations per variant, and the stored top-2 margin at the
    first difference (a near-tie explains a flip; a wide margin would be a bug)."""
    import tokenizers  # noqa: PLC0415 - only this check needs it

    cache = work / "fixtures-hub"
    documents = []
    for variant_dir in sorted(path for path in fixtures.iterdir() if (path / "reference.json").exists()):
        variant = variant_dir.name
        repo = cache / f"models--nstream-test--tiny-llama-{variant}"
        snapshot = repo / "snapshots" / REVISION
        shutil.copytree(variant_dir, snapshot)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(REVISION)
        documents.append(f"""apiVersion: llm.nstream.ai/v1
kind: BaseModel
metadata:
  name: tiny-{variant}
spec:
  baseModelName: tiny-{variant}
  baseModelServingInfo:
    hfModelId: nstream-test/tiny-llama-{variant}
    modelProvider: HUGGINGFACE
  baseModelServingTemplate:
    replicas: 1
""")
    model_file = work / "fixtures.yaml"
    model_file.write_text("---\n".join(documents))
    results = {}
    command = [server_bin, "--model-file", str(model_file), "--device", device]
    with running_server(command, cache, work / "fixtures-server.log", timeout=300) as (port, _):
        for variant_dir in sorted(path for path in fixtures.iterdir() if (path / "reference.json").exists()):
            reference = json.loads((variant_dir / "reference.json").read_text())
            tokenizer = tokenizers.Tokenizer.from_file(str(variant_dir / "tokenizer.json"))
            identical, first_differences = 0, []
            for case in reference["cases"]:
                body = json.dumps({"model": f"tiny-{variant_dir.name}", "prompt": case["ids"],
                                   "max_tokens": len(case["greedy"]), "temperature": 0.0, "ignore_eos": True})
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
                response = json.loads(conn.getresponse().read())
                ours = response["choices"][0]["text"]
                prompt_text = tokenizer.decode(case["ids"], skip_special_tokens=False)
                expected = tokenizer.decode(case["ids"] + case["greedy"], skip_special_tokens=False)[len(prompt_text):]
                if ours == expected:
                    identical += 1
                else:
                    # the first generated token whose decoded prefix no longer matches
                    step = next((i for i in range(1, len(case["greedy"]) + 1)
                                 if not ours.startswith(tokenizer.decode(case["ids"] + case["greedy"][:i],
                                                                         skip_special_tokens=False)[len(prompt_text):])),
                                len(case["greedy"]))
                    margins = case.get("greedy_top2_margins") or []
                    first_differences.append({"step": step - 1, "reference_margin": margins[step - 1]
                                              if step - 1 < len(margins) else None})
            results[variant_dir.name] = {"identical": identical, "cases": len(reference["cases"]),
                                         "differences": first_differences}
            log(f"fixture {variant_dir.name}: {results[variant_dir.name]}")
    return results


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# nstream-server vs transformers generate, {meta['date']}", "",
             f"Machine: {meta['gpu']}, driver {meta['driver']}; torch {meta['torch']}, transformers "
             f"{meta['transformers']}. Model: {meta['checkpoint']['shape']} bf16, "
             f"{meta['checkpoint']['parameters'] / 1e9:.2f} B parameters, random weights. Prompt "
             f"{meta['prompt_tokens']} tokens, {meta['max_tokens']} generated, greedy.", ""]
    bandwidth = meta["hbm_bytes_per_s"]
    bound = bandwidth / meta["checkpoint"]["bytes_read_per_token"]
    lines += [f"HBM copy bandwidth {bandwidth / 1e12:.2f} TB/s; bytes read per token "
              f"{meta['checkpoint']['bytes_read_per_token'] / 1e9:.2f} GB; single-stream bound {bound:.1f} tokens/s.",
              ""]
    lines += ["| streams | nstream aggregate tok/s | transformers aggregate tok/s | ratio | nstream decode tok/s/stream "
              "| transformers decode tok/s/stream | nstream TTFT s |", "|---|---|---|---|---|---|---|"]
    by = {(row["server"], row["streams"]): row for row in rows if "streams" in row}
    for streams in meta["streams"]:
        ours, theirs = by.get(("nstream", streams), {}), by.get(("transformers", streams), {})
        ratio = ours.get("aggregate_tps", 0) / theirs["aggregate_tps"] if theirs.get("aggregate_tps") else float("nan")
        lines.append(f"| {streams} | {ours.get('aggregate_tps')} | {theirs.get('aggregate_tps')} | {ratio:.2f}x | "
                     f"{ours.get('decode_tps_per_stream')} | {theirs.get('decode_tps_per_stream')} | "
                     f"{ours.get('ttft_s')} |")
    greedy = {row["server"]: row["greedy"] for row in rows if "greedy" in row}
    if len(greedy) == 2:
        pairs = list(zip(greedy["nstream"], greedy["transformers"]))
        same_first = sum(ours[:1] == theirs[:1] for ours, theirs in pairs)
        same_all = sum(ours == theirs for ours, theirs in pairs)
        common = [next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours)) for ours, theirs in pairs]
        lines += ["", f"Greedy agreement with transformers (bf16, random weights, {len(pairs)} prompts, "
                      f"{AGREEMENT_TOKENS} tokens): first token identical {same_first}/{len(pairs)}, all "
                      f"identical {same_all}/{len(pairs)}, identical prefix lengths {common}."]
    if meta.get("fixtures"):
        lines += ["", "Committed tiny checkpoints served on this device, greedy continuations identical to "
                      "transformers' float32 ones: " + ", ".join(
                          f"{variant} {result['identical']}/{result['cases']}"
                          for variant, result in meta["fixtures"].items()) + "."]
    single = by.get(("nstream", 1), {}).get("decode_tps_per_stream")
    if single:
        lines += ["", f"Single-stream decode: {single} tokens/s = {single / bound:.0%} of the HBM bound."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-bin", required=True, help="nstream-server built with --features cuda")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--streams", default="1,8,32,64")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--work", default="/tmp/nstream-gpu-bench")
    parser.add_argument("--out", default=".", help="folder for gpu-<date>.json and .md")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--fixtures", default=str(Path(__file__).resolve().parents[2] / "tests/fixtures/llm/tiny-llama"),
                        help="tiny checkpoints with transformers' greedy ids, checked first (empty to skip)")
    args = parser.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    cache = work / "hub"
    cache.mkdir(parents=True)
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "host": platform.node(),
        "torch": torch.__version__, "transformers": transformers.__version__, "streams": streams,
        "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "driver": subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True).stdout.strip() if args.device == "cuda" else "-",
    }
    if args.fixtures:
        meta["fixtures"] = fixture_agreement(args.server_bin, Path(args.fixtures), work, args.device)
    meta["hbm_bytes_per_s"] = hbm_bandwidth(args.device)
    log(f"HBM copy bandwidth {meta['hbm_bytes_per_s'] / 1e12:.2f} TB/s")
    model, meta["checkpoint"] = make_checkpoint(args.shape, cache, args.device)
    rows = []
    if not args.skip_transformers:
        rows += transformers_rows(model, streams, args.prompt_tokens, args.max_tokens, args.device)
    vocab = model.config.vocab_size
    del model
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    ours, meta["nstream"] = nstream_rows(args.server_bin, cache, work, args.device, streams, args.prompt_tokens,
                                         args.max_tokens, vocab)
    rows += ours
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d-%H%M")
    (out / f"gpu-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    text = markdown(meta, rows)
    (out / f"gpu-{stamp}.md").write_text(text)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import chart  # benches/chart.py: the results' SVG chart, next to them
    chart.after_run(out / f"gpu-{stamp}.json", bench="llm")
    shutil.copy(work / "nstream-server.log", out / "nstream-server.log")
    print(text)


if __name__ == "__main__":
    main()
