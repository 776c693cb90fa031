#!/usr/bin/env python3
"""nstream-server vs sentence-transformers: all-MiniLM-L6-v2 embeddings on the CPU, one run.

What it measures, on one fixed seeded corpus (1,000 sentences of mixed length, long ones included):

  * ours: the release `nstream-server` over HTTP, with 1, 4 and 16 concurrent keep-alive clients,
    one sentence per request (the headline) and 32 sentences per request;
  * the peer over the same HTTP harness: peer_server.py, a minimal standard-library server around
    sentence-transformers that answers each request with one `model.encode` call (serialized by a
    lock; a lock-free variant is measured too and the better peer number is used for the ratio);
  * the peer offline: `model.encode(corpus, batch_size=32)` with 2 torch threads;
  * cold start (process start to GET /ready 200) and resident memory (VmRSS, VmHWM) of both servers;
  * optionally (--sweep) nstream's --max-batch-tokens / --max-batch-requests / --threads settings;
  * a correctness guard: every sentence's vector from nstream (batched requests and concurrent
    single-sentence requests, which nstream batches with other requests' sentences) against
    sentence-transformers' encode(): cosine >= 0.9999 or the run fails.

The client is the standard library only (http.client, one keep-alive connection per client
thread, base64 vectors as the official OpenAI client asks for). Client, server and foreign CPU
are recorded per row, so a client or a neighbour that gets in the way is visible.

Quiet machine: before each server starts, the run waits (up to --quiet-wait s) for the 1-minute
load average to drop below --max-load; before each row it waits (up to 60 s) until the machine
is idle over one second (< 0.3 busy cores: the load average lags a minute behind, so it mostly
measures our own previous row). A row during which other processes used more than
--max-foreign-cpu cores is run again once. The load average at each row is in the results.

Usually run through benches/embeddings/run.sh, which builds and prepares everything.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import datetime as dt
import http.client
import itertools
import json
import math
import os
import platform
import random
import resource
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
FIXTURE_CORPUS = ROOT / "tests" / "fixtures" / "embeddings" / "corpus.jsonl"
MODEL_NAME = "all-minilm-l6-v2"
DIM = 384
SEED = 20261126
HZ = os.sysconf("SC_CLK_TCK")

WORDS = (
    "model embedding vector search query document index token batch server latency throughput "
    "the a of and to in is for on with as by at from that this it be are was were will can "
    "river mountain city ocean forest library kitchen garden window station market bridge "
    "quickly slowly carefully quietly brightly softly suddenly rarely always never often "
    "build read write learn measure compare deploy train serve cache load split join sort "
    "red green blue small large ancient modern simple complex bright dark warm cold "
    "customer invoice refund shipping account password error request response timeout retry"
).split()

PROCS: list[subprocess.Popen] = []


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# corpus


def build_corpus(size: int) -> list[str]:
    """The 206 sentences of the test fixtures (multilingual, emoji, 6 inputs past 256 tokens),
    then seeded synthetic sentences: mostly 3-64 words, about 4% of 150-400 words."""
    texts = [json.loads(line)["text"] for line in FIXTURE_CORPUS.read_text(encoding="utf-8").splitlines() if line]
    rng = random.Random(SEED)
    while len(texts) < size:
        if rng.random() < 0.04:
            n = rng.randint(150, 400)
        else:
            n = rng.choice([3, 4, 6, 8, 10, 12, 14, 16, 20, 24, 32, 40, 48, 64])
        text = " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + rng.choice([".", "!", "?", ""])
        texts.append(text)
    return texts[:size]


# ----------------------------------------------------------------------------------------------
# machine state


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def system_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total


def process_jiffies(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def memory_kib(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def busy_cores(seconds: float = 1.0) -> float:
    b0, t0 = system_jiffies()
    time.sleep(seconds)
    b1, t1 = system_jiffies()
    ncpu = os.cpu_count() or 1
    return (b1 - b0) / max(1, t1 - t0) * ncpu


QUIET_BUDGET = [180.0]


def wait_for_quiet(max_load: float, max_wait: float) -> float:
    start = time.monotonic()
    max_wait = max(0.0, min(max_wait, QUIET_BUDGET[0]))
    load = loadavg()
    while load >= max_load and time.monotonic() - start < max_wait:
        time.sleep(2)
        load = loadavg()
    waited = time.monotonic() - start
    QUIET_BUDGET[0] -= waited
    if load >= max_load:
        log(f"load average still {load:.2f} after {waited:.0f}s; measuring anyway (recorded)")
    elif waited > 1:
        log(f"waited {waited:.0f}s for load average {load:.2f} < {max_load}")
    return load


def wait_for_idle(max_busy: float = 0.3, max_wait: float = 30.0) -> float:
    start = time.monotonic()
    busy = busy_cores(1.0)
    while busy >= max_busy and time.monotonic() - start < max_wait:
        busy = busy_cores(1.0)
    return busy


# ----------------------------------------------------------------------------------------------
# processes


def stop_all() -> None:
    for proc in PROCS:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 10
    for proc in PROCS:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    PROCS.clear()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc in PROCS:
        PROCS.remove(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get_status(port: int, path: str, timeout: float = 1.0) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("GET", path)
        status = conn.getresponse().status
        conn.close()
        return status
    except OSError:
        return None


def start_server(cmd: list[str], port: int, env: dict, log_path: Path, timeout: float = 180.0) -> tuple[subprocess.Popen, float]:
    """Starts a server and returns it with the seconds from spawn to the first GET /ready 200."""
    log_file = log_path.open("ab")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    PROCS.append(proc)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; see {log_path}")
        if http_get_status(port, "/ready") == 200:
            return proc, time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"{cmd[0]} not ready after {timeout}s; see {log_path}")
        time.sleep(0.01)


# ----------------------------------------------------------------------------------------------
# the load generator


def decode_vectors(data: list[dict]) -> list[tuple[float, ...]]:
    return [struct.unpack(f"<{DIM}f", base64.b64decode(item["embedding"])) for item in data]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run_load(port: int, texts: list[str], clients: int, per_request: int, passes: int,
             server_pid: int, capture: bool = False, order: list[int] | None = None) -> dict:
    """Sends the sentences of `order` (default: the whole corpus in order) `passes` times,
    `per_request` per request, from `clients` threads with one keep-alive connection each; work is
    taken from a shared counter."""
    order = list(range(len(texts))) if order is None else order
    chunks = [order[i:i + per_request] for i in range(0, len(order), per_request)]
    work = chunks * passes
    counter = itertools.count()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    captured: dict[int, tuple[float, ...]] = {}
    barrier = threading.Barrier(clients + 1)

    def client(slot: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        headers = {"content-type": "application/json"}
        mine = latencies[slot]
        barrier.wait()
        while True:
            n = next(counter)
            if n >= len(work):
                break
            chunk = work[n]
            payload = texts[chunk[0]] if per_request == 1 else [texts[i] for i in chunk]
            body = json.dumps({"model": MODEL_NAME, "input": payload, "encoding_format": "base64"})
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/embeddings", body, headers)
                response = conn.getresponse()
                raw = response.read()
            except (OSError, http.client.HTTPException) as error:
                errors.append(repr(error))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                continue
            mine.append(time.perf_counter() - t0)
            if response.status != 200:
                errors.append(f"HTTP {response.status}: {raw[:200]!r}")
                continue
            data = json.loads(raw)["data"]
            if len(data) != len(chunk):
                errors.append(f"{len(data)} vectors for {len(chunk)} inputs")
            elif capture and n < len(chunks):
                for i, vector in zip(chunk, decode_vectors(data)):
                    captured[i] = vector
        conn.close()

    threads = [threading.Thread(target=client, args=(slot,), daemon=True) for slot in range(clients)]
    for thread in threads:
        thread.start()
    cpu0, srv0, (busy0, total0) = self_cpu_seconds(), process_jiffies(server_pid), system_jiffies()
    barrier.wait()
    wall0 = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - wall0
    cpu1, srv1, (busy1, total1) = self_cpu_seconds(), process_jiffies(server_pid), system_jiffies()
    ncpu = os.cpu_count() or 1
    system_busy = (busy1 - busy0) / max(1, total1 - total0) * ncpu
    client_cpu = (cpu1 - cpu0) / wall
    server_cpu = (srv1 - srv0) / HZ / wall
    lat = [x for xs in latencies for x in xs]
    sentences = sum(len(c) for c in work)
    result = {
        "clients": clients,
        "per_request": per_request,
        "requests": len(work),
        "sentences": sentences,
        "seconds": round(wall, 3),
        "sentences_per_s": round(sentences / wall, 1),
        "requests_per_s": round(len(work) / wall, 1),
        "p50_ms": round(percentile(lat, 0.50) * 1000, 2),
        "p99_ms": round(percentile(lat, 0.99) * 1000, 2),
        "mean_ms": round(statistics.fmean(lat) * 1000, 2) if lat else None,
        "server_cpu_cores": round(server_cpu, 2),
        "client_cpu_cores": round(client_cpu, 2),
        "foreign_cpu_cores": round(max(0.0, system_busy - server_cpu - client_cpu), 2),
        "errors": len(errors),
        "first_errors": errors[:3],
    }
    if capture:
        result["_captured"] = captured
    return result


def measure_row(label: str, port: int, texts: list[str], clients: int, per_request: int, passes: int,
                server_pid: int, max_foreign: float, capture: bool = False, order: list[int] | None = None) -> dict:
    for attempt in (1, 2):
        idle = wait_for_idle()
        load = loadavg()
        row = run_load(port, texts, clients, per_request, passes, server_pid, capture, order)
        row.update(label=label, loadavg_1m=load, idle_busy_cores_before=round(idle, 2), attempt=attempt)
        log(f"{label:<34} clients={clients:<2} x{per_request:<2} {row['sentences_per_s']:>8.1f} sent/s "
            f"p50={row['p50_ms']:.1f}ms p99={row['p99_ms']:.1f}ms server={row['server_cpu_cores']} "
            f"client={row['client_cpu_cores']} foreign={row['foreign_cpu_cores']} load={load:.2f} "
            f"errors={row['errors']}")
        if row["foreign_cpu_cores"] <= max_foreign:
            break
        if attempt == 1:
            log(f"  other processes used {row['foreign_cpu_cores']} cores during the row; running it again")
        else:
            log("  still disturbed; keeping this attempt (its foreign CPU is recorded)")
    return row


def warm_up(port: int, texts: list[str], server_pid: int) -> None:
    run_load(port, texts[:64], 2, 1, 1, server_pid)
    run_load(port, texts[:256], 2, 32, 1, server_pid)


# ----------------------------------------------------------------------------------------------
# correctness


def cosine(a, b) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else float("nan")


def load_reference(path: Path, n: int) -> list[tuple[float, ...]]:
    raw = path.read_bytes()
    assert len(raw) == n * DIM * 4, f"{path}: {len(raw)} bytes, expected {n * DIM * 4}"
    return [struct.unpack_from(f"<{DIM}f", raw, i * DIM * 4) for i in range(n)]


def guard(name: str, captured: dict, reference: list) -> dict:
    cosines = {i: cosine(v, reference[i]) for i, v in captured.items()}
    worst = min(cosines, key=cosines.get) if cosines else None
    return {
        "source": name,
        "compared": len(cosines),
        "min_cosine": round(cosines[worst], 7) if worst is not None else None,
        "worst_index": worst,
        "mean_cosine": round(statistics.fmean(cosines.values()), 8) if cosines else None,
    }


# ----------------------------------------------------------------------------------------------
# report


def fmt(x, digits=1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def render(results: dict) -> str:
    m = results["machine"]
    v = results["versions"]
    lines = [
        f"# nstream vs sentence-transformers: all-MiniLM-L6-v2 embeddings, CPU ({results['date_utc']})",
        "",
        f"- machine: {m['cpu_model']}, {m['cpus']} cores, {m['memory_gib']} GiB; {m['kernel']}",
        f"- nstream {v['nstream_commit']}{' (dirty tree)' if v.get('nstream_dirty') else ''}, "
        f"server flags: `{' '.join(results['ours_flags']) or '(defaults)'}`",
        f"- peer: sentence-transformers {v['sentence_transformers']}, torch {v['torch']}, "
        f"transformers {v['transformers']}, Python {v['python']}, torch threads {v['torch_threads']}",
        f"- corpus: {results['corpus']['sentences']} sentences (seed {SEED}), "
        f"{results['corpus']['tokens_hint']}; sha256 {results['corpus']['sha256'][:16]}",
        f"- client: Python http.client, one keep-alive connection per client thread, base64 vectors; "
        f"one-sentence rows send a seeded sample of {results['passes']['single_sentences']} corpus sentences "
        f"(the same for every server), 32-sentence rows the whole corpus ({results['passes']['batched']} pass)",
        "",
        "## Throughput and latency over HTTP",
        "",
        "Peer = peer_server.py: each request is one `model.encode(inputs)` call; `lock` serializes them, "
        "`free` lets concurrent calls share the cores. The ratio is ours / the better of the two.",
        "",
        "| inputs/request | clients | ours sent/s | ours p50 / p99 ms | peer (lock) sent/s | peer (lock) p50 / p99 ms "
        "| peer (free) sent/s | **ours / best peer** | ours server / client / foreign CPU | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in results["http"].items():
        o, pl, pf = row["ours"], row.get("peer_lock"), row.get("peer_free")
        lines.append(
            f"| {o['per_request']} | {o['clients']} | {fmt(o['sentences_per_s'])} | "
            f"{fmt(o['p50_ms'])} / {fmt(o['p99_ms'])} | "
            f"{fmt(pl and pl['sentences_per_s'])} | "
            f"{(fmt(pl['p50_ms']) + ' / ' + fmt(pl['p99_ms'])) if pl else '-'} | "
            f"{fmt(pf and pf['sentences_per_s'])} | **{fmt(row.get('ratio'), 2)}×** | "
            f"{o['server_cpu_cores']} / {o['client_cpu_cores']} / {o['foreign_cpu_cores']} | {o['loadavg_1m']:.2f} |"
        )
    e = results["peer_encode"]
    best_ours = max(r["ours"]["sentences_per_s"] for r in results["http"].values())
    lines += [
        "",
        "## Offline peer: `model.encode(corpus, batch_size=32)`, torch threads 2",
        "",
        f"{fmt(e['sentences_per_second'])} sentences/s (best of {len(e['rounds_seconds'])}: "
        f"{', '.join(str(t) for t in e['rounds_seconds'])} s for {e['sentences']} sentences; "
        f"load {e['loadavg_1m']:.2f}). Ours over HTTP, best row: {fmt(best_ours)} sentences/s = "
        f"**{best_ours / e['sentences_per_second']:.2f}×** the in-process peer.",
        "",
        "## Cold start and memory",
        "",
        "| server | process start -> /ready 200 (median of runs) | runs (s) | VmRSS after load | VmHWM |",
        "|---|---|---|---|---|",
    ]
    for name, s in results["servers"].items():
        lines.append(
            f"| {name} | {s['cold_start_median_s']:.2f} s | {', '.join(f'{t:.2f}' for t in s['cold_start_s'])} | "
            f"{s['memory']['VmRSS'] / 1024:.0f} MiB | {s['memory']['VmHWM'] / 1024:.0f} MiB |"
        )
    if results.get("sweep"):
        lines += [
            "",
            "## nstream batching settings (one-sentence requests)",
            "",
            "| flags | " + " | ".join(f"{c} clients sent/s (p99 ms)" for c in results["sweep_clients"]) + " | load |",
            "|---|" + "---|" * len(results["sweep_clients"]) + "---|",
        ]
        for entry in results["sweep"]:
            cells = [f"{fmt(r['sentences_per_s'])} ({fmt(r['p99_ms'])})" for r in entry["rows"]]
            lines.append(f"| `{entry['flags'] or '(defaults)'}` | " + " | ".join(cells) + f" | {entry['rows'][0]['loadavg_1m']:.2f} |")
    g = results["guard"]
    lines += [
        "",
        "## Correctness guard (cosine to sentence-transformers' encode, every sentence)",
        "",
        "| source | compared | min cosine | mean cosine |",
        "|---|---|---|---|",
    ]
    for item in g["checks"]:
        lines.append(f"| {item['source']} | {item['compared']} | {item['min_cosine']} | {item['mean_cosine']} |")
    lines += ["", f"Guard: **{'PASS' if g['pass'] else 'FAIL'}** (threshold {g['threshold']}).",
              f"Errors in any row: {results['total_errors']}.", f"Run time: {results['run_seconds']:.0f} s.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# main


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def machine() -> dict:
    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except FileNotFoundError:
        pass
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {"cpu_model": model, "cpus": os.cpu_count(), "memory_gib": round(mem_kib / 1024**2, 1),
            "kernel": platform.platform()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-bin", required=True, help="the release nstream-server")
    parser.add_argument("--model-file", default=str(ROOT / "examples" / "quickstart.yaml"))
    parser.add_argument("--peer-python", required=True, help="python of the venv with sentence-transformers")
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--batch", type=int, default=32, help="sentences per request in the batched mode")
    parser.add_argument("--batched-passes", type=int, default=1)
    parser.add_argument("--single-sentences", type=int, default=300,
                        help="one-sentence rows send this many sentences (a seeded sample of the corpus, "
                             "the same for every server) to bound the run time")
    parser.add_argument("--encode-rounds", type=int, default=2)
    parser.add_argument("--ours-flags", default="", help="extra nstream-server flags for the main rows")
    parser.add_argument("--sweep", action="append", default=None,
                        help="nstream-server flags to compare (repeatable); 'default' = no flags")
    parser.add_argument("--sweep-clients", default="4,16")
    parser.add_argument("--no-peer-free", action="store_true", help="skip the lock-free peer variant")
    parser.add_argument("--cold-starts", type=int, default=3, help="starts per server for the cold-start median")
    parser.add_argument("--max-load", type=float, default=0.7)
    parser.add_argument("--quiet-wait", type=float, default=120.0, help="most seconds to wait for a quiet machine, per wait")
    parser.add_argument("--quiet-budget", type=float, default=180.0, help="most seconds of such waits in the whole run")
    parser.add_argument("--max-foreign-cpu", type=float, default=0.25)
    parser.add_argument("--threshold", type=float, default=0.9999)
    parser.add_argument("--commit", help="the nstream commit the binary was built from (default: git HEAD)")
    args = parser.parse_args()

    run_start = time.monotonic()
    QUIET_BUDGET[0] = args.quiet_budget
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    atexit.register(stop_all)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"nstream-bench-{os.getpid()}"
    work_dir.mkdir(parents=True, exist_ok=True)
    atexit.register(lambda: subprocess.run(["rm", "-rf", str(work_dir)]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    clients_list = [int(c) for c in args.clients.split(",")]
    ours_flags = args.ours_flags.split()

    texts = build_corpus(args.sentences)
    corpus_path = work_dir / "corpus.jsonl"
    corpus_path.write_text("".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    import hashlib

    words = [len(t.split()) for t in texts]
    corpus_info = {
        "sentences": len(texts),
        "sha256": hashlib.sha256(corpus_path.read_bytes()).hexdigest(),
        "tokens_hint": f"words per sentence: median {statistics.median(words):.0f}, max {max(words)}, "
                       f"{sum(w > 150 for w in words)} over 150 words (truncated at 256 tokens)",
    }
    log(f"corpus: {corpus_info}")

    # ---- the peer offline: encode(), and its vectors for the guard -------------------------
    load = wait_for_quiet(args.max_load, args.quiet_wait)
    ref_path = work_dir / "reference.f32"
    log("peer: model.encode over the corpus (batch 32, 2 threads)")
    out = subprocess.run([args.peer_python, str(HERE / "peer_server.py"), "encode-bench", "--corpus", str(corpus_path),
                          "--threads", "2", "--batch-size", "32", "--rounds", str(args.encode_rounds), "--dump", str(ref_path)],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        log(out.stderr[-3000:])
        return 1
    peer_encode = json.loads(out.stdout.strip().splitlines()[-1])
    peer_encode["loadavg_1m"] = load
    log(f"peer encode: {peer_encode['sentences_per_second']} sentences/s ({peer_encode['rounds_seconds']})")
    reference = load_reference(ref_path, len(texts))

    http_rows: dict[str, dict] = {}
    servers: dict[str, dict] = {}
    checks: list[dict] = []
    plan = [(c, 1, 1) for c in clients_list] + [(c, args.batch, args.batched_passes) for c in clients_list]
    single_order = random.Random(SEED + 1).sample(range(len(texts)), min(args.single_sentences, len(texts)))

    def server_phase(name: str, make_cmd, key: str, guard_rows: bool) -> None:
        starts: list[float] = []
        port = free_port()
        wait_for_quiet(args.max_load, args.quiet_wait)
        proc, cold = start_server(make_cmd(port), port, env, work_dir / f"{key}.log")
        starts.append(cold)
        log(f"{name}: ready in {cold:.2f}s (pid {proc.pid})")
        warm_up(port, texts, proc.pid)
        for clients, per_request, passes in plan:
            capture = guard_rows and ((per_request > 1 and clients == 1) or (per_request == 1 and clients == max(clients_list)))
            order = single_order if per_request == 1 else None
            row = measure_row(name, port, texts, clients, per_request, passes, proc.pid, args.max_foreign_cpu, capture, order)
            captured = row.pop("_captured", None)
            if captured is not None:
                checks.append(guard(f"{name}, {per_request}/request, {clients} clients", captured, reference))
            http_rows.setdefault(f"{per_request}x{clients}", {})[key] = row
        memory = memory_kib(proc.pid)
        stop(proc)
        for _ in range(args.cold_starts - 1):
            wait_for_idle()
            port = free_port()
            proc, cold = start_server(make_cmd(port), port, env, work_dir / f"{key}.log")
            starts.append(cold)
            stop(proc)
        servers[name] = {"cold_start_s": [round(s, 3) for s in starts],
                         "cold_start_median_s": round(statistics.median(starts), 3), "memory": memory}
        log(f"{name}: cold starts {servers[name]['cold_start_s']}, memory {memory}")

    ours_cmd = lambda flags: (lambda port: [args.server_bin, "--model-file", args.model_file, "--port", str(port), *flags])
    peer_cmd = lambda mode: (lambda port: [args.peer_python, str(HERE / "peer_server.py"), "serve", "--port", str(port),
                                           "--threads", "2", "--concurrency", mode])

    server_phase("nstream-server", ours_cmd(ours_flags), "ours", True)
    server_phase("sentence-transformers server (lock)", peer_cmd("lock"), "peer_lock", True)
    if not args.no_peer_free:
        saved_plan, saved_starts = plan, args.cold_starts
        plan = [p for p in plan if p[0] > 1]  # with one client, lock and free are the same server
        args.cold_starts = 1
        server_phase("sentence-transformers server (free)", peer_cmd("free"), "peer_free", False)
        plan, args.cold_starts = saved_plan, saved_starts
    for row in http_rows.values():
        peers = [row[k]["sentences_per_s"] for k in ("peer_lock", "peer_free") if k in row]
        row["ratio"] = round(row["ours"]["sentences_per_s"] / max(peers), 3) if peers else None

    # ---- batching settings ------------------------------------------------------------------
    sweep = []
    sweep_clients = [int(c) for c in args.sweep_clients.split(",")]
    for flags_text in args.sweep or []:
        flags = [] if flags_text == "default" else flags_text.split()
        wait_for_quiet(args.max_load, args.quiet_wait)
        port = free_port()
        proc, _ = start_server(ours_cmd(flags)(port), port, env, work_dir / "sweep.log")
        warm_up(port, texts, proc.pid)
        rows = [measure_row(f"sweep {' '.join(flags) or 'defaults'}", port, texts, c, 1, 1, proc.pid, args.max_foreign_cpu,
                            order=single_order)
                for c in sweep_clients]
        stop(proc)
        sweep.append({"flags": " ".join(flags), "rows": rows})

    # ---- versions, guard, report --------------------------------------------------------------
    versions = {k: v for k, v in peer_encode.pop("versions").items()}
    versions["nstream_commit"] = args.commit or git("rev-parse", "--short=12", "HEAD")
    versions["nstream_dirty"] = False if args.commit else bool(git("status", "--porcelain", "--untracked-files=no"))
    passed = bool(checks) and all(c["min_cosine"] is not None and c["min_cosine"] >= args.threshold for c in checks)
    total_errors = sum(r["errors"] for row in http_rows.values() for k, r in row.items() if isinstance(r, dict)) + \
        sum(r["errors"] for s in sweep for r in s["rows"])
    now = dt.datetime.now(dt.timezone.utc)
    results = {
        "date_utc": now.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": versions,
        "ours_flags": ours_flags,
        "corpus": corpus_info,
        "passes": {"single": 1, "batched": args.batched_passes, "single_sentences": len(single_order)},
        "peer_encode": peer_encode,
        "http": http_rows,
        "servers": servers,
        "sweep": sweep,
        "sweep_clients": sweep_clients,
        "guard": {"threshold": args.threshold, "pass": passed, "checks": checks},
        "total_errors": total_errors,
        "run_seconds": time.monotonic() - run_start,
        "command": " ".join(sys.argv),
    }
    report = render(results)
    print(report)
    stem = now.strftime("%Y-%m-%d")
    (out_dir / f"{stem}.md").write_text(report, encoding="utf-8")
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {out_dir / (stem + '.md')} and .json")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import chart  # benches/chart.py: the results' SVG chart, next to them
    chart.after_run(out_dir / f"{stem}.json", bench="embeddings")
    return 0 if passed and total_errors == 0 else 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        stop_all()
