#!/usr/bin/env python3
"""nstream-server vs llama.cpp's llama-server: SmolLM2-135M-Instruct (Q4_1 GGUF) on the CPU, one run.

Servers, each started alone (never two loaded during a measurement), alternating, round by round:

  * ours: the release `nstream-server` as shipped (default flags: `--requantize auto`, which on a
    CPU with AVX-512 VNNI keeps the Q4_1 weights as stored, like the peer, for nstream-kernels);
  * ours-q8_0: the same with `--requantize q8-0` (the Q4_1 weights become Q8_0 at load);
  * ours-keep: the same with `--requantize keep` (every weight as stored, whatever the CPU);
  * ours@LEVEL (e.g. ours@avx2, ours-q8_0@portable): the same with NSTREAM_CPU_LEVEL=LEVEL, which
    restricts nstream-kernels to that level (portable: candle's kernels, as on a CPU without AVX2);
  * llama-server: `--parallel N` (N = the streams of the scenario, so it has a slot per stream),
    `-c` = N x --slot-context, `--threads` = ours, `--cont-batching`; restarted per scenario.

Scenarios, one client for every server (standard-library http.client, one connection per request
(llama-server closes it after a streamed response), streaming SSE on /v1/completions with stream_options.include_usage):

  * 1 stream: --single-requests requests one after another; time to first token (TTFT) and
    decode tokens/s = (completion tokens - 1) / (last token - first token);
  * 4 and 16 streams: every stream sends --requests-per-stream requests back to back (2 at 4
    streams, 1 at 16: 1,024 and 2,048 tokens at the default max_tokens); aggregate
    generated tokens/s = all completion tokens / wall time of the scenario, plus TTFT under load.

  * long prompt: --long-requests requests one after another, each a prompt of about
    --long-prompt-tokens tokens (the passage repeated under numbered headings) and
    --long-max-tokens tokens out: time to first token of a long prompt (llama-server gets a context
    that holds it). --long-prompt-tokens 0 skips it.

Every request: greedy (temperature 0, seed fixed), ignore_eos, max_tokens = --max-tokens, a chat
prompt rendered with SmolLM2's template (so both servers see the same token ids: prompt_tokens is
checked equal across servers) whose system message starts with a unique request tag, so
llama-server's prefix cache cannot skip prompt processing. Before each measurement: one warm-up
request and one warm-up wave of N short requests.

Quiet machine: before the first server start the run waits (up to --quiet-wait s) for the 1-minute
load average to fall below --max-load, before each later one until under 0.3 cores are busy. Per row it records the load average, the server's CPU, the
client's CPU and foreign CPU (other processes), so a noisy neighbour is visible in the results.

Usually run through benches/llm/run.sh, which builds both servers and prepares the model.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import itertools
import json
import os
import platform
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MODEL_NAME = "smollm2-135m-instruct"
GGUF_REPO = "models--QuantFactory--SmolLM2-135M-Instruct-GGUF"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SEED = 1234
HZ = os.sysconf("SC_CLK_TCK")

QUESTIONS = [
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main differences between a list and a tuple in Python?",
    "Give me a recipe for a simple vegetable soup.",
    "Describe the water cycle for a ten-year-old.",
    "Why is the sky blue? Answer in a few paragraphs.",
    "Write a polite email asking a colleague to review my pull request.",
    "Summarise the causes of the First World War.",
    "What should I pack for a week of hiking in the Alps?",
    "Compare electric cars and petrol cars.",
    "How do vaccines train the immune system?",
    "Plan a three-day trip to Rome.",
]

# Longer prompts (about 200-300 tokens): a passage to work on, so time to first token covers real
# prompt processing too. Every third request gets one.
PASSAGE = (
    "The town of Eastmere sits where two rivers meet, and for most of its history it lived from the "
    "water. Mills lined both banks in the eighteenth century, grinding grain that barges carried down "
    "to the coast. When the railway arrived in 1861 the barges disappeared within a decade, and the "
    "mills turned to weaving, then to paper. The last of them closed in 1974. For twenty years the "
    "riverside was a row of empty buildings with broken windows, until a group of residents persuaded "
    "the council to buy the largest mill for a single pound. They repaired the roof with volunteer "
    "labour and opened a market on the ground floor, a library on the first and small workshops above. "
    "Today the old mill is the busiest building in town: the market runs six days a week, the library "
    "lends tools as well as books, and the workshops house a bicycle repairer, two furniture makers and "
    "a company that builds sensors for measuring river levels. Floods remain the town's great worry. In "
    "2007 the water rose two metres in a night, and the new sensors now give a warning six hours ahead."
)
TASKS = [
    "Summarise the following text in three sentences.",
    "List the main events in the following text in chronological order.",
    "Write five quiz questions, with answers, about the following text.",
    "What lessons could another town learn from the following text?",
]

PROCS: list[subprocess.Popen] = []
TAGS = itertools.count(100000)  # unique request tags, all 6 digits (one token per digit)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# machine state


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def system_jiffies() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields[:8]) - idle, sum(fields[:8])


def process_jiffies(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0
    return int(fields[11]) + int(fields[12])


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def memory_mib(pid: int) -> dict:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    except FileNotFoundError:
        pass
    return out


def busy_cores(seconds: float = 1.0) -> float:
    b0, t0 = system_jiffies()
    time.sleep(seconds)
    b1, t1 = system_jiffies()
    return (b1 - b0) / HZ / seconds


def wait_quiet(max_load: float, timeout: float, first: bool) -> float:
    """Before the first server: the 1-minute load average below max_load. Later (the load average
    lags a minute behind and mostly measures our own previous server): under 0.3 busy cores over
    one second. Either way at most `timeout` seconds; returns the load average."""
    deadline = time.monotonic() + timeout
    while True:
        load = loadavg()
        quiet = load < max_load if first else busy_cores() < 0.3
        if quiet or time.monotonic() > deadline:
            if not quiet:
                log(f"machine not quiet after {timeout:.0f}s (load {load:.2f}); measuring anyway (recorded)")
            return load
        time.sleep(2 if first else 0)


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "nproc": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
                               "L2 cache", "L3 cache"):
                info[key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        info["MemTotal"] = Path("/proc/meminfo").read_text().splitlines()[0].split(":")[1].strip()
    except OSError:
        pass
    return info


# ----------------------------------------------------------------------------------------------
# servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 2.0) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


class Server:
    def __init__(self, name: str, argv: list[str], port: int, ready_path: str, log_path: Path,
                 env: dict[str, str] | None = None):
        self.name, self.argv, self.port, self.ready_path, self.log_path = name, argv, port, ready_path, log_path
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.start_s = 0.0

    def start(self, timeout: float = 180.0) -> None:
        t0 = time.monotonic()
        self.log_file = open(self.log_path, "ab")
        self.log_file.write(f"\n=== {time.strftime('%H:%M:%S')} {self.command()}\n".encode())
        self.log_file.flush()
        self.proc = subprocess.Popen(self.argv, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **self.env})
        PROCS.append(self.proc)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if http_get(self.port, self.ready_path) == 200:
                    self.start_s = time.monotonic() - t0
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout}s; see {self.log_path}")

    def command(self) -> str:
        """The command line, with the environment variables set for it."""
        return " ".join([*(f"{key}={shlex.quote(value)}" for key, value in self.env.items()), shlex.join(self.argv)])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc in PROCS:
            PROCS.remove(self.proc)
        self.proc = None
        self.log_file.close()


def stop_all(*_args) -> None:
    for proc in list(PROCS):
        if proc.poll() is None:
            proc.kill()
    if _args:
        sys.exit(130)


# ----------------------------------------------------------------------------------------------
# client


def render(question: str, tag: str) -> str:
    """SmolLM2's chat template with a unique tag opening the system message."""
    return (f"<|im_start|>system\n[{tag}] {SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


def stream_completion(conn: http.client.HTTPConnection, prompt: str, max_tokens: int) -> dict:
    body = json.dumps({
        "model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "seed": SEED,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }).encode()
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
    first = last = None
    chunks = 0
    usage = None
    finish = None
    text = []
    while True:
        line = response.readline()
        if not line:
            break
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        event = json.loads(data)
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices") or []:
            piece = choice.get("text") or ""
            if piece:
                now = time.perf_counter()
                first = first if first is not None else now
                last = now
                chunks += 1
                text.append(piece)
            finish = choice.get("finish_reason") or finish
    response.read()
    end = time.perf_counter()
    if usage is None:
        raise RuntimeError("no usage in the stream (stream_options.include_usage)")
    if first is None:
        raise RuntimeError("no token in the stream")
    tokens = usage["completion_tokens"]
    return {
        "start": t0, "end": end, "ttft": first - t0, "decode_s": last - first, "tokens": tokens,
        "prompt_tokens": usage["prompt_tokens"], "chunks": chunks, "finish": finish, "text": "".join(text),
    }


def run_streams(port: int, streams: int, per_stream: int, max_tokens: int) -> tuple[list[dict], float]:
    """`streams` threads, each sending `per_stream` requests back to back on its own connection."""
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(streams + 1)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            for j in range(per_stream):
                k = i * per_stream + j
                if k % 3 == 2:
                    question = f"{TASKS[(k // 3) % len(TASKS)]}\n\n{PASSAGE}"
                else:
                    question = QUESTIONS[k % len(QUESTIONS)]
                # A connection per request: llama-server closes the connection after a streamed
                # response, so both servers get the same (a local connect is ~0.1 ms).
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                try:
                    r = stream_completion(conn, render(question, f"{next(TAGS):06d}"), max_tokens)
                finally:
                    conn.close()
                r["question"] = question
                with lock:
                    results.append(r)
        except Exception as error:  # noqa: BLE001 - reported below
            with lock:
                errors.append(f"stream {i}: {error!r}")

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(streams)]
    for thread in threads:
        thread.start()
    barrier.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError("; ".join(errors[:3]))
    return results, wall


def long_question(k: int, target_tokens: int) -> str:
    """About `target_tokens` tokens of text: the passage repeated under numbered headings (about 1.3
    tokens per word with SmolLM2's tokenizer; the results record the exact count)."""
    copies = max(1, round(target_tokens / (1.3 * len(PASSAGE.split()))))
    parts = [f"Document {i + 1}:\n{PASSAGE}" for i in range(copies)]
    return f"{TASKS[k % len(TASKS)]} Use all {copies} documents.\n\n" + "\n\n".join(parts)


def measure_long(server: Server, args) -> dict:
    """Time to first token of long prompts, one request at a time."""
    port = server.port
    run_streams(port, 1, 1, 16)
    results = []
    for k in range(args.long_requests):
        question = long_question(k, args.long_prompt_tokens)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        try:
            r = stream_completion(conn, render(question, f"{next(TAGS):06d}"), args.long_max_tokens)
        finally:
            conn.close()
        if r["tokens"] != args.long_max_tokens:
            raise RuntimeError(f"{server.name}: a long-prompt request generated {r['tokens']} tokens")
        results.append(r)
    return {
        "server": server.name, "requests": len(results),
        "ttft_median_ms": 1000 * median([r["ttft"] for r in results]),
        "ttft_ms": [round(1000 * r["ttft"]) for r in results],
        "prompt_tokens": sorted({r["prompt_tokens"] for r in results}),
        "memory_mib": memory_mib(server.proc.pid), "load1": loadavg(),
    }


def requests_per_stream(spec: str, streams: int) -> int:
    if ":" not in spec:
        return int(spec)
    table = dict(item.split(":") for item in spec.split(","))
    return int(table.get(str(streams), 1))


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.9 * len(xs)))] if xs else float("nan")


def measure(server: Server, streams: int, args) -> dict:
    port = server.port
    # Warm-up: one request, then one wave of `streams` short requests.
    run_streams(port, 1, 1, 16)
    run_streams(port, streams, 1, 8)
    pid = server.proc.pid
    per_stream = args.single_requests if streams == 1 else requests_per_stream(args.requests_per_stream, streams)
    load = loadavg()
    busy0, total0 = system_jiffies()
    server0, client0 = process_jiffies(pid), self_cpu_seconds()
    results, wall = run_streams(port, streams, per_stream, args.max_tokens)
    busy1, total1 = system_jiffies()
    server_cpu = (process_jiffies(pid) - server0) / HZ
    client_cpu = self_cpu_seconds() - client0
    busy = (busy1 - busy0) / HZ
    tokens = sum(r["tokens"] for r in results)
    bad = [r for r in results if r["tokens"] != args.max_tokens or r["finish"] != "length"]
    if bad:
        raise RuntimeError(f"{server.name}: {len(bad)} requests did not generate max_tokens "
                           f"(e.g. {bad[0]['tokens']} tokens, finish {bad[0]['finish']})")
    decode = [(r["tokens"] - 1) / r["decode_s"] for r in results if r["decode_s"] > 0]
    return {
        "server": server.name, "streams": streams, "requests": len(results), "tokens": tokens, "wall_s": wall,
        "aggregate_tps": tokens / wall,
        "decode_tps_median": median(decode),
        "ttft_median_ms": 1000 * median([r["ttft"] for r in results]),
        "ttft_p90_ms": 1000 * p90([r["ttft"] for r in results]),
        "prompt_tokens": sorted({r["prompt_tokens"] for r in results}),
        "prompt_tokens_by_question": {r["question"][:80]: r["prompt_tokens"] for r in results},
        "load1": load, "server_cpu_cores": server_cpu / wall, "client_cpu_cores": client_cpu / wall,
        "foreign_cpu_cores": max(0.0, busy - server_cpu - client_cpu) / wall,
        "memory_mib": memory_mib(pid), "start_s": server.start_s,
        "sample_text": results[0]["text"][:120],
    }


# ----------------------------------------------------------------------------------------------
# main


def gguf_path() -> Path:
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    paths = sorted(Path(hub, GGUF_REPO, "snapshots").glob(f"*/{GGUF_FILE}"))
    if not paths:
        sys.exit(f"{GGUF_FILE} is not in {hub}; run scripts/offline-models.sh")
    return paths[0].resolve()


def version_of(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        lines = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip()]
        versioned = [line for line in lines if "version" in line.lower() or line.startswith("nstream")]
        return "; ".join(versioned or lines[-1:])[:200] or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def git_state() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + (" with uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-bin", required=True, help="release nstream-server")
    parser.add_argument("--llama-server", required=True, help="llama.cpp's llama-server")
    parser.add_argument("--model-file", default=str(ROOT / "examples" / "smollm2-135m-instruct.yaml"))
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both servers")
    parser.add_argument("--streams", default="1,4,16", help="concurrency levels")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--single-requests", type=int, default=6, help="requests in the 1-stream scenario")
    parser.add_argument("--requests-per-stream", default="4:2,16:1",
                        help="requests per stream: N for every level, or LEVEL:N,... (levels not named: 1)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; medians are reported")
    parser.add_argument("--slot-context", type=int, default=512, help="llama-server context per slot")
    parser.add_argument("--long-prompt-tokens", type=int, default=2000,
                        help="tokens of the long-prompt scenario's prompts (about; 0: skip it)")
    parser.add_argument("--long-requests", type=int, default=3, help="requests in the long-prompt scenario")
    parser.add_argument("--long-max-tokens", type=int, default=8, help="tokens out per long-prompt request")
    parser.add_argument("--servers", default="ours,llama-server,ours-q8_0")
    parser.add_argument("--once", default="ours-q8_0", help="servers measured in the first round only")
    parser.add_argument("--max-load", type=float, default=1.0)
    parser.add_argument("--quiet-wait", type=float, default=120.0)
    parser.add_argument("--max-foreign-cpu", type=float, default=0.3,
                        help="a row during which other processes used more cores is measured once more")
    parser.add_argument("--results-dir", default=str(HERE / "results"))
    parser.add_argument("--no-write", action="store_true", help="print only; write no results file")
    parser.add_argument("--label", default="", help="suffix for the results file name")
    args = parser.parse_args()
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    levels = [int(x) for x in args.streams.split(",")]
    names = args.servers.split(",")
    gguf = gguf_path()
    logs = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nstream" / "bench-llm-logs"
    logs.mkdir(parents=True, exist_ok=True)

    def make(name: str, streams: int, context: int = 0) -> Server:
        port = free_port()
        if name.startswith("ours"):
            variant, _, level = name.partition("@")
            requantize = {"ours": [], "ours-q8_0": ["--requantize", "q8-0"], "ours-keep": ["--requantize", "keep"],
                          "ours-q4_0": ["--requantize", "q4-0"]}[variant]
            argv = [args.server_bin, "--model-file", args.model_file, "--host", "127.0.0.1", "--port", str(port),
                    "--threads", str(args.threads), *requantize]
            env = {"NSTREAM_CPU_LEVEL": level} if level else {}
            return Server(name, argv, port, "/ready", logs / f"{name}.log", env)
        argv = [args.llama_server, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                "--parallel", str(streams), "-c", str(max(streams * args.slot_context, context)),
                "--threads", str(args.threads), "--threads-batch", str(args.threads), "--cont-batching"]
        return Server(name, argv, port, "/health", logs / f"{name}.log")

    commands = {}
    rows: list[dict] = []
    started = dt.datetime.now(dt.timezone.utc)
    for round_ in range(args.rounds):
        for streams in levels:
            order = names if round_ % 2 == 0 else list(reversed(names))
            for name in order:
                if round_ > 0 and name in args.once.split(","):
                    continue
                server = make(name, streams)
                commands[f"{name} @{streams}"] = server.command()
                load = wait_quiet(args.max_load, args.quiet_wait, first=not rows)
                log(f"round {round_ + 1}/{args.rounds}: {name}, {streams} stream(s) (load {load:.2f})")
                server.start()
                try:
                    row = measure(server, streams, args)
                    if row["foreign_cpu_cores"] > args.max_foreign_cpu:
                        log(f"  other processes used {row['foreign_cpu_cores']:.2f} cores; measuring once more")
                        wait_quiet(args.max_load, args.quiet_wait, first=False)
                        again = measure(server, streams, args)
                        row = min(row, again, key=lambda r: r["foreign_cpu_cores"])
                        row["retried"] = True
                finally:
                    server.stop()
                row["round"] = round_ + 1
                rows.append(row)
                log(f"  {row['aggregate_tps']:.1f} tok/s aggregate, decode {row['decode_tps_median']:.1f} tok/s/stream, "
                    f"TTFT {row['ttft_median_ms']:.0f} ms, server {row['server_cpu_cores']:.2f} cores, "
                    f"client {row['client_cpu_cores']:.2f}, foreign {row['foreign_cpu_cores']:.2f}")

    long_rows: list[dict] = []
    if args.long_prompt_tokens > 0:
        for round_ in range(args.rounds):
            order = names if round_ % 2 == 0 else list(reversed(names))
            for name in order:
                if round_ > 0 and name in args.once.split(","):
                    continue
                server = make(name, 1, context=args.long_prompt_tokens + 1024)
                commands[f"{name} long prompt"] = server.command()
                load = wait_quiet(args.max_load, args.quiet_wait, first=False)
                log(f"round {round_ + 1}/{args.rounds}: {name}, long prompt (load {load:.2f})")
                server.start()
                try:
                    row = measure_long(server, args)
                finally:
                    server.stop()
                row["round"] = round_ + 1
                long_rows.append(row)
                log(f"  TTFT {row['ttft_ms']} ms for {row['prompt_tokens']} prompt tokens")

    # Same prompts: every server saw the same prompt token counts per question.
    by_question: dict[str, set] = {}
    for row in rows:
        for question, n in row["prompt_tokens_by_question"].items():
            by_question.setdefault(question, set()).add(n)
    same_prompts = all(len(v) == 1 for v in by_question.values())
    if not same_prompts:
        log(f"WARNING: prompt token counts differ between servers: {by_question}")

    summary = summarise(rows, names, levels)
    for name in names:
        sel = [r for r in long_rows if r["server"] == name]
        if sel:
            summary[f"{name}@long"] = {
                "ttft_ms": median([r["ttft_median_ms"] for r in sel]),
                "rounds": [round(r["ttft_median_ms"]) for r in sel],
                "prompt_tokens": sorted({n for r in sel for n in r["prompt_tokens"]}),
                "rss_mib": max(r["memory_mib"].get("VmHWM", 0) for r in sel),
            }
    meta = {
        "date_utc": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": {
            "nstream": version_of([args.server_bin, "--version"]) + f" (repo at {git_state()}; binary built "
            + dt.datetime.fromtimestamp(Path(args.server_bin).stat().st_mtime, dt.timezone.utc).strftime("%H:%M UTC")
            + ")",
            "llama-server": version_of([args.llama_server, "--version"]),
            "llama-server build": (Path(args.llama_server).parent.parent / "BUILD-INFO").read_text().strip()
            if (Path(args.llama_server).parent.parent / "BUILD-INFO").exists() else "?",
        },
        "gguf": str(gguf),
        "settings": {k: getattr(args, k) for k in ("threads", "streams", "max_tokens", "single_requests",
                                                    "requests_per_stream", "rounds", "once", "slot_context",
                                                    "long_prompt_tokens", "long_requests", "long_max_tokens")},
        "commands": commands,
        "same_prompt_tokens": same_prompts,
        "prompt_tokens": sorted({n for v in by_question.values() for n in v}),
    }
    markdown = render_markdown(meta, summary, rows, names, levels)
    print(markdown)
    if not args.no_write:
        out = Path(args.results_dir)
        stem = started.strftime("%Y-%m-%d") + (f"-{args.label}" if args.label else "")
        (out / f"{stem}.md").write_text(markdown + "\n")
        (out / f"{stem}.json").write_text(
            json.dumps({"meta": meta, "summary": summary, "rows": rows, "long_prompt_rows": long_rows}, indent=1) + "\n")
        log(f"wrote {out / (stem + '.md')} and .json")
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import chart  # benches/chart.py: the results' SVG chart, next to them
        chart.after_run(out / f"{stem}.json", bench="llm")


def summarise(rows: list[dict], names: list[str], levels: list[int]) -> dict:
    out: dict = {}
    for name in names:
        for streams in levels:
            sel = [r for r in rows if r["server"] == name and r["streams"] == streams]
            if not sel:
                continue
            out[f"{name}@{streams}"] = {
                "aggregate_tps": median([r["aggregate_tps"] for r in sel]),
                "decode_tps": median([r["decode_tps_median"] for r in sel]),
                "ttft_ms": median([r["ttft_median_ms"] for r in sel]),
                "ttft_p90_ms": median([r["ttft_p90_ms"] for r in sel]),
                "rounds": [round(r["aggregate_tps"], 1) for r in sel],
                "max_foreign_cpu": max(r["foreign_cpu_cores"] for r in sel),
                "max_load1": max(r["load1"] for r in sel),
                "rss_mib": max(r["memory_mib"].get("VmHWM", 0) for r in sel),
            }
    return out


def render_markdown(meta: dict, summary: dict, rows: list[dict], names: list[str], levels: list[int]) -> str:
    m = meta["machine"]
    s = meta["settings"]
    lines = [
        f"# LLM serving: nstream-server vs llama-server — {meta['date_utc']}",
        "",
        f"- Machine: {m.get('Model name', '?')}, {m.get('CPU(s)', m.get('nproc'))} CPU(s) "
        f"({m.get('Core(s) per socket', '?')} core(s)/socket × {m.get('Thread(s) per core', '?')} thread(s)/core), "
        f"{m.get('MemTotal', '?')} RAM, {m.get('platform')}",
        f"- Model: SmolLM2-135M-Instruct, {GGUF_FILE} (same file for both)",
        f"- Versions: nstream `{meta['versions']['nstream']}`; llama-server `{meta['versions']['llama-server']}`",
        f"- llama-server build: {meta['versions']['llama-server build']}".replace("\n", "; "),
        f"- Workload: /v1/completions, streaming, greedy (temperature 0), ignore_eos, max_tokens {s['max_tokens']}, "
        f"chat-templated prompts of {min(meta['prompt_tokens'])}-{max(meta['prompt_tokens'])} tokens with a unique "
        f"tag first (prompt token counts identical across servers: {meta['same_prompt_tokens']}); "
        f"{s['threads']} threads for both; 1 stream: {s['single_requests']} requests; 4/16 streams: "
        f"requests per stream {s['requests_per_stream']}; {s['rounds']} alternating round(s) "
        f"({s['once'] or 'none'} in the first only), medians over rounds",
        "",
        "| server | streams | aggregate tok/s | decode tok/s per stream | TTFT median ms | TTFT p90 ms | peak RSS MiB | rounds (agg. tok/s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for streams in levels:
        for name in names:
            v = summary.get(f"{name}@{streams}")
            if v:
                lines.append(f"| {name} | {streams} | {v['aggregate_tps']:.1f} | {v['decode_tps']:.1f} | "
                             f"{v['ttft_ms']:.0f} | {v['ttft_p90_ms']:.0f} | {v['rss_mib']:.0f} | {v['rounds']} |")
    lines += ["", "Ratios ours / llama-server (> 1: ours better; for TTFT the ratio is llama-server's / ours):", "",
              "| ours | streams | aggregate | decode per stream | TTFT |", "| --- | ---: | ---: | ---: | ---: |"]
    for name in names:
        if not name.startswith("ours"):
            continue
        for streams in levels:
            a, b = summary.get(f"{name}@{streams}"), summary.get(f"llama-server@{streams}")
            if a and b:
                lines.append(f"| {name} | {streams} | {a['aggregate_tps'] / b['aggregate_tps']:.2f}x | "
                             f"{a['decode_tps'] / b['decode_tps']:.2f}x | {b['ttft_ms'] / a['ttft_ms']:.2f}x |")
    long_rows = [(name, summary[f"{name}@long"]) for name in names if f"{name}@long" in summary]
    if long_rows:
        peer = summary.get("llama-server@long")
        lines += ["", f"Long prompt (1 stream, {s['long_requests']} requests of about {s['long_prompt_tokens']} tokens, "
                  f"{s['long_max_tokens']} tokens out; TTFT ratio: llama-server's / ours):", "",
                  "| server | prompt tokens | TTFT median ms | rounds (median ms) | ratio |", "| --- | --- | ---: | --- | ---: |"]
        for name, v in long_rows:
            ratio = f"{peer['ttft_ms'] / v['ttft_ms']:.2f}x" if peer and name.startswith("ours") else ""
            lines.append(f"| {name} | {v['prompt_tokens']} | {v['ttft_ms']:.0f} | {v['rounds']} | {ratio} |")
    worst_foreign = max((r["foreign_cpu_cores"] for r in rows), default=0)
    worst_load = max((r["load1"] for r in rows), default=0)
    retried = sum(1 for r in rows if r.get("retried"))
    lines += ["", f"Noise: highest 1-minute load average before a row {worst_load:.2f}; highest foreign CPU during a "
              f"row {worst_foreign:.2f} cores; rows measured twice for foreign CPU: {retried}.", "", "Commands:", ""]
    for key, command in meta["commands"].items():
        lines.append(f"- {key}: `{command}`")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    finally:
        stop_all()
