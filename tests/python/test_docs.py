"""The documentation stands alone in a clone: every relative link and image resolves to a file of
the repository (no `../shared/...`), every `#anchor` to a heading, and the generated pictures (the
benchmark charts, the crate graph) match what they are drawn from.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
IMAGE_TAG = re.compile(r"<img\s[^>]*src=\"(?P<target>[^\"]+)\"")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def documents():
    """The Markdown a reader of the repository meets: the top-level files, docs/, the crates' READMEs."""
    found = [ROOT / name for name in ("README.md", "CONTRIBUTING.md", "CHANGELOG.md") if (ROOT / name).exists()]
    found += sorted((ROOT / "docs").rglob("*.md"))
    for folder in ("crates", "bins", "examples", "benches", "deploy", "tools"):
        found += sorted(path for path in (ROOT / folder).rglob("README.md") if "target" not in path.parts)
    return found


def prose(text):
    """The text without code blocks and code spans, where link syntax is an example, not a link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    """Every heading anchor of a Markdown file (GitHub numbers repeats: `name`, `name-1`...)."""
    seen = {}
    result = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


def problems_of(path):
    """Each link of `path` that does not resolve inside the repository, as `file: target: why`."""
    text = prose(path.read_text(encoding="utf-8"))
    targets = [match.group("target") for match in LINK.finditer(text)]
    targets += [match.group("target") for match in IMAGE_TAG.finditer(text)]
    found = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... leave the repository on purpose
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}: {target}"
        if ROOT not in resolved.parents and resolved != ROOT:
            found.append(f"{where}: points outside the repository")
        elif not resolved.exists():
            found.append(f"{where}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            found.append(f"{where}: no heading with anchor #{anchor} in {resolved.relative_to(ROOT)}")
    return found


def test_every_documentation_link_resolves_inside_the_repository():
    files = documents()
    assert ROOT / "README.md" in files and any(path.parent == ROOT / "docs" for path in files)
    problems = [problem for path in files for problem in problems_of(path)]
    assert not problems, "broken or outside links:\n" + "\n".join(problems)


def test_the_link_check_finds_what_it_must(tmp_path, monkeypatch):
    # The checker itself, on a document with one good and three bad links, so it cannot pass vacuously.
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A title: here\n\ntext\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md#a-title-here) [gone](docs/b.md) [shared](../shared/x.md) "
        "[anchor](docs/a.md#nope) `[code](not/checked.md)` [web](https://example.com)\n"
    )
    problems = problems_of(page)
    assert len(problems) == 3, problems
    assert any("docs/b.md: no such file" in problem for problem in problems)
    assert any("../shared/x.md: points outside the repository" in problem for problem in problems)
    assert any("#nope" in problem for problem in problems)


def test_benchmark_charts_match_the_committed_results():
    result = subprocess.run([sys.executable, str(ROOT / "benches" / "chart.py"), "--all", "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_chart_shows_the_results_it_is_drawn_from(tmp_path):
    # A fine-tuning results pair with known figures: the bars carry them and the ratio is annotated.
    results = tmp_path / "finetune" / "results"
    results.mkdir(parents=True)
    for method, ours, torch in (("lora", 90.0, 100.0), ("full", 150.0, 60.0)):
        (results / f"2030-01-02-{method}.json").write_text(json.dumps({
            "method": method, "batch": 4, "seq_len": 128, "rank": 8, "threads": 2, "steps": 6,
            "nstream_tokens_per_second": ours, "torch_tokens_per_second": torch,
            "ratio": round(ours / torch, 3), "torch": "2.15.0+cpu"}))
    sys.path.insert(0, str(ROOT / "benches"))
    import chart

    out = chart.write_chart(*sorted(results.glob("*.json")))
    assert out == results / "2030-01-02.svg"
    svg = out.read_text()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    for text in ("90.0", "100.0", "150.0", "60.0", "0.90×", "2.50×", "LoRA r=8", "PyTorch 2.15.0 + peft"):
        assert text in svg, text
    # A results file it cannot read is refused with what was expected.
    broken = tmp_path / "kb-ann" / "results" / "2030-01-02.txt"
    broken.parent.mkdir(parents=True)
    broken.write_text("10 vectors of 4 dimensions, 2 queries, k = 10\nexact build fast\n")
    with pytest.raises(ValueError, match="recall@10"):
        chart.write_chart(broken)


def test_the_crate_graph_matches_cargo_metadata():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "crate-graph.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
