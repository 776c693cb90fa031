"""The distilled student served: `nstream distill` on a reduced demo loop (the local teacher of
examples/distill, SmolLM2 from the offline cache, a few training steps), then nstream-server on the
student.yaml it wrote, and the official `openai` client asking the student by name, with
`response_format` json_schema (strict): every answer parses and matches the task's schema.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import openai
import pytest

from test_openai_client import ROOT, RunningServer, built_binary, nstream_server

sys.path.insert(0, str(ROOT / "examples" / "distill"))
import orders  # noqa: E402

INPUTS = 20


@pytest.fixture(scope="module")
def student_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("distill")
    teacher = subprocess.Popen(
        [sys.executable, str(ROOT / "examples/distill/teacher.py"), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert teacher.stdout is not None
        port = teacher.stdout.readline().strip().rsplit(":", 1)[1].split("/")[0]
        demo = (ROOT / "examples/distill/distill.yaml").read_text()
        reduced = (
            demo.replace("http://127.0.0.1:8765/v1", f"http://127.0.0.1:{port}/v1")
            .replace("    epochs: 2\n", "    maxSteps: 2\n")
            .replace("    batchSize: 8\n", "    batchSize: 2\n")
            .replace("    maxTokens: 64\n", "    maxTokens: 40\n")
            .replace("  output: ../../runs/distill-orders\n", "  output: run\n")
        )
        assert "maxSteps: 2" in reduced and "output: run\n" in reduced, "the demo file changed"
        (folder / "distill.yaml").write_text(reduced)
        inputs = (ROOT / "examples/distill/orders.jsonl").read_text().splitlines()[:INPUTS]
        (folder / "orders.jsonl").write_text("\n".join(inputs) + "\n")
        env = dict(os.environ, HF_HUB_OFFLINE="1", RUST_LOG="warn")
        done = subprocess.run(
            [str(built_binary("nstream", "nstream", "NSTREAM_BIN")), "distill", "-f", "distill.yaml", "--progress", "quiet", "--no-reference-loss"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert done.returncode == 0, done.stderr
        yield folder / "run" / "student.yaml"
    finally:
        teacher.kill()
        teacher.wait()


@pytest.fixture(scope="module")
def server(student_file: Path) -> Iterator[RunningServer]:
    with nstream_server(model_file=student_file) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_the_written_student_is_served_by_name(client: openai.OpenAI) -> None:
    names = [model.id for model in client.models.list().data]
    assert "orders-student" in names, names


def test_the_student_answers_the_task_in_its_schema(client: openai.OpenAI) -> None:
    system = (
        "Extract the order as JSON: customer, product (singular), quantity (a number), city, express "
        "(true when fast delivery is asked for)."
    )
    for record in orders.make(3, seed=99):
        answer = client.chat.completions.create(
            model="orders-student",
            messages=[{"role": "system", "content": system}, {"role": "user", "content": record["text"]}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "order", "strict": True, "schema": orders.SCHEMA},
            },
            temperature=0,
            max_tokens=80,
        )
        content = answer.choices[0].message.content
        assert content, answer
        assert_matches_schema(json.loads(content))


def assert_matches_schema(value: object) -> None:
    """The task's schema (orders.SCHEMA): exactly its keys, each of its type."""
    assert isinstance(value, dict), value
    assert sorted(value) == sorted(orders.SCHEMA["required"]), value
    types = {"string": str, "integer": int, "boolean": bool}
    for key, rule in orders.SCHEMA["properties"].items():
        kind = types[rule["type"]]
        assert isinstance(value[key], kind) and (kind is bool or not isinstance(value[key], bool)), (key, value)
    assert value["quantity"] >= 1, value
