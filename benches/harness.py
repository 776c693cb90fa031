"""What the HTTP benchmarks share (benches/gateway, benches/router, benches/soak).

The fake OpenAI provider (tests/python/fake_provider.py) started on a free port, the environment
of a benchmarked binary, readiness, VmRSS from /proc, wrk with exact percentiles
(benches/gateway/wrk-post.lua), the stop of the processes a run started, and the scenario table of
the direct-versus-through benchmarks. Stdlib only; the scripts import it by path, as they do
benches/chart.py:

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import harness
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BENCHES = Path(__file__).resolve().parent
ROOT = BENCHES.parent
FAKE = ROOT / "tests" / "python" / "fake_provider.py"
PROVIDER_KEY = "sk-fake-openai"  # fake_provider.py's default OpenAI key
WRK_SCRIPT = BENCHES / "gateway" / "wrk-post.lua"


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    """Polls `url` until it answers 200; raises if `process` exits or `timeout` seconds pass."""
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
    """VmRSS and VmHWM of a process, in KiB (from /proc/PID/status)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def wrk(url: str, body: dict, connections: int, seconds: int, threads: int) -> dict:
    """POSTs `body` to `url` with wrk for `seconds` and returns wrk-post.lua's figures (exact
    percentiles in microseconds, requests, errors) plus `rps`; raises on any error or non-2xx."""
    env = dict(os.environ, BODY=json.dumps(body), AUTH=f"Bearer {PROVIDER_KEY}")
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "10s",
               "-s", str(WRK_SCRIPT), url]
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    line = next((line for line in output.splitlines() if line.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"no WRKJSON line from {command}:\n{output}")
    result = json.loads(line[len("WRKJSON "):])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    if result["socket_errors"] or result["non_2xx"]:
        raise RuntimeError(f"errors in {command}: {result}")
    return result


def start_fake_provider(processes: list[subprocess.Popen], *arguments: str) -> str:
    """Starts the fake provider on a free port with `arguments` (after `--port 0 --no-log`), adds
    it to `processes` (so that `stop` ends it even if it fails to start) and returns its base URL."""
    fake = subprocess.Popen([sys.executable, str(FAKE), "--port", "0", "--no-log", *arguments],
                            stdout=subprocess.PIPE, text=True)
    processes.append(fake)
    first = fake.stdout.readline() if fake.stdout else ""
    if "fake provider on " not in first:
        raise RuntimeError(f"the fake provider did not start: {first!r}")
    return first.split("fake provider on ", 1)[1].strip()


def binary_environment(**overrides: str) -> dict[str, str]:
    """The environment of a benchmarked nstream binary: this process's without any `NSTREAM_*`
    variable (so no setting of the caller's leaks into the run), plus `overrides`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("NSTREAM_")}
    env.update(overrides)
    return env


def stop(processes: list[subprocess.Popen], timeout: float) -> None:
    """Stops the processes still running, the last started first: SIGTERM, then SIGKILL after
    `timeout` seconds."""
    for process in reversed(processes):
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def print_round(round_index: int, name: str, result: dict) -> None:
    """One measured scenario of a round, on standard error (progress; the report is on stdout)."""
    print(f"round {round_index + 1} {name}: p50 {result['p50_us']} us, p99 {result['p99_us']} us, "
          f"{result['rps']:.0f} req/s", file=sys.stderr)


def median(results: dict[str, list[dict]], name: str, key: str) -> float:
    """The median over the rounds of scenario `name`'s figure `key`."""
    return statistics.median(result[key] for result in results[name])


def added(results: dict[str, list[dict]], through: str, direct: str, keys: tuple[str, ...]) -> dict[str, float]:
    """What the hop adds: per figure of `keys`, the median over rounds of scenario `through` minus
    scenario `direct` of the same round."""
    rows = list(zip(results[through], results[direct]))
    return {key: statistics.median(hop[key] - plain[key] for hop, plain in rows) for key in keys}


def scenario_table(results: dict[str, list[dict]]) -> list[str]:
    """The markdown table of the scenarios' medians: p50, p90, p99, p99.9 and requests/s."""
    lines = [
        "| scenario | p50 | p90 | p99 | p99.9 | requests/s |",
        "|---|---|---|---|---|---|",
    ]
    for name in results:
        lines.append(
            f"| {name} | {median(results, name, 'p50_us'):.0f} us | {median(results, name, 'p90_us'):.0f} us | "
            f"{median(results, name, 'p99_us'):.0f} us | {median(results, name, 'p999_us'):.0f} us | "
            f"{median(results, name, 'rps'):.0f} |"
        )
    return lines
