"""The official `openai` Python client against the real nstream-server.

Proves that an unmodified OpenAI SDK works against nstream: `client.embeddings.create` with single
and batched input, float and base64 encodings (including the SDK's default, where it asks for
base64 and decodes it itself), token-id input, usage counts; that vectors are 384-dimensional,
unit length, semantically sensible, and match the committed sentence-transformers reference
(tests/fixtures/embeddings, cosine >= 0.9999); and that errors map onto the SDK's exception classes
(NotFoundError for an unknown model, BadRequestError for bad input, AuthenticationError for a wrong
key).

The server binary is $NSTREAM_SERVER_BIN, else $CARGO_TARGET_DIR/debug/nstream-server (default
target dir ~/.cache/nstream-target, as scripts/test.sh uses). It is started on port 0 with
examples/quickstart.yaml; the port is read from its "serving on http://..." log line and /ready is
polled with a deadline. Run: `python -m pytest tests/python -q` (scripts/test.sh does).
"""

from __future__ import annotations

import array
import base64
import json
import math
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
FIXTURES = ROOT / "tests" / "fixtures" / "embeddings"
MODEL = "all-minilm-l6-v2"
DIMENSION = 384
API_KEY = "sk-python-e2e"
STARTUP_TIMEOUT_S = 180.0
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
SERVING_MARKER = "serving on http://"


def built_binary(name: str, package: str, variable: str) -> Path:
    """A debug binary of this workspace: `variable` names it, else the cargo target folder holds it."""
    explicit = os.environ.get(variable)
    if explicit:
        path = Path(explicit)
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        target = Path(os.environ.get("CARGO_TARGET_DIR", cache / "nstream-target"))
        path = target / "debug" / name
    if not path.is_file():
        pytest.fail(f"{path} does not exist: run `cargo build -p {package}` or set {variable}", pytrace=False)
    return path


def server_binary() -> Path:
    return built_binary("nstream-server", "nstream-server-bin", "NSTREAM_SERVER_BIN")


class RunningServer:
    """A child nstream-server and the log lines it printed."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[str] = []
        self.address: str | None = None
        self.announced = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if self.address is None and SERVING_MARKER in line:
                rest = line.split(SERVING_MARKER, 1)[1]
                self.address = rest.split("/", 1)[0]
                self.announced.set()
        self.announced.set()  # end of output: wake the waiter, which then sees no address

    @property
    def logs(self) -> str:
        return "\n".join(self.lines)

    @property
    def base_url(self) -> str:
        return f"http://{self.address}"

    def wait_ready(self) -> None:
        if not self.announced.wait(STARTUP_TIMEOUT_S) or self.address is None:
            raise RuntimeError(f"nstream-server did not start (exit {self.process.poll()}):\n{self.logs}")
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.base_url}/ready", timeout=5) as response:
                    if response.status == 200:
                        return
                    last = f"status {response.status}"
            except (urllib.error.URLError, OSError) as error:
                last = str(error)
            time.sleep(0.025)
        raise RuntimeError(f"{self.base_url}/ready not 200 within {READY_TIMEOUT_S}s ({last}):\n{self.logs}")

    def stop(self) -> int:
        """SIGTERM, then the exit code; killed if it does not stop in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.reader.join(5)
        return self.process.returncode


@contextmanager
def nstream_server(
    *extra: str, model_file: Path = QUICKSTART, env: dict[str, str] | None = None
) -> Iterator[RunningServer]:
    """nstream-server on a free port serving `model_file`; `env` replaces the inherited environment."""
    if env is None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", RUST_LOG="info", NO_COLOR="1")
    command = [str(server_binary()), "--model-file", str(model_file), "--port", "0", "--log-json", *extra]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    server = RunningServer(process)
    try:
        server.wait_ready()
        yield server
    finally:
        code = server.stop()
    # Reached only when the tests using it passed: a clean stop is part of the contract.
    assert code == 0, f"nstream-server exited {code} after SIGTERM:\n{server.logs}"


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with nstream_server() as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    # No retries: an error must surface as the first answer's exception class.
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / (norm(a) * norm(b))


def as_f32(vector: list[float]) -> array.array:
    return array.array("f", vector)


def load_references() -> dict[int, dict]:
    texts = {row["id"]: row["text"] for row in map(json.loads, (FIXTURES / "corpus.jsonl").read_text().splitlines())}
    references = {}
    for line in (FIXTURES / "all-minilm-l6-v2.reference.jsonl").read_text().splitlines():
        row = json.loads(line)
        references[row["id"]] = {"text": texts[row["id"]], "tokens": row["tokens"], "embedding": row["embedding"]}
    return references


def test_single_string_is_a_unit_vector(client: openai.OpenAI) -> None:
    response = client.embeddings.create(model=MODEL, input="The quick brown fox jumps over the lazy dog.")
    assert response.object == "list"
    assert response.model == MODEL
    assert len(response.data) == 1
    vector = response.data[0].embedding
    assert isinstance(vector, list) and len(vector) == DIMENSION
    assert abs(norm(vector) - 1.0) < 1e-4
    assert response.usage.prompt_tokens == 12  # [CLS] + 10 words and the full stop + [SEP]
    assert response.usage.total_tokens == response.usage.prompt_tokens


def test_batch_keeps_order_and_matches_the_reference(client: openai.OpenAI) -> None:
    references = load_references()
    # Plain English, a single dot, accents, Japanese, emoji, and a long sentence.
    ids = [0, 1, 2, 5, 7, 12, max(references, key=lambda key: references[key]["tokens"])]
    texts = [references[i]["text"] for i in ids]
    response = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert [item.index for item in response.data] == list(range(len(ids)))
    for i, item in zip(ids, response.data):
        assert len(item.embedding) == DIMENSION
        assert abs(norm(item.embedding) - 1.0) < 1e-4
        similarity = cosine(item.embedding, references[i]["embedding"])
        assert similarity >= 0.9999, f"id {i} {references[i]['text']!r}: cosine {similarity}"
    # Usage counts the tokens the model saw: each input truncated to 256 (the fixture records the
    # count before truncation; the long sentence has more than a thousand).
    assert response.usage.prompt_tokens == sum(min(references[i]["tokens"], 256) for i in ids)


def test_similar_sentences_are_closer_than_unrelated_ones(client: openai.OpenAI) -> None:
    texts = ["The cat sits on the mat.", "A cat is sitting on a rug.", "Interest rates rose by half a point."]
    cat, kitten, rates = (item.embedding for item in client.embeddings.create(model=MODEL, input=texts).data)
    assert cosine(cat, kitten) > cosine(cat, rates) + 0.2
    assert cosine(cat, kitten) > cosine(kitten, rates) + 0.2


def test_explicit_base64_decodes_to_the_float_answer(client: openai.OpenAI) -> None:
    texts = ["Embeddings in base64.", "Ünïcödé and 東京"]
    floats = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    encoded = client.embeddings.create(model=MODEL, input=texts, encoding_format="base64")
    for as_float, as_base64 in zip(floats.data, encoded.data):
        # With an explicit format the SDK hands back the string untouched.
        assert isinstance(as_base64.embedding, str)
        decoded = array.array("f", base64.b64decode(as_base64.embedding))
        assert len(decoded) == DIMENSION
        assert decoded == as_f32(as_float.embedding)


def test_default_encoding_is_base64_decoded_by_the_client(client: openai.OpenAI) -> None:
    # Without encoding_format the SDK requests base64 and decodes it into floats itself.
    default = client.embeddings.create(model=MODEL, input=["default encoding"])
    floats = client.embeddings.create(model=MODEL, input=["default encoding"], encoding_format="float")
    vector = default.data[0].embedding
    assert isinstance(vector, list) and len(vector) == DIMENSION
    assert as_f32(vector) == as_f32(floats.data[0].embedding)


def test_token_ids_embed_like_their_text(client: openai.OpenAI) -> None:
    text = client.embeddings.create(model=MODEL, input="hello world", encoding_format="float")
    tokens = client.embeddings.create(model=MODEL, input=[101, 7592, 2088, 102], encoding_format="float")
    batch = client.embeddings.create(model=MODEL, input=[[101, 7592, 2088, 102], [101, 7592, 102]])
    assert cosine(text.data[0].embedding, tokens.data[0].embedding) > 0.9999
    assert len(batch.data) == 2
    assert tokens.usage.prompt_tokens == 4
    assert batch.usage.prompt_tokens == 7


def test_dimensions(client: openai.OpenAI) -> None:
    full = client.embeddings.create(model=MODEL, input="x", dimensions=DIMENSION)
    assert len(full.data[0].embedding) == DIMENSION
    with pytest.raises(openai.BadRequestError) as raised:
        client.embeddings.create(model=MODEL, input="x", dimensions=DIMENSION + 1)
    assert raised.value.status_code == 400
    assert raised.value.param == "dimensions"


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.embeddings.create(model="text-embedding-3-small", input="a")
    assert raised.value.status_code == 404
    assert raised.value.code == "model_not_found"
    assert raised.value.param == "model"
    assert "text-embedding-3-small" in raised.value.message


@pytest.mark.parametrize(
    ("case", "arguments", "param"),
    [
        ("empty list", {"input": []}, "input"),
        ("empty string", {"input": ["a", ""]}, "input[1]"),
        ("zero dimensions", {"input": "a", "dimensions": 0}, "dimensions"),
        ("unknown field", {"input": "a", "extra_body": {"colour": "blue"}}, "colour"),
        ("token outside the vocabulary", {"input": [[101, 999_999, 102]]}, "input"),
        ("too many inputs", {"input": ["a"] * 2049}, "input"),
    ],
)
def test_bad_input_is_a_bad_request(client: openai.OpenAI, case: str, arguments: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.embeddings.create(model=MODEL, **arguments)
    assert raised.value.status_code == 400, case
    assert raised.value.param == param, f"{case}: {raised.value.body}"
    assert raised.value.type == "invalid_request_error"
    assert raised.value.message, case
    # The server is unharmed.
    assert len(client.embeddings.create(model=MODEL, input="ok").data) == 1


def test_models_list(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    # The quickstart file's models, in file order.
    assert ids == [MODEL, "smollm2-135m-instruct"]
    assert client.models.retrieve(MODEL).id == MODEL


def test_api_key() -> None:
    with nstream_server("--api-key", API_KEY) as guarded:
        url = f"{guarded.base_url}/v1"
        wrong = openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError) as raised:
            wrong.embeddings.create(model=MODEL, input="a")
        assert raised.value.status_code == 401
        assert raised.value.code == "invalid_api_key"
        assert API_KEY not in str(raised.value.body)
        right = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=60)
        assert len(right.embeddings.create(model=MODEL, input="a").data[0].embedding) == DIMENSION
        # Probes stay open without a key.
        with urllib.request.urlopen(f"{guarded.base_url}/health", timeout=5) as response:
            assert response.status == 200
        assert API_KEY not in guarded.logs
