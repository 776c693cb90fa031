#!/usr/bin/env python3
"""SVG bar charts of benchmark results, drawn from the results files alone (standard library only).

    python3 benches/chart.py RESULTS [RESULTS...] [--out FILE.svg]   # one chart
    python3 benches/chart.py --all            # a chart for every results file in benches/*/results/
    python3 benches/chart.py --all --check    # exit 1 when a committed chart is missing or stale

A chart is written next to its results file (`2026-12-06.json` -> `2026-12-06.svg`); the fine-tuning
bench writes one file per method, so its chart gathers the files of one date (`2026-12-06.svg`).
Every bench script calls `write_chart` at its end, so charts can also be redrawn from committed
results without rerunning anything. What a chart shows depends on the bench (the folder name):
nstream next to its peer, and at the right of each group how many times better ours is (> 1: ours
better; for latencies and memory that is peer / ours). The style follows `nstream eval`'s chart.svg.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

BENCHES = Path(__file__).resolve().parent

# The palette of `nstream eval`'s chart: ours blue, the peer grey, a variant of ours orange.
OURS = "#4e79a7"
PEER = "#bab0ac"
VARIANT = "#f28e2b"
EXTRA = "#59a14f"

WIDTH = 760
RIGHT = 170  # value labels and the ratio column live here
BAR = 16
GROUP_GAP = 10
PANEL_GAP = 18


@dataclass
class Group:
    """Bars drawn together: one per series, with an optional note at the right (the ratio)."""

    label: str
    bars: list[tuple[str, float]]
    note: str = ""


@dataclass
class Panel:
    """Groups sharing one axis; the title says the unit and which way is better."""

    title: str
    groups: list[Group]
    decimals: int | None = None  # fixed decimals for values (recall: 3), else `number`


@dataclass
class Chart:
    """A title, a subtitle (machine, date), the series' colours and the panels."""

    title: str
    subtitle: str
    series: list[tuple[str, str]]
    panels: list[Panel] = field(default_factory=list)


def number(value: float) -> str:
    """A value as the docs' tables print it: thousands separated, three significant-ish digits."""
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}" if value else "0"


def times(ratio: float) -> str:
    """A ratio annotation such as `1.86×`."""
    return f"{ratio:.2f}×"


def nice_step(maximum: float) -> float:
    """A tick step of 1, 2, 2.5 or 5 times a power of ten giving about four ticks up to `maximum`."""
    if maximum <= 0:
        return 1.0
    raw = maximum / 4
    power = 10.0 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if factor * power >= raw:
            return factor * power
    return 10 * power


def tick_label(value: float, step: float) -> str:
    """An axis label with as many decimals as the step needs (0, 2.5, 5, 7.5 or 0, 100, 200)."""
    decimals = next((digits for digits in range(4) if abs(round(step, digits) - step) < 1e-9), 3)
    return f"{value:,.{decimals}f}"


def legend_rows(series: list[tuple[str, str]]) -> list[list[tuple[float, str, str]]]:
    """The legend's entries placed left to right, wrapping to a new row when the width runs out."""
    rows: list[list[tuple[float, str, str]]] = [[]]
    x = 10.0
    for name, colour in series:
        width = 17 + 7.2 * len(name) + 18
        if rows[-1] and x + width > WIDTH:
            rows.append([])
            x = 10.0
        rows[-1].append((x, name, colour))
        x += width
    return rows


def render(chart: Chart) -> str:
    """The chart as an SVG document (deterministic: the same results give the same bytes)."""
    labels = [group.label for panel in chart.panels for group in panel.groups]
    left = max(120.0, 18 + 7.0 * max((len(label) for label in labels), default=0))
    plot = WIDTH - left - RIGHT
    colours = dict(chart.series)
    parts: list[str] = []
    legend = legend_rows(chart.series)
    for index, row in enumerate(legend):
        top = 53 + 18 * index
        for x, name, colour in row:
            parts.append(
                f'<rect x="{x:.1f}" y="{top}" width="12" height="12" fill="{colour}"/>'
                f'<text x="{x + 17:.1f}" y="{top + 10.5}">{escape(name)}</text>'
            )
    y = 70.0 + 18 * len(legend)
    for panel in chart.panels:
        values = [value for group in panel.groups for _, value in group.bars]
        step = nice_step(max(values, default=0))
        ticks = int(max(values, default=0) / step + 0.999999) or 1
        top = step * ticks
        label = number if panel.decimals is None else (lambda value, digits=panel.decimals: f"{value:.{digits}f}")
        parts.append(f'<text x="10" y="{y + 4:.1f}" font-weight="bold">{escape(panel.title)}</text>')
        y += 14
        first = y
        rows: list[str] = []
        for group in panel.groups:
            height = len(group.bars) * BAR
            rows.append(
                f'<text x="{left - 8:.1f}" y="{y + height / 2 + 4.5:.1f}" text-anchor="end">{escape(group.label)}</text>'
            )
            for series, value in group.bars:
                width = plot * max(value, 0) / top
                rows.append(
                    f'<rect x="{left:.1f}" y="{y:.1f}" width="{width:.1f}" height="{BAR - 2}" fill="{colours[series]}">'
                    f"<title>{escape(series)}: {label(value)}</title></rect>"
                    f'<text x="{left + width + 5:.1f}" y="{y + BAR - 4.5:.1f}" font-size="11">{label(value)}</text>'
                )
                y += BAR
            if group.note:
                rows.append(
                    f'<text x="{WIDTH - 10}" y="{y - height / 2 + 4.5:.1f}" text-anchor="end" '
                    f'font-weight="bold">{escape(group.note)}</text>'
                )
            y += GROUP_GAP
        last = y - GROUP_GAP + 2
        for tick in range(ticks + 1):
            x = left + plot * tick / ticks
            parts.append(
                f'<line x1="{x:.1f}" y1="{first - 2:.1f}" x2="{x:.1f}" y2="{last:.1f}" stroke="#ddd"/>'
                f'<text x="{x:.1f}" y="{last + 13:.1f}" text-anchor="middle" fill="#555" font-size="11">'
                f"{tick_label(step * tick, step)}</text>"
            )
        parts.extend(rows)
        y = last + 13 + PANEL_GAP
    height = int(y)
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="13">\n'
        '<rect width="100%" height="100%" fill="white"/>\n'
        f'<text x="10" y="24" font-size="15" font-weight="bold">{escape(chart.title)}</text>\n'
        f'<text x="10" y="42" fill="#555" font-size="12">{escape(chart.subtitle)}</text>\n'
    )
    return head + "\n".join(parts) + "\n</svg>\n"


# --- one builder per bench -------------------------------------------------------------------------


def embeddings(data: dict) -> Chart:
    """nstream-server vs sentence-transformers over the same HTTP harness (benches/embeddings)."""
    ours, peer = "nstream-server", "sentence-transformers " + data["versions"]["sentence_transformers"]
    machine = data["machine"]
    chart = Chart(
        "EmbeddingModel over HTTP: nstream-server vs sentence-transformers",
        f"{data['date_utc']}, {machine['cpu_model']}, {machine['cpus']} cores, "
        f"corpus of {data['corpus']['sentences']:,} sentences",
        [(ours, OURS), (peer, PEER)],
    )
    groups = []
    for row in data["http"].values():
        peers = [row[key]["sentences_per_s"] for key in ("peer_lock", "peer_free") if key in row]
        first = row["ours"]
        clients = "client" if first["clients"] == 1 else "clients"
        groups.append(
            Group(
                f"{first['per_request']}/request, {first['clients']} {clients}",
                [(ours, first["sentences_per_s"]), (peer, max(peers))],
                times(first["sentences_per_s"] / max(peers)),
            )
        )
    chart.panels.append(Panel("Sentences/s, higher is better (peer: its better server); × ours / peer", groups))
    servers = data["servers"]
    ours_server = servers["nstream-server"]
    peer_servers = {name: server for name, server in servers.items() if name != "nstream-server"}
    best_start = min(server["cold_start_median_s"] for server in peer_servers.values())
    best_rss = min(server["memory"]["VmRSS"] for server in peer_servers.values())
    chart.panels.append(
        Panel(
            "Cold start to /ready, s, lower is better; × peer / ours",
            [Group(name.replace("sentence-transformers server", "peer server"),
                   [(ours if name == "nstream-server" else peer, server["cold_start_median_s"])],
                   times(best_start / ours_server["cold_start_median_s"]) if name == "nstream-server" else "")
             for name, server in servers.items()],
        )
    )
    chart.panels.append(
        Panel(
            "Memory after load (VmRSS), MiB, lower is better; × peer / ours",
            [Group(name.replace("sentence-transformers server", "peer server"),
                   [(ours if name == "nstream-server" else peer, server["memory"]["VmRSS"] / 1024)],
                   times(best_rss / ours_server["memory"]["VmRSS"]) if name == "nstream-server" else "")
             for name, server in servers.items()],
        )
    )
    return chart


def gateway(data: dict) -> Chart:
    """A chat request sent directly to a provider and through a MegaModel (benches/gateway)."""
    direct, through = "direct to the provider", "through nstream-server"
    results = data["results"]

    def median(scenario: str, key: str) -> float:
        return statistics.median(sample[key] for sample in results[scenario])

    chart = Chart(
        "MegaModel gateway overhead: the same request direct and through nstream-server",
        f"wrk, a fake OpenAI provider with a fixed answer, medians of {len(results['latency direct'])} rounds",
        [(direct, PEER), (through, OURS)],
    )
    latency = []
    for key, label in (("p50_us", "p50"), ("p90_us", "p90"), ("p99_us", "p99"), ("p999_us", "p99.9")):
        latency.append(
            Group(label, [(direct, median("latency direct", key)), (through, median("latency gateway", key))],
                  f"+{data['added'][key]:.0f} µs")
        )
    chart.panels.append(Panel("One connection: latency, µs, lower is better; at right: what the gateway adds", latency))
    share = median("throughput gateway", "rps") / median("throughput direct", "rps")
    chart.panels.append(
        Panel(
            "Requests/s, higher is better; × gateway / direct",
            [Group("1 connection", [(direct, median("latency direct", "rps")),
                                    (through, median("latency gateway", "rps"))],
                   times(median("latency gateway", "rps") / median("latency direct", "rps"))),
             Group("32 connections", [(direct, median("throughput direct", "rps")),
                                      (through, median("throughput gateway", "rps"))], times(share))],
        )
    )
    chart.panels.append(
        Panel(
            "nstream-server memory (VmRSS), MiB, over the requests served",
            [Group(f"{label.split(' (')[0]} ({served:,})", [(through, memory["VmRSS"] / 1024)])
             for label, served, memory in data["memory"]],
        )
    )
    return chart


def llm(data: dict) -> Chart:
    """nstream-server vs llama-server on the CPU, streamed completions (benches/llm/bench.py)."""
    summary = data["summary"]
    servers: list[str] = []
    streams: list[int] = []
    for key in summary:
        server, count = key.rsplit("@", 1)
        if server not in servers:
            servers.append(server)
        if int(count) not in streams:
            streams.append(int(count))
    peer = "llama-server"
    colours = [OURS, VARIANT, EXTRA]
    series = []
    for server in servers:
        series.append((server, PEER if server == peer else colours[len([s for s in series if s[1] != PEER])]))
    # The bench's short names, spelled out for readers of the chart alone.
    names = {"ours": "nstream-server (default)", "ours-q8_0": "nstream-server --requantize q8-0",
             "ours@portable": "nstream-server, NSTREAM_CPU_LEVEL=portable"}
    series = [(names.get(server, server), colour) for server, colour in series]
    meta = data["meta"]
    chart = Chart(
        "BaseModel on the CPU: nstream-server vs llama-server (streamed /v1/completions)",
        f"{meta['date_utc']}, {meta['machine'].get('Model name', '')}, {meta['machine'].get('nproc', '')} cores, "
        f"{meta['settings']['max_tokens']} tokens per request",
        series,
    )
    for key, title, lower in (
        ("aggregate_tps", "Aggregate tokens/s, higher is better; × ours / llama-server", False),
        ("decode_tps", "Decode tokens/s per stream, higher is better; × ours / llama-server", False),
        ("ttft_ms", "Time to first token (median), ms, lower is better; × llama-server / ours", True),
        ("rss_mib", "Peak RSS, MiB, lower is better; × llama-server / ours", True),
    ):
        groups = []
        for count in streams:
            values = {server: summary[f"{server}@{count}"][key] for server in servers if f"{server}@{count}" in summary}
            bars = [(names.get(server, server), value) for server, value in values.items()]
            note = ""
            if "ours" in values and peer in values:
                ratio = values[peer] / values["ours"] if lower else values["ours"] / values[peer]
                note = times(ratio)
            groups.append(Group(f"{count} stream{'s' if count > 1 else ''}", bars, note))
        chart.panels.append(Panel(title, groups))
    return chart


def llm_gpu(data: dict) -> Chart:
    """nstream-server vs transformers `generate` on a GPU (benches/llm/gpu.py)."""
    meta = data["meta"]
    ours, peer = "nstream-server", f"transformers {meta['transformers']} generate"
    rows = {(row["server"], row["streams"]): row for row in data["rows"] if "streams" in row}
    streams = sorted({count for _, count in rows})
    chart = Chart(
        f"BaseModel on a GPU: nstream-server vs transformers ({meta['checkpoint']['shape']} shape, bf16)",
        f"{meta['date']}, {meta['gpu']}, {meta['prompt_tokens']}-token prompts, {meta['max_tokens']} tokens generated",
        [(ours, OURS), (peer, PEER)],
    )
    for key, title in (
        ("decode_tps_per_stream", "Decode tokens/s per stream, higher is better; × ours / transformers"),
        ("aggregate_tps", "Aggregate tokens/s, higher is better; × ours / transformers"),
    ):
        groups = []
        for count in streams:
            ours_row, peer_row = rows.get(("nstream", count)), rows.get(("transformers", count))
            bars = []
            if ours_row:
                bars.append((ours, ours_row[key]))
            if peer_row:
                bars.append((peer, peer_row[key]))
            note = times(ours_row[key] / peer_row[key]) if ours_row and peer_row else ""
            groups.append(Group(f"{count} stream{'s' if count > 1 else ''}", bars, note))
        chart.panels.append(Panel(title, groups))
    return chart


def adapters(data: dict) -> Chart:
    """One server, the bare base vs LoRA adapters on it (benches/adapters)."""
    base, adapter = "bare base model", "with LoRA adapters"
    median = data["median"]
    rank = data.get("args", {}).get("rank", "?")
    chart = Chart(
        "BaseModel LoRA adapters: tokens/s with adapters vs the bare base",
        f"SmolLM2-135M Q4_1, rank-{rank} adapters on every linear module, medians of "
        f"{data.get('args', {}).get('rounds', '?')} rounds",
        [(base, PEER), (adapter, OURS)],
    )
    chart.panels.append(
        Panel(
            "Tokens/s, higher is better; × adapter / base",
            [Group("1 stream", [(base, median["1 stream, base"]), (adapter, median["1 stream, adapter"])],
                   times(data["single_ratio"])),
             Group("16 streams (4 adapters)", [(base, median["16 streams, base"]),
                                               (adapter, median["16 streams, 4 adapters"])],
                   times(data["multi_ratio"]))],
        )
    )
    return chart


def finetune(runs: list[dict]) -> Chart:
    """`nstream finetune` vs PyTorch + peft, one results file per method (benches/finetune)."""
    ours, peer = "nstream finetune", f"PyTorch {runs[0]['torch'].split('+')[0]} + peft"
    order = {"lora": 0, "full": 1}
    runs = sorted(runs, key=lambda run: order.get(run["method"], 2))
    first = runs[0]
    chart = Chart(
        "Fine-tuning SmolLM2-135M on the CPU: nstream finetune vs PyTorch + peft",
        f"batch {first['batch']} × {first['seq_len']} tokens, {first['threads']} threads, "
        f"{first['steps']} steps (the first dropped)",
        [(ours, OURS), (peer, PEER)],
    )
    groups = []
    for run in runs:
        label = f"LoRA r={run['rank']}" if run["method"] == "lora" else run["method"]
        groups.append(Group(label, [(ours, run["nstream_tokens_per_second"]), (peer, run["torch_tokens_per_second"])],
                            times(run["ratio"])))
    chart.panels.append(Panel("Training tokens/s, higher is better; × ours / PyTorch", groups))
    return chart


def kb(rows: list[dict]) -> Chart:
    """Knowledge-base ingest and query: our stores vs Chroma (benches/kb)."""
    embedded, pgvector, chroma = "nstream (embedded store)", "nstream (pgvector)", "Chroma"
    has_pg = any("pgvector_chunks_per_s" in row for row in rows)
    series = [(embedded, OURS)] + ([(pgvector, VARIANT)] if has_pg else []) + [(chroma, PEER)]
    chart = Chart("KnowledgeBase: ingest and query vs Chroma (all-MiniLM-L6-v2, CPU)",
                  "the same chunks embedded by each side; query p50 includes embedding the query", series)

    def bars(row: dict, ours_key: str, pg_key: str, chroma_key: str) -> list[tuple[str, float]]:
        found = [(embedded, row[ours_key])]
        if pg_key in row:
            found.append((pgvector, row[pg_key]))
        return found + [(chroma, row[chroma_key])]

    label = lambda row: f"{row['chunks']:,} chunks"  # noqa: E731
    chart.panels.append(Panel("Ingest, chunks/s, higher is better; × ours / Chroma", [
        Group(label(row), bars(row, "nstream_chunks_per_s", "pgvector_chunks_per_s", "chroma_chunks_per_s"),
              times(row["nstream_chunks_per_s"] / row["chroma_chunks_per_s"])) for row in rows]))
    chart.panels.append(Panel("Query p50, ms, lower is better; × Chroma / ours", [
        Group(label(row), bars(row, "nstream_p50_ms", "pgvector_p50_ms", "chroma_p50_ms"),
              times(row["chroma_p50_ms"] / row["nstream_p50_ms"])) for row in rows]))
    chart.panels.append(Panel("Recall@10 against exact search, higher is better", [
        Group(label(row), bars(row, "nstream_recall_at_10", "pgvector_recall_at_10", "chroma_recall_at_10"))
        for row in rows], decimals=3))
    return chart


ANN_LINE = re.compile(
    r"^(?P<name>\S+)\s+build\s+(?P<build>[\d.]+) s\s+query p50\s+(?P<p50>[\d.]+) ms\s+p99\s+(?P<p99>[\d.]+) ms"
    r"\s+recall@10\s+(?P<recall>[\d.]+)$"
)


def kb_ann(text: str) -> Chart:
    """The approximate-nearest-neighbour candidates against exact search (benches/kb-ann, text output)."""
    lines = text.strip().splitlines()
    indexes = []
    for line in lines[1:]:
        match = ANN_LINE.match(line.strip())
        if not match:
            raise ValueError(f"kb-ann results: line {line!r} is not `NAME build S s query p50 MS ms p99 MS ms recall@10 R`")
        indexes.append((match["name"], {key: float(match[key]) for key in ("build", "p50", "p99", "recall")}))
    palette = {"hannoy": OURS, "exact": PEER}
    series = [(name, palette.get(name, VARIANT)) for name, _ in indexes]
    chart = Chart("Vector index candidates: hannoy (ours) and usearch vs exact search", lines[0], series)
    for key, title in (("p50", "Query p50, ms, lower is better"), ("recall", "Recall@10, higher is better"),
                       ("build", "Build, s, lower is better")):
        chart.panels.append(Panel(title, [Group(name, [(name, values[key])]) for name, values in indexes],
                                  decimals=4 if key == "recall" else None))
    return chart


def soak(data: dict) -> Chart:
    """nstream-server's memory and latency through a soak, per five minutes, and its burst (benches/soak)."""
    steady, memory = data["steady"], data["memory"]
    span = 300.0
    spans = max(1, math.ceil(max(at for *_, at in steady) / span))
    labels = [f"{index * 5}-{index * 5 + 5} min" for index in range(spans)]
    kinds = [("chat-stream", OURS), ("chat", VARIANT), ("embeddings", EXTRA), ("gateway", PEER)]
    chart = Chart(
        "Soak: nstream-server under mixed traffic at a fixed rate, then a burst at 10x",
        f"{len(steady):,} requests in the steady phase; checks: "
        + ", ".join(f"{check} {'pass' if passed else 'FAIL'}" for check, passed in data["verdict"].items()),
        [(kind, colour) for kind, colour in kinds] + [("VmRSS", "#76b7b2"), ("answers in the burst", "#e15759")],
    )
    rss = []
    for index, label in enumerate(labels):
        samples = [kib for at, kib in memory if index * span <= at < (index + 1) * span]
        if samples:
            rss.append(Group(label, [("VmRSS", max(samples) / 1024)]))
    chart.panels.append(Panel("nstream-server memory (VmRSS), MiB, highest sample in each five minutes", rss))
    latency = []
    for index, label in enumerate(labels):
        bars = []
        for kind, _ in kinds:
            seconds = sorted(latency for name, _, latency, _, at in steady
                             if name == kind and index * span <= at < (index + 1) * span)
            if seconds:
                bars.append((kind, seconds[min(len(seconds) - 1, math.ceil(0.99 * len(seconds)) - 1)]))
        latency.append(Group(label, bars))
    chart.panels.append(Panel("p99 latency per kind, s, lower is better", latency, decimals=2))
    statuses = sorted(data["burst_statuses"].items())
    chart.panels.append(Panel("Burst: answers by HTTP status (200 served, 429/503 refused with Retry-After)",
                              [Group(status, [("answers in the burst", count)]) for status, count in statuses], decimals=0))
    return chart


def build(paths: list[Path], bench: str | None = None) -> Chart:
    """The chart of one or more results files of one bench (default: the folder above `results/`)."""
    bench = bench or paths[0].resolve().parent.parent.name
    if bench == "kb-ann":
        return kb_ann(paths[0].read_text(encoding="utf-8"))
    loaded = [json.loads(path.read_text(encoding="utf-8")) for path in paths]
    if bench == "finetune":
        return finetune(loaded)
    if len(loaded) != 1:
        raise ValueError(f"{bench}: one results file per chart, got {len(paths)}")
    if bench == "llm":
        return llm_gpu(loaded[0]) if paths[0].name.startswith("gpu-") else llm(loaded[0])
    builders = {"embeddings": embeddings, "gateway": gateway, "adapters": adapters, "kb": kb, "soak": soak}
    if bench not in builders:
        raise ValueError(f"{paths[0]}: no chart for bench {bench!r} (expected one of {', '.join(BENCH_NAMES)})")
    return builders[bench](loaded[0])


BENCH_NAMES = ("adapters", "embeddings", "finetune", "gateway", "kb", "kb-ann", "llm", "soak")


def default_output(paths: list[Path], bench: str | None = None) -> Path:
    """`DATE.svg` next to the first file (fine-tuning: the date without the method suffix)."""
    first = paths[0]
    if (bench or first.resolve().parent.parent.name) == "finetune":
        date = re.match(r"\d{4}-\d{2}-\d{2}", first.stem)
        return first.with_name(f"{date[0] if date else first.stem}.svg")
    return first.with_suffix(".svg")


def write_chart(*paths: Path, out: Path | None = None, bench: str | None = None) -> Path:
    """Draws the chart of `paths` (one bench's results) to `out` or next to them; returns the SVG's path.

    `bench` names the bench when the results are not in `benches/BENCH/results/`.
    """
    paths_list = [Path(path) for path in paths]
    target = out or default_output(paths_list, bench)
    target.write_text(render(build(paths_list, bench)), encoding="utf-8")
    return target


def after_run(*paths: Path, bench: str | None = None) -> None:
    """What a bench script calls once its results are written: draws their chart.

    A chart that cannot be drawn is reported on standard error, not fatal: the measured results are
    already on disk and matter more than their picture (`benches/chart.py RESULTS` redraws it).
    """
    try:
        print(f"chart: wrote {write_chart(*paths, bench=bench)}", file=sys.stderr)
    except Exception as error:  # noqa: BLE001 - any failure here must not lose a finished run
        print(f"chart: could not draw {', '.join(map(str, paths))}: {error}", file=sys.stderr)


def jobs() -> list[tuple[list[Path], Path]]:
    """Every chart the committed results call for: (results files, SVG)."""
    found: list[tuple[list[Path], Path]] = []
    for results in sorted(BENCHES.glob("*/results")):
        files = sorted(path for path in results.iterdir() if path.suffix == ".json"
                       or (results.parent.name == "kb-ann" and path.suffix == ".txt"))
        if results.parent.name == "finetune":
            dates: dict[Path, list[Path]] = {}
            for path in files:
                dates.setdefault(default_output([path]), []).append(path)
            found.extend((paths, out) for out, paths in dates.items())
        else:
            found.extend(([path], default_output([path])) for path in files)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", type=Path, help="results files of one bench")
    parser.add_argument("--out", type=Path, help="the SVG to write (default: next to the first results file)")
    parser.add_argument("--bench", help="the bench (default: the folder above results/): " + ", ".join(BENCH_NAMES))
    parser.add_argument("--all", action="store_true", help="every results file under benches/*/results/")
    parser.add_argument("--check", action="store_true", help="with --all: write nothing, fail when a chart is stale")
    arguments = parser.parse_args()
    if arguments.all == bool(arguments.results):
        parser.error("give results files or --all (not both)")
    if arguments.bench and arguments.bench not in BENCH_NAMES:
        parser.error(f"--bench {arguments.bench!r}: expected one of {', '.join(BENCH_NAMES)}")
    if arguments.check and not arguments.all:
        parser.error("--check goes with --all")
    if not arguments.all:
        print(write_chart(*arguments.results, out=arguments.out, bench=arguments.bench))
        return 0
    stale = []
    for paths, out in jobs():
        svg = render(build(paths))
        if arguments.check:
            if not out.exists() or out.read_text(encoding="utf-8") != svg:
                stale.append(out)
        else:
            out.write_text(svg, encoding="utf-8")
            print(out)
    for out in stale:
        print(f"stale or missing: {out.relative_to(BENCHES.parent)} "
              "(run `python3 benches/chart.py --all` and commit it)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
