#!/usr/bin/env python3
"""Draws the workspace's crate dependency graph as SVG, from `cargo metadata` (so it cannot drift).

    python3 scripts/crate-graph.py            # writes docs/img/crates.svg
    python3 scripts/crate-graph.py --check    # exit 1 when docs/img/crates.svg is not current
    python3 scripts/crate-graph.py --list     # every crate and its direct workspace dependencies

Boxes are the workspace's packages (binaries at the top, leaves at the bottom: a crate sits one row
above its highest dependency); an arrow points from a crate to one it depends on (normal
dependencies; dev-dependencies and the test-only `nstream-e2e` package are left out). Dark arrows
are the dependencies that are not implied through another crate (the transitive reduction); the
light dashed ones are direct dependencies that are also reached through another crate.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "img" / "crates.svg"
EXCLUDED = {"nstream-e2e"}  # the workspace's integration tests, not a part of the product

BOX_WIDTH = 168
BOX_HEIGHT = 40
COLUMN_GAP = 14
ROW_GAP = 62
MARGIN = 20


def workspace() -> dict[str, dict]:
    """Package name -> {path, binary, deps: {name: optional}} for the workspace's packages."""
    text = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    metadata = json.loads(text)
    names = {package["name"] for package in metadata["packages"]} - EXCLUDED
    crates = {}
    for package in metadata["packages"]:
        if package["name"] in EXCLUDED:
            continue
        deps = {}
        for dependency in package["dependencies"]:
            if dependency["name"] in names and dependency["kind"] in (None, "normal"):
                deps[dependency["name"]] = deps.get(dependency["name"], True) and bool(dependency.get("optional"))
        path = Path(package["manifest_path"]).parent.relative_to(ROOT).as_posix()
        binary = any("bin" in target["kind"] for target in package["targets"])
        crates[package["name"]] = {"path": path, "binary": binary, "deps": deps}
    return crates


def reachable(crates: dict[str, dict], start: str) -> set[str]:
    """Every crate `start` depends on, directly or not."""
    seen: set[str] = set()
    stack = list(crates[start]["deps"])
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(crates[name]["deps"])
    return seen


def implied(crates: dict[str, dict], name: str, dependency: str) -> bool:
    """Whether `name` reaches `dependency` through another of its direct dependencies."""
    return any(dependency in reachable(crates, other) for other in crates[name]["deps"] if other != dependency)


def rows(crates: dict[str, dict]) -> list[list[str]]:
    """Crates by row, top (binaries) first, ordered within a row to keep arrows short."""
    level: dict[str, int] = {}

    def height(name: str) -> int:
        if name not in level:
            level[name] = 1 + max((height(dependency) for dependency in crates[name]["deps"]), default=-1)
        return level[name]

    for name in crates:
        height(name)
    grouped = [sorted(name for name in crates if level[name] == row) for row in range(max(level.values()) + 1)]
    grouped.reverse()  # top row first
    # A few barycentre passes (up, then down) ordering each row by where its neighbours sit in the
    # next row; only arrows that are not implied count, as those are the ones drawn dark.
    direct = {name: [dependency for dependency in crates[name]["deps"] if not implied(crates, name, dependency)]
              for name in crates}
    for _ in range(4):
        for index in range(len(grouped) - 2, -1, -1):
            below = {name: position for position, name in enumerate(grouped[index + 1])}
            grouped[index].sort(key=lambda name: centre([below[dependency] for dependency in direct[name]
                                                         if dependency in below], name))
        for index in range(1, len(grouped)):
            above = {name: position for position, name in enumerate(grouped[index - 1])}
            grouped[index].sort(key=lambda name: centre([above[user] for user in above if name in direct[user]], name))
    return grouped


def centre(positions: list[int], name: str) -> tuple[float, str]:
    """A sort key: the mean position of the neighbours (the name breaks ties, for stable output)."""
    return (sum(positions) / len(positions) if positions else 0.0, name)


def render(crates: dict[str, dict]) -> str:
    """The graph as an SVG document (the same metadata gives the same bytes)."""
    grouped = rows(crates)
    widest = max(len(row) for row in grouped)
    width = 2 * MARGIN + widest * BOX_WIDTH + (widest - 1) * COLUMN_GAP
    top = 56
    height = top + len(grouped) * (BOX_HEIGHT + ROW_GAP) - ROW_GAP + MARGIN + 22
    place: dict[str, tuple[float, float]] = {}
    for row_index, row in enumerate(grouped):
        row_width = len(row) * BOX_WIDTH + (len(row) - 1) * COLUMN_GAP
        x = (width - row_width) / 2
        for name in row:
            place[name] = (x, top + row_index * (BOX_HEIGHT + ROW_GAP))
            x += BOX_WIDTH + COLUMN_GAP
    edges_light, edges_dark = [], []
    for name in sorted(crates):
        for dependency in sorted(crates[name]["deps"]):
            (x1, y1), (x2, y2) = place[name], place[dependency]
            line = (f'<line x1="{x1 + BOX_WIDTH / 2:.1f}" y1="{y1 + BOX_HEIGHT:.1f}" '
                    f'x2="{x2 + BOX_WIDTH / 2:.1f}" y2="{y2:.1f}"')
            if implied(crates, name, dependency):
                edges_light.append(f'{line} stroke="#d4d4d4" stroke-dasharray="4 3" marker-end="url(#light)"/>')
            else:
                dash = ' stroke-dasharray="6 3"' if crates[name]["deps"][dependency] else ""
                edges_dark.append(f'{line} stroke="#555"{dash} marker-end="url(#dark)"/>')
    boxes = []
    for name in sorted(crates):
        x, y = place[name]
        crate = crates[name]
        fill, stroke = ("#dce6f0", "#4e79a7") if crate["binary"] else ("#ffffff", "#888")
        boxes.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{BOX_WIDTH}" height="{BOX_HEIGHT}" rx="5" fill="{fill}" '
            f'stroke="{stroke}"/>'
            f'<text x="{x + BOX_WIDTH / 2:.1f}" y="{y + 17:.1f}" text-anchor="middle" font-weight="bold">'
            f"{escape(name)}</text>"
            f'<text x="{x + BOX_WIDTH / 2:.1f}" y="{y + 32:.1f}" text-anchor="middle" fill="#666" '
            f'font-size="10">{escape(crate["path"])}</text>'
        )
    legend_y = height - 14
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">\n'
        "<defs>"
        '<marker id="dark" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto">'
        '<path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker>'
        '<marker id="light" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" orient="auto">'
        '<path d="M0,0 L10,5 L0,10 z" fill="#d4d4d4"/></marker>'
        "</defs>\n"
        '<rect width="100%" height="100%" fill="white"/>\n'
        f'<text x="{MARGIN}" y="24" font-size="15" font-weight="bold">nstream workspace: crate dependencies</text>\n'
        f'<text x="{MARGIN}" y="42" fill="#555">generated from `cargo metadata` by scripts/crate-graph.py; '
        "an arrow points to a dependency; blue: binaries</text>\n"
        + "\n".join(edges_light + edges_dark + boxes)
        + f'\n<line x1="{MARGIN}" y1="{legend_y - 4}" x2="{MARGIN + 30}" y2="{legend_y - 4}" stroke="#555" '
        'marker-end="url(#dark)"/>'
        f'<text x="{MARGIN + 38}" y="{legend_y}">depends on</text>'
        f'<line x1="{MARGIN + 130}" y1="{legend_y - 4}" x2="{MARGIN + 160}" y2="{legend_y - 4}" stroke="#d4d4d4" '
        'stroke-dasharray="4 3" marker-end="url(#light)"/>'
        f'<text x="{MARGIN + 168}" y="{legend_y}">depends on directly, and also through another crate</text>'
        "\n</svg>\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help=f"write nothing; fail when {OUTPUT.relative_to(ROOT)} is stale")
    parser.add_argument("--list", action="store_true", help="print each crate's direct workspace dependencies")
    arguments = parser.parse_args()
    crates = workspace()
    if arguments.list:
        for name in sorted(crates, key=lambda name: crates[name]["path"]):
            deps = ", ".join(
                dependency + (" (optional)" if optional else "") + (" (also implied)" if implied(crates, name, dependency) else "")
                for dependency, optional in sorted(crates[name]["deps"].items())
            )
            print(f"{name} ({crates[name]['path']}): {deps or '-'}")
        return 0
    svg = render(crates)
    if arguments.check:
        if not OUTPUT.exists() or OUTPUT.read_text(encoding="utf-8") != svg:
            print(f"{OUTPUT.relative_to(ROOT)} does not match `cargo metadata`: run `python3 scripts/crate-graph.py` "
                  "and commit it", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(svg, encoding="utf-8")
    print(OUTPUT.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
