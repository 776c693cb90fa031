"""Router overhead: nstream-router in front of a fast upstream, against the upstream directly.

The upstream is the fake OpenAI provider (tests/python/fake_provider.py): a fixed small chat answer,
so what is measured is the router's hop, not a model. nstream-router runs outside any cluster with
`--static-route bench=http://UPSTREAM` (its static mode, for benchmarks and single-host use) and
no caller keys, so the caller's Authorization passes through to the provider. The same client (wrk
with benches/gateway/wrk-post.lua, exact percentiles) calls both sides with the same request;
scenarios alternate round after round so drift hits both alike:

- latency: one connection, one request at a time; added = through the router - direct
- concurrent: N connections (p50/p99 under load, requests/s)

Stdlib only; prints a markdown report (machine, load average, command) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402  (benches/harness.py)
from harness import free_port, rss_kib, wait_ready, wrk  # noqa: E402

MODEL = "gpt-4o-mini"  # what the fake provider answers to


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--router-bin", required=True, type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5, help="per scenario and round")
    parser.add_argument("--connections", type=int, default=16, help="of the concurrent scenario")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    arguments = parser.parse_args()

    load_before = os.getloadavg()
    processes: list[subprocess.Popen] = []
    try:
        provider = harness.start_fake_provider(processes)

        folder = Path(tempfile.mkdtemp(prefix="nstream-router-bench-"))
        port = free_port()
        env = harness.binary_environment(RUST_LOG="warn", NO_COLOR="1")
        router = subprocess.Popen(
            [str(arguments.router_bin), "--address", f"127.0.0.1:{port}", "--static-route", f"{MODEL}={provider}"],
            env=env, stdout=subprocess.DEVNULL, stderr=(folder / "router.log").open("w"),
        )
        processes.append(router)
        through_url = f"http://127.0.0.1:{port}"
        wait_ready(f"{through_url}/ready", router)

        messages = [{"role": "user", "content": "Say hi."}]
        direct = (f"{provider}/v1/chat/completions", {"model": "gpt-4o-mini", "messages": messages, "max_tokens": 16})
        through = (f"{through_url}/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 16})
        wrk(*through, connections=4, seconds=2, threads=1)
        wrk(*direct, connections=4, seconds=1, threads=1)

        results: dict[str, list[dict]] = {"latency direct": [], "latency router": [], "concurrent direct": [],
                                          "concurrent router": []}
        for round_index in range(arguments.rounds):
            for name, (url, body), connections, threads in (
                ("latency direct", direct, 1, 1),
                ("latency router", through, 1, 1),
                ("concurrent direct", direct, arguments.connections, 2),
                ("concurrent router", through, arguments.connections, 2),
            ):
                result = wrk(url, body, connections, arguments.seconds, threads)
                results[name].append(result)
                harness.print_round(round_index, name, result)
        router_memory = rss_kib(router.pid)
        if router.poll() is not None:
            raise RuntimeError(f"nstream-router exited with {router.returncode}")
    finally:
        harness.stop(processes, 10)
    load_after = os.getloadavg()

    def median(name: str, key: str) -> float:
        return harness.median(results, name, key)

    def added(kind: str) -> dict[str, float]:
        return harness.added(results, f"{kind} router", f"{kind} direct", ("p50_us", "p99_us", "mean_us"))

    single, concurrent = added("latency"), added("concurrent")
    lines = [
        f"- **Machine**: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after",
        f"- **Date**: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- **Command**: `python3 benches/router/bench.py --router-bin {arguments.router_bin}` "
        f"(rounds {arguments.rounds}, {arguments.seconds} s per scenario, {arguments.connections} connections)",
        "",
        *harness.scenario_table(results),
        "",
        f"Added by the router, one connection (median over rounds of router minus direct): p50 "
        f"**{single['p50_us']:.0f} us**, p99 {single['p99_us']:.0f} us, mean {single['mean_us']:.0f} us. "
        f"At {arguments.connections} connections: p50 {concurrent['p50_us']:.0f} us, p99 {concurrent['p99_us']:.0f} us; "
        f"requests/s through the router {median('concurrent router', 'rps') / median('concurrent direct', 'rps'):.0%} "
        f"of direct. Router RSS after the runs: {router_memory.get('VmRSS', 0) / 1024:.1f} MiB.",
    ]
    report = "\n".join(lines)
    print(report)
    if arguments.json:
        arguments.json.write_text(json.dumps({"results": results, "added_single": single,
                                               "added_concurrent": concurrent, "load": [load_before, load_after]},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
