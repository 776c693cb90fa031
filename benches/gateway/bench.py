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
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402  (benches/harness.py)
from harness import free_port, rss_kib, wait_ready, wrk  # noqa: E402

MODEL = "bench-mega"


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
        provider = harness.start_fake_provider(processes)

        folder = Path(tempfile.mkdtemp(prefix="nstream-gateway-bench-"))
        (folder / "model.yaml").write_text(model_file(provider))
        port = free_port()
        env = harness.binary_environment(NSTREAM_SECRET_OPENAI_API_KEY=harness.PROVIDER_KEY,
                                         RUST_LOG=arguments.rust_log, NO_COLOR="1")
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
                harness.print_round(round_index, name, result)
        memory.append(("after the measured rounds", served, rss_kib(server.pid)))
        for run in (1, 2):
            result = wrk(*through, connections=arguments.connections, seconds=arguments.long_seconds, threads=2)
            served += result["requests"]
            memory.append((f"after long run {run} ({result['requests']} requests, {result['rps']:.0f} req/s)",
                           served, rss_kib(server.pid)))
        if server.poll() is not None:
            raise RuntimeError(f"nstream-server exited with {server.returncode}")
    finally:
        harness.stop(processes, 10)

    def median(name: str, key: str) -> float:
        return harness.median(results, name, key)

    added = harness.added(results, "latency gateway", "latency direct",
                          ("p50_us", "p90_us", "p99_us", "p999_us", "mean_us"))
    lines = harness.scenario_table(results)
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
        import chart  # benches/chart.py: the results' SVG chart, next to them
        chart.after_run(arguments.json, bench="gateway")
    return 0


if __name__ == "__main__":
    sys.exit(main())
