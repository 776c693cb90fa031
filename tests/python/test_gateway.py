"""MegaModels through the nstream gateway, with the official `openai` client.

One fake provider (fake_provider.py: OpenAI, Azure OpenAI and Anthropic wire formats on one local
port) and one nstream-server serving a generated file of MegaModels pointing at it: one per
provider with the right key (from `NSTREAM_SECRET_*` variables, as local mode reads Secret
references) and one per provider with a wrong key. For each provider: chat, whole and streamed
(content, finish_reason, usage with `stream_options.include_usage`), embeddings (OpenAI and Azure),
a provider 401 surfacing as the right exception with a clear message, the key in no log line and
no error, and a 429 with Retry-After retried by nstream: the client sees success and the provider
saw exactly two attempts.

The server binary is found as in test_openai_client.py ($NSTREAM_SERVER_BIN, else the debug build).
"""

from __future__ import annotations

import os
from typing import Iterator

import openai
import pytest

from fake_provider import FakeProvider, Faults, mask
from test_openai_client import RunningServer, nstream_server

KEYS = {
    "openai": "sk-proj-GATEWAYSECRET-openai-7f3a9c1d2e",
    "azure": "azGATEWAYSECRETazure0b8e4f6a2c91d357",
    "anthropic": "sk-ant-api03-GATEWAYSECRET-anthropic-5d2c",
}
WRONG_KEYS = {
    "openai": "sk-proj-WRONGSECRET-openai-1a2b3c4d5e",
    "azure": "azWRONGSECRETazure77aa66bb55cc44dd",
    "anthropic": "sk-ant-api03-WRONGSECRET-anthropic-9e8f",
}
# Distinctive pieces of every key: none may show up anywhere a user or a log collector can read.
SECRET_MARKERS = ["GATEWAYSECRET", "WRONGSECRET", *KEYS.values(), *WRONG_KEYS.values()]
PROVIDERS = ["openai", "azure", "anthropic"]
EMBEDDING_PROVIDERS = ["openai", "azure"]


def template(provider: str, endpoint: str, secret: str) -> str:
    ref = f"apikeySecretRef: {{name: {secret}, key: {provider}}}"
    if provider == "openai":
        return f"""  modelProvider: OpenAI
  modelTemplate:
    openAI: {{endpoint: "{endpoint}/v1", model: gpt-4o-mini, {ref}}}"""
    if provider == "azure":
        return f"""  modelProvider: AzureOpenAI
  modelTemplate:
    azureOpenAI: {{endpoint: "{endpoint}", deployment: gpt4o, apiVersion: "2024-10-21", {ref}}}"""
    return f"""  modelProvider: Anthropic
  modelTemplate:
    anthropic: {{endpoint: "{endpoint}", model: claude-x, maxTokens: 256, {ref}}}"""


def model_file(endpoint: str) -> str:
    documents = []
    for provider in PROVIDERS:
        for name, secret in ((f"{provider}-mega", "good"), (f"{provider}-wrong-key", "wrong")):
            documents.append(f"""apiVersion: llm.nstream.ai/v1
kind: MegaModel
metadata:
  name: {name}
spec:
{template(provider, endpoint, secret)}
  limits: {{timeoutSeconds: 20, maxRetries: 3}}
""")
    return "---\n".join(documents)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    with FakeProvider(openai_key=KEYS["openai"], azure_key=KEYS["azure"], anthropic_key=KEYS["anthropic"]) as provider:
        yield provider


@pytest.fixture(autouse=True)
def clean_provider(fake: FakeProvider) -> None:
    fake.reset()


@pytest.fixture(scope="module")
def gateway(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    path = tmp_path_factory.mktemp("gateway") / "megamodels.yaml"
    path.write_text(model_file(fake.url))
    env = {key: value for key, value in os.environ.items() if not key.startswith("NSTREAM_")}
    env.update(HF_HUB_OFFLINE="1", NO_COLOR="1", RUST_LOG="debug,hyper=info,hyper_util=info,h2=info")
    for provider in PROVIDERS:
        env[f"NSTREAM_SECRET_GOOD_{provider.upper()}"] = KEYS[provider]
        env[f"NSTREAM_SECRET_WRONG_{provider.upper()}"] = WRONG_KEYS[provider]
    with nstream_server(model_file=path, env=env) as server:
        yield server
    assert_no_secret(server.logs, "nstream-server's logs")


@pytest.fixture(scope="module")
def client(gateway: RunningServer) -> openai.OpenAI:
    # No client retries: what the test sees is nstream's own answer, and attempts are nstream's.
    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0, timeout=30)


def assert_no_secret(text: str, where: str) -> None:
    for marker in SECRET_MARKERS:
        assert marker not in text, f"{where} shows a key ({marker!r}):\n{text}"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_chat(client: openai.OpenAI, fake: FakeProvider, provider: str) -> None:
    response = client.chat.completions.create(
        model=f"{provider}-mega",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ping one"}],
        max_tokens=32,
        user=f"chat-{provider}",
    )
    assert response.object == "chat.completion"
    assert response.model == f"{provider}-mega"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == "Hello from the fake provider. You said: ping one"
    assert response.choices[0].finish_reason == "stop"
    assert response.usage is not None
    assert response.usage.completion_tokens == 9
    assert response.usage.prompt_tokens >= 3
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    sent = fake.requests()
    assert [entry.status for entry in sent] == [200], fake.snapshot()
    expected_path = {
        "openai": "/v1/chat/completions",
        "azure": "/openai/deployments/gpt4o/chat/completions",
        "anthropic": "/v1/messages",
    }[provider]
    assert sent[0].path == expected_path
    if provider == "azure":
        assert sent[0].query == "api-version=2024-10-21"
    if provider == "anthropic":
        assert sent[0].headers.get("anthropic-version") == "2023-06-01"
    assert sent[0].request_id == f"chat-{provider}"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_streamed_chat_with_usage(client: openai.OpenAI, fake: FakeProvider, provider: str) -> None:
    stream = client.chat.completions.create(
        model=f"{provider}-mega",
        messages=[{"role": "user", "content": "stream two words"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    content, finish_reasons, usages = [], [], []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        assert chunk.model == f"{provider}-mega"
        if chunk.usage is not None:
            usages.append(chunk.usage)
            assert chunk.choices == []  # the usage chunk carries no choice
        for choice in chunk.choices:
            if choice.delta.content:
                content.append(choice.delta.content)
            if choice.finish_reason is not None:
                finish_reasons.append(choice.finish_reason)
    assert "".join(content) == "Hello from the fake provider. You said: stream two words"
    assert finish_reasons == ["stop"]
    assert len(usages) == 1, usages
    assert usages[0].completion_tokens == 10
    assert usages[0].prompt_tokens >= 3
    assert usages[0].total_tokens == usages[0].prompt_tokens + usages[0].completion_tokens
    assert [entry.status for entry in fake.requests()] == [200]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_streamed_chat_without_usage(client: openai.OpenAI, provider: str) -> None:
    chunks = list(
        client.chat.completions.create(
            model=f"{provider}-mega", messages=[{"role": "user", "content": "no usage"}], stream=True
        )
    )
    assert all(chunk.usage is None for chunk in chunks)
    text = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
    assert text == "Hello from the fake provider. You said: no usage"


@pytest.mark.parametrize("provider", EMBEDDING_PROVIDERS)
def test_embeddings(client: openai.OpenAI, fake: FakeProvider, provider: str) -> None:
    floats = client.embeddings.create(model=f"{provider}-mega", input=["one", "two words"], encoding_format="float")
    assert [item.index for item in floats.data] == [0, 1]
    assert all(len(item.embedding) == 8 for item in floats.data)
    assert abs(sum(x * x for x in floats.data[0].embedding) - 1.0) < 1e-6
    assert floats.data[0].embedding != floats.data[1].embedding
    assert floats.usage.prompt_tokens == 3
    # The SDK's default asks for base64 and decodes it: the same vectors, to float32 precision.
    default = client.embeddings.create(model=f"{provider}-mega", input=["one", "two words"])
    for as_float, decoded in zip(floats.data, default.data):
        assert all(abs(a - b) < 1e-6 for a, b in zip(as_float.embedding, decoded.embedding))
    assert [entry.status for entry in fake.requests()] == [200, 200]
    expected = "/v1/embeddings" if provider == "openai" else "/openai/deployments/gpt4o/embeddings"
    assert {entry.path for entry in fake.requests()} == {expected}


def test_anthropic_embeddings_are_refused_clearly(client: openai.OpenAI, fake: FakeProvider) -> None:
    with pytest.raises(openai.APIStatusError) as raised:
        client.embeddings.create(model="anthropic-mega", input="x")
    assert 400 <= raised.value.status_code < 500 or raised.value.status_code == 501
    assert "embedding" in str(raised.value).lower()
    assert fake.requests() == []


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_provider_401_is_a_gateway_error_without_the_key(
    client: openai.OpenAI, gateway: RunningServer, fake: FakeProvider, provider: str, stream: bool
) -> None:
    # The client's request is fine; nstream's credentials are not: 502, an InternalServerError for
    # the SDK (not AuthenticationError, which would blame the caller's key), naming the 401.
    with pytest.raises(openai.InternalServerError) as raised:
        response = client.chat.completions.create(
            model=f"{provider}-wrong-key", messages=[{"role": "user", "content": "hi"}], stream=stream
        )
        if stream:
            list(response)
    error = raised.value
    assert error.status_code == 502
    message = str(error)
    assert "401" in message, message
    assert_no_secret(message, "the error")
    # OpenAI echoes a masked key (`sk-***5e`): nstream scrubs even that.
    assert mask(WRONG_KEYS[provider]) not in message
    assert_no_secret(str(error.body), "the error body")
    assert_no_secret(gateway.logs, "nstream-server's logs")
    # Not retried: a wrong key stays wrong.
    assert [entry.status for entry in fake.requests()] == [401]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_429_with_retry_after_is_retried_once(client: openai.OpenAI, fake: FakeProvider, provider: str) -> None:
    fake.set_faults(Faults(fail_first={"status": 429, "count": 1, "retry_after": "1"}))
    response = client.chat.completions.create(
        model=f"{provider}-mega", messages=[{"role": "user", "content": "retry me"}], user=f"retry-{provider}"
    )
    assert response.choices[0].message.content == "Hello from the fake provider. You said: retry me"
    attempts = fake.requests(f"retry-{provider}")
    assert [entry.status for entry in attempts] == [429, 200], fake.snapshot()
    assert len({entry.body_hash for entry in attempts}) == 1
    # Retry-After: 1 was honoured (nstream adds up to 10% jitter).
    assert attempts[1].at - attempts[0].at >= 0.95


def test_retry_budget_exhausted_is_a_clear_429(client: openai.OpenAI, fake: FakeProvider) -> None:
    fake.set_faults(Faults(fail_first={"status": 429, "count": 100, "retry_after_ms": "5"}))
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(
            model="openai-mega", messages=[{"role": "user", "content": "never"}], user="exhausted"
        )
    assert "429" in str(raised.value)
    # maxRetries: 3 -> four attempts, never more.
    assert [entry.status for entry in fake.requests("exhausted")] == [429] * 4


def test_fake_provider_validates_what_it_gets(fake: FakeProvider) -> None:
    # The fake must refuse what the real providers refuse, or the tests above would prove little.
    import json
    import urllib.error
    import urllib.request

    def post(path: str, body: object, headers: dict[str, str]) -> tuple[int, dict]:
        request = urllib.request.Request(
            fake.url + path, json.dumps(body).encode(), {"content-type": "application/json", **headers}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    assert post("/v1/chat/completions", chat, {"authorization": f"Bearer {KEYS['openai']}"})[0] == 200
    status, body = post("/v1/chat/completions", chat, {"authorization": "Bearer sk-nope-12345678"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = post("/v1/chat/completions", {**chat, "bogus": 1}, {"authorization": f"Bearer {KEYS['openai']}"})
    assert status == 400 and "bogus" in body["error"]["message"]
    azure = {"api-key": KEYS["azure"]}
    assert post("/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21", chat, azure)[0] == 200
    status, body = post("/openai/deployments/other/chat/completions?api-version=2024-10-21", chat, azure)
    assert status == 404 and body["error"]["code"] == "DeploymentNotFound"
    assert post("/openai/deployments/gpt4o/chat/completions", chat, azure)[0] == 404
    status, body = post("/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21", chat, {"api-key": "x"})
    assert status == 401 and body["error"]["code"] == "401"
    anthropic = {"x-api-key": KEYS["anthropic"], "anthropic-version": "2023-06-01"}
    message = {"model": "claude-x", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
    assert post("/v1/messages", message, anthropic)[0] == 200
    status, body = post("/v1/messages", {**message, "max_tokens": None}, anthropic)
    assert status == 400 and body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    status, body = post("/v1/messages", message, {"x-api-key": KEYS["anthropic"]})
    assert status == 400 and "anthropic-version" in body["error"]["message"]
    status, body = post("/v1/messages", message, {**anthropic, "x-api-key": "nope"})
    assert status == 401 and body["error"]["type"] == "authentication_error"
    # The control endpoint shows the same log.
    with urllib.request.urlopen(fake.url + "/_control/log", timeout=10) as response:
        log = json.load(response)
    assert [entry["status"] for entry in log["requests"]] == [200, 401, 400, 200, 404, 404, 401, 200, 400, 400, 401]
