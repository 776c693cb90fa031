"""Gateway overhead of nstream-server in front of a hosted provider (a MegaModel).

The same client (wrk, one JSON line of exact percentiles from wrk-post.lua) in the same run calls
the fake OpenAI provider (tests/python/fake_provider.py) directly and through nstream-server, whose
MegaModel points at that provider, with the same non-streaming chat request and the same fixed
small answer. Scenarios alternate, round after round, so drift hits both sides alike:

- latency: one connection, one request at a time (p50, p90, p99, p99.9); added = gateway - direct
- throughput: N connections (requests/s)

then two long runs through the gateway, with nstream-server's VmRSS read from /proc at start, after
warm-up and after each run: memory must stay flat. Stdlib only; prints a markdown report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FAKE = ROOT / "tests" / "python" / "fake_provider.py"
KEY = "sk-fake-openai"  # fake_provider.py's default OpenAI key
MODEL = "bench-mega"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{url} not ready within {timeout}s")


def rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def wrk(url: str, body: dict, connections: int, seconds: int, threads: int) -> dict:
    env = dict(os.environ, BODY=json.dumps(body), AUTH=f"Bearer {KEY}")
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "10s",
               "-s", str(HERE / "wrk-post.lua"), url]
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    line = next((line for line in output.splitlines() if line.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"no WRKJSON line from {command}:\n{output}")
    result = json.loads(line[len("WRKJSON "):])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    if result["socket_errors"] or result["non_2xx"]:
        raise RuntimeError(f"errors in {command}: {result}")
    return result


def model_file(provider_url: str) -> str:
    return f"""apiVersion: llm.nstream.ai/v1
kind: MegaModel
metadata:
  name: {MODEL}
spec:
  modelProvider: OpenAI
  modelTemplate:
    openAI: {{endpoint: "{provider_url}/v1", model: gpt-4o-mini, apikeySecretRef: {{name: openai, key: api-key}}}}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server-bin", required=True, type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5, help="per scenario and round")
    parser.add_argument("--connections", type=int, default=32, help="of the throughput scenario")
    parser.add_argument("--long-seconds", type=int, default=20, help="each of the two long runs")
    parser.add_argument("--rust-log", default="warn", help="RUST_LOG of nstream-server")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    arguments = parser.parse_args()

    processes: list[subprocess.Popen] = []
    try:
        fake = subprocess.Popen([sys.executable, str(FAKE), "--port", "0", "--no-log"], stdout=subprocess.PIPE,
                                text=True)
        processes.append(fake)
        first = fake.stdout.readline() if fake.stdout else ""
        if "fake provider on " not in first:
            raise RuntimeError(f"the fake provider did not start: {first!r}")
        provider = first.split("fake provider on ", 1)[1].strip()

        folder = Path(tempfile.mkdtemp(prefix="nstream-gateway-bench-"))
        (folder / "model.yaml").write_text(model_file(provider))
        port = free_port()
        env = {key: value for key, value in os.environ.items() if not key.startswith("NSTREAM_")}
        env.update(NSTREAM_SECRET_OPENAI_API_KEY=KEY, RUST_LOG=arguments.rust_log, NO_COLOR="1")
        server = subprocess.Popen(
            [str(arguments.server_bin), "--model-file", str(folder / "model.yaml"), "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=(folder / "server.log").open("w"),
        )
        processes.append(server)
        gateway = f"http://127.0.0.1:{port}"
        wait_ready(f"{gateway}/ready", server)

        messages = [{"role": "user", "content": "Say hi."}]
        direct = (f"{provider}/v1/chat/completions", {"model": "gpt-4o-mini", "messages": messages, "max_tokens": 16})
        through = (f"{gateway}/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 16})

        memory = [("start (ready, no request yet)", 0, rss_kib(server.pid))]
        served = 0
        warm = wrk(*through, connections=4, seconds=2, threads=1)
        wrk(*direct, connections=4, seconds=1, threads=1)
        served += warm["requests"]
        memory.append(("after warm-up", served, rss_kib(server.pid)))

        results: dict[str, list[dict]] = {"latency direct": [], "latency gateway": [], "throughput direct": [],
                                          "throughput gateway": []}
        for round_index in range(arguments.rounds):
            for name, (url, body), connections, threads in (
                ("latency direct", direct, 1, 1),
                ("latency gateway", through, 1, 1),
                ("throughput direct", direct, arguments.connections, 2),
                ("throughput gateway", through, arguments.connections, 2),
            ):
                result = wrk(url, body, connections, arguments.seconds, threads)
                if "gateway" in name:
                    served += result["requests"]
                results[name].append(result)
                print(f"round {round_index + 1} {name}: p50 {result['p50_us']} us, p99 {result['p99_us']} us, "
                      f"{result['rps']:.0f} req/s", file=sys.stderr)
        memory.append(("after the measured rounds", served, rss_kib(server.pid)))
        for run in (1, 2):
            result = wrk(*through, connections=arguments.connections, seconds=arguments.long_seconds, threads=2)
            served += result["requests"]
            memory.append((f"after long run {run} ({result['requests']} requests, {result['rps']:.0f} req/s)",
                           served, rss_kib(server.pid)))
        if server.poll() is not None:
            raise RuntimeError(f"nstream-server exited with {server.returncode}")
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    def median(name: str, key: str) -> float:
        return statistics.median(result[key] for result in results[name])

    added = {
        key: statistics.median(g[key] - d[key] for g, d in zip(results["latency gateway"], results["latency direct"]))
        for key in ("p50_us", "p90_us", "p99_us", "p999_us", "mean_us")
    }
    lines = [
        "| scenario | p50 | p90 | p99 | p99.9 | requests/s |",
        "|---|---|---|---|---|---|",
    ]
    for name in results:
        lines.append(
            f"| {name} | {median(name, 'p50_us'):.0f} us | {median(name, 'p90_us'):.0f} us | "
            f"{median(name, 'p99_us'):.0f} us | {median(name, 'p999_us'):.0f} us | {median(name, 'rps'):.0f} |"
        )
    lines += [
        "",
        f"Added by the gateway, one connection (median over rounds of gateway minus direct): p50 "
        f"**{added['p50_us']:.0f} us**, p90 {added['p90_us']:.0f} us, p99 {added['p99_us']:.0f} us, "
        f"p99.9 {added['p999_us']:.0f} us, mean {added['mean_us']:.0f} us. Throughput through the gateway at "
        f"{arguments.connections} connections: {median('throughput gateway', 'rps') / median('throughput direct', 'rps'):.0%}"
        f" of direct.",
        "",
        "Per round (p50 / p99 us, req/s):",
        "",
    ]
    for name, rows in results.items():
        lines.append(f"- {name}: " + "; ".join(f"{r['p50_us']} / {r['p99_us']}, {r['rps']:.0f}" for r in rows))
    lines += ["", "| nstream-server memory | requests served | VmRSS | VmHWM |", "|---|---|---|---|"]
    for label, count, fields in memory:
        lines.append(f"| {label} | {count} | {fields['VmRSS'] / 1024:.1f} MiB | {fields['VmHWM'] / 1024:.1f} MiB |")
    growth = memory[-1][2]["VmRSS"] - memory[-2][2]["VmRSS"]
    lines += ["", f"VmRSS change over long run 2: {growth / 1024:+.1f} MiB; from start to the end: "
                  f"{(memory[-1][2]['VmRSS'] - memory[0][2]['VmRSS']) / 1024:+.1f} MiB over {served} requests."]
    print("\n".join(lines))
    if arguments.json:
        arguments.json.write_text(json.dumps({"results": results, "added": added, "memory": memory,
                                              "python": platform.python_version()}, indent=1))
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import chart  # benches/chart.py: the results' SVG chart, next to them
        chart.after_run(arguments.json, bench="gateway")
    return 0


if __name__ == "__main__":
    sys.exit(main())
