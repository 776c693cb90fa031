"""A fake hosted-model provider: OpenAI, Azure OpenAI and Anthropic on one local port.

Stdlib only (threaded `http.server`), so the e2e tests and the gateway benchmark can put it behind
nstream-server's MegaModels. It answers each provider's wire format as documented:

- **OpenAI**: `POST /v1/chat/completions` and `POST /v1/embeddings` with `Authorization: Bearer`;
  errors `{"error": {"message", "type", "param", "code"}}`; a wrong key gets OpenAI's 401 that
  echoes a masked key (`sk-wro***ghij`), as OpenAI does. Streams are `data: {chunk}` lines ending
  with `data: [DONE]`, plus a usage chunk (`choices: []`) when `stream_options.include_usage`.
- **Azure OpenAI**: `POST /openai/deployments/{deployment}/chat/completions|embeddings?api-version=`
  with the `api-key` header; Azure's error bodies (`{"error": {"code": "401", "message": ...}}`,
  `DeploymentNotFound`, a missing or unsupported api-version), `prompt_filter_results` and
  `content_filter_results` in answers, and the prompt-filter chunk (no choices) first in streams.
- **Anthropic**: `POST /v1/messages` with `x-api-key` and `anthropic-version`; errors
  `{"type": "error", "error": {"type", "message"}}`; streams as named events (message_start,
  content_block_start, ping, content_block_delta, content_block_stop, message_delta, message_stop).

What arrives is validated (auth header, path, query, body fields and their types; unknown fields
are refused as the real APIs refuse them) and a mistake gets a 400/401/404 in that provider's shape.

Faults (`Faults`): a fraction of 429s (with `retry-after` seconds, `retry-after-ms`, or both, as
Azure sends), a fraction of 500s, a fixed latency, and `fail_first`: the first N attempts of every
distinct request body fail with a given status, which makes retry tests deterministic.

Every request is logged (provider, path, status, request id, body hash). The request id is the
body's `user` (OpenAI, Azure) or `metadata.user_id` (Anthropic); the body hash is the SHA-256 of the
body's canonical JSON, equal for all retries of one request. Control endpoints (no auth):

- `GET /_control/log`: `{"requests": [...], "by_id": {id: [statuses]}, "by_hash": {...}}`
- `POST /_control/faults`: JSON `Faults` fields to set; `POST /_control/reset`: clear log and faults

Run standalone (the gateway benchmark does): `python fake_provider.py --port 0 [--latency-ms N]`
prints `fake provider on http://127.0.0.1:PORT` once it listens.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import random
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

OPENAI_CHAT_FIELDS = {
    "model", "messages", "stream", "stream_options", "temperature", "top_p", "n", "stop", "max_tokens",
    "max_completion_tokens", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
    "user", "seed", "tools", "tool_choice", "parallel_tool_calls", "response_format", "service_tier", "store",
    "metadata", "modalities", "audio", "prediction", "reasoning_effort", "web_search_options",
    # OpenAI-compatible servers (vLLM) accept these; nstream sends them only when asked to.
    "top_k", "repetition_penalty",
}
OPENAI_EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}
ANTHROPIC_FIELDS = {
    "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream", "temperature", "top_p",
    "top_k", "tools", "tool_choice", "thinking", "service_tier",
}
AZURE_API_VERSIONS = {
    "2023-05-15", "2023-06-01-preview", "2023-10-01-preview", "2023-12-01-preview", "2024-02-01",
    "2024-06-01", "2024-09-01-preview", "2024-10-21", "2024-12-01-preview", "2025-01-01-preview",
}
ANTHROPIC_VERSIONS = {"2023-01-01", "2023-06-01"}
ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
EMBEDDING_DIMENSION = 8


@dataclass
class Faults:
    """What goes wrong, and how slowly. Fractions are of all model requests, drawn from `seed`."""

    rate_429: float = 0.0
    rate_500: float = 0.0
    latency_ms: float = 0.0
    # "retry-after" (whole seconds), "retry-after-ms", "both" (Azure), or "none".
    retry_after_style: str = "both"
    # The hint is drawn uniformly from this range, in milliseconds.
    retry_after_ms: tuple[int, int] = (1, 20)
    # {"status": 429, "count": 1, "retry_after": "1"}: the first `count` attempts of each distinct
    # body get `status` (with that Retry-After, seconds); later attempts are served normally.
    fail_first: dict[str, Any] | None = None
    seed: int = 7


@dataclass
class Logged:
    provider: str
    method: str
    path: str
    query: str
    status: int
    request_id: str | None
    body_hash: str
    at: float
    headers: dict[str, str] = field(default_factory=dict)


class ProviderError(Exception):
    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


def openai_error(status: int, message: str, kind: str, code: str | None = None, param: str | None = None):
    return ProviderError(status, {"error": {"message": message, "type": kind, "param": param, "code": code}})


def azure_error(status: int, code: str, message: str):
    return ProviderError(status, {"error": {"code": code, "message": message}})


def anthropic_error(status: int, kind: str, message: str):
    return ProviderError(status, {"type": "error", "error": {"type": kind, "message": message}})


def mask(key: str) -> str:
    """OpenAI's way of echoing a wrong key: its start and its last four characters."""
    return f"{key[:3]}{'*' * max(len(key) - 7, 0)}{key[-4:]}" if len(key) > 8 else "***"


def words(text: str) -> int:
    return max(1, len(text.split()))


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def answer_for(messages: list[dict[str, Any]]) -> str:
    """The fixed, small answer: it names the last user message, so tests can tell answers apart."""
    last = next((text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    return f"Hello from the fake provider. You said: {last[:60]}"


def embedding_of(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [b / 255.0 - 0.5 for b in digest[:EMBEDDING_DIMENSION]]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return [x / norm for x in raw]


class FakeProvider:
    """The server, its keys, faults and log. `start()` binds 127.0.0.1 on `port` (0: a free one)."""

    def __init__(
        self,
        *,
        openai_key: str = "sk-fake-openai",
        azure_key: str = "fake-azure-key",
        anthropic_key: str = "sk-ant-fake",
        openai_model: str = "gpt-4o-mini",
        azure_deployment: str = "gpt4o",
        anthropic_model: str = "claude-x",
        port: int = 0,
        faults: Faults | None = None,
        keep_log: bool = True,
    ) -> None:
        self.keys = {"openai": openai_key, "azure": azure_key, "anthropic": anthropic_key}
        self.openai_model = openai_model
        self.azure_deployment = azure_deployment
        self.anthropic_model = anthropic_model
        self.port = port
        self.keep_log = keep_log
        self.lock = threading.Lock()
        self.log: list[Logged] = []
        self.attempts: dict[str, int] = {}
        self.set_faults(faults or Faults())
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> "FakeProvider":
        provider = self

        class Handler(_Handler):
            fake = provider

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 1024
            allow_reuse_address = True

        self.httpd = Server(("127.0.0.1", self.port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
        if self.thread is not None:
            self.thread.join(5)

    def __enter__(self) -> "FakeProvider":
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- faults and log --------------------------------------------------------------------------

    def set_faults(self, faults: Faults) -> None:
        with self.lock:
            self.faults = faults
            self.rng = random.Random(faults.seed)

    def update_faults(self, **changes: Any) -> None:
        current = asdict(self.faults)
        current.update(changes)
        if isinstance(current.get("retry_after_ms"), list):
            current["retry_after_ms"] = tuple(current["retry_after_ms"])
        self.set_faults(Faults(**current))

    def reset(self) -> None:
        with self.lock:
            self.log.clear()
            self.attempts.clear()
        self.set_faults(Faults())

    def requests(self, request_id: str | None = None) -> list[Logged]:
        with self.lock:
            return [entry for entry in self.log if request_id is None or entry.request_id == request_id]

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            entries = list(self.log)
        by_id: dict[str, list[int]] = {}
        by_hash: dict[str, list[int]] = {}
        for entry in entries:
            if entry.request_id is not None:
                by_id.setdefault(entry.request_id, []).append(entry.status)
            by_hash.setdefault(entry.body_hash, []).append(entry.status)
        return {"requests": [asdict(entry) for entry in entries], "by_id": by_id, "by_hash": by_hash}

    def _record(self, entry: Logged) -> None:
        if self.keep_log:
            with self.lock:
                self.log.append(entry)

    def _injected(self, provider: str, body_hash: str) -> ProviderError | None:
        """The fault this attempt gets, if any; counts attempts per body."""
        with self.lock:
            faults = self.faults
            attempt = 0
            if faults.fail_first:  # counted only when needed: long benchmark runs keep no state
                attempt = self.attempts.get(body_hash, 0) + 1
                self.attempts[body_hash] = attempt
            roll = self.rng.random()
            hint_ms = self.rng.randint(*faults.retry_after_ms)
        if faults.fail_first and attempt <= int(faults.fail_first.get("count", 1)):
            status = int(faults.fail_first.get("status", 429))
            error = fault_error(provider, status)
            if "retry_after" in faults.fail_first:
                error.headers["retry-after"] = str(faults.fail_first["retry_after"])
            if "retry_after_ms" in faults.fail_first:
                error.headers["retry-after-ms"] = str(faults.fail_first["retry_after_ms"])
            return error
        if roll < faults.rate_429:
            error = fault_error(provider, 429)
            style = faults.retry_after_style
            if style in ("retry-after", "both"):
                # Whole seconds, rounded up, as HTTP allows; Azure sends both headers.
                error.headers["retry-after"] = str(max(0, -(-hint_ms // 1000)))
            if style in ("retry-after-ms", "both"):
                error.headers["retry-after-ms"] = str(hint_ms)
            return error
        if roll < faults.rate_429 + faults.rate_500:
            return fault_error(provider, 500)
        return None


def fault_error(provider: str, status: int) -> ProviderError:
    if provider == "anthropic":
        if status == 429:
            return anthropic_error(429, "rate_limit_error", "Number of requests has exceeded your rate limit.")
        if status == 529:
            return anthropic_error(529, "overloaded_error", "Overloaded")
        return anthropic_error(status, "api_error", "Internal server error")
    if provider == "azure":
        if status == 429:
            return azure_error(
                429,
                "429",
                "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have "
                "exceeded call rate limit of your current OpenAI S0 pricing tier. Please retry after 1 second.",
            )
        return azure_error(status, "InternalServerError", "The server had an error while processing your request.")
    if status == 429:
        return openai_error(429, "Rate limit reached for gpt-4o-mini on requests per min (RPM).", "requests",
                            "rate_limit_exceeded")
    return openai_error(status, "The server had an error while processing your request.", "server_error")


class _Handler(BaseHTTPRequestHandler):
    fake: FakeProvider
    protocol_version = "HTTP/1.1"
    server_version = "fake-provider/1"
    # Head and body are separate writes: with Nagle's algorithm the body waits for the client's
    # delayed ACK (40 ms on Linux) on every keep-alive request.
    disable_nagle_algorithm = True

    def log_message(self, *_: Any) -> None:  # quiet
        pass

    # -- transport -------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _commit(self, status: int) -> None:
        """Logs the model request being answered, before its answer leaves: a client that got the
        answer always finds the attempt in the log."""
        entry, self._entry = getattr(self, "_entry", None), None
        if entry is not None:
            entry.status = status
            self.fake._record(entry)

    def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self._commit(status)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_sse(self, pieces: list[str]) -> None:
        self._commit(200)
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for piece in pieces:
            data = piece.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/_control/log":
            self._send_json(200, self.fake.snapshot())
        else:
            self._send_json(404, {"error": {"message": f"no route GET {self.path}"}})

    def do_POST(self) -> None:
        started = time.monotonic()
        raw = self._read_body()
        parts = urlsplit(self.path)
        path, query = parts.path, parts.query
        if path.startswith("/_control/"):
            self._control(path, raw)
            return
        provider = self._provider_of(path)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        body_hash = hashlib.sha256(
            json.dumps(body, sort_keys=True, separators=(",", ":")).encode() if body is not None else raw
        ).hexdigest()
        request_id = None
        if isinstance(body, dict):
            user = body.get("user") if provider != "anthropic" else (body.get("metadata") or {}).get("user_id")
            request_id = user if isinstance(user, str) else None
        self._entry = Logged(
            provider=provider or "unknown", method="POST", path=path, query=query, status=0,
            request_id=request_id, body_hash=body_hash, at=time.time(),
            headers={k.lower(): v for k, v in self.headers.items()
                     if k.lower() not in ("authorization", "api-key", "x-api-key")},
        )
        try:
            try:
                if provider is None:
                    raise openai_error(404, f"Invalid URL (POST {path})", "invalid_request_error")
                self._check_auth(provider)
                route = self._route(provider, path, query)
                if body is None or not isinstance(body, dict):
                    raise self._bad_request(provider, "the body must be a JSON object")
                fault = self.fake._injected(provider, body_hash)
                latency = self.fake.faults.latency_ms
                if latency > 0:
                    time.sleep(max(0.0, latency / 1000.0 - (time.monotonic() - started)))
                if fault is not None:
                    raise fault
                route(body)
            except ProviderError as error:
                self._send_json(error.status, error.body, error.headers)
        finally:
            self._commit(500)  # an unexpected exception: logged as the 500 the client then sees

    def _control(self, path: str, raw: bytes) -> None:
        if path == "/_control/reset":
            self.fake.reset()
            self._send_json(200, {"ok": True})
        elif path == "/_control/faults":
            try:
                self.fake.update_faults(**json.loads(raw or b"{}"))
            except (TypeError, ValueError) as error:
                self._send_json(400, {"error": str(error)})
                return
            self._send_json(200, asdict(self.fake.faults))
        else:
            self._send_json(404, {"error": f"no control {path}"})

    # -- routing and validation ------------------------------------------------------------------

    @staticmethod
    def _provider_of(path: str) -> str | None:
        if path.startswith("/openai/"):
            return "azure"
        if path == "/v1/messages":
            return "anthropic"
        if path.startswith("/v1/"):
            return "openai"
        return None

    def _bad_request(self, provider: str, message: str, param: str | None = None) -> ProviderError:
        if provider == "anthropic":
            return anthropic_error(400, "invalid_request_error", message)
        if provider == "azure":
            return ProviderError(400, {"error": {"code": None, "message": message, "param": param,
                                                 "type": "invalid_request_error"}})
        return openai_error(400, message, "invalid_request_error", None, param)

    def _check_auth(self, provider: str) -> None:
        key = self.fake.keys[provider]
        if provider == "openai":
            given = self.headers.get("authorization", "")
            if not given.startswith("Bearer "):
                raise openai_error(
                    401,
                    "You didn't provide an API key. You need to provide your API key in an Authorization header "
                    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                    "invalid_request_error",
                )
            if given[len("Bearer "):] != key:
                raise openai_error(
                    401,
                    f"Incorrect API key provided: {mask(given[len('Bearer '):])}. You can find your API key at "
                    "https://platform.openai.com/account/api-keys.",
                    "invalid_request_error",
                    "invalid_api_key",
                )
        elif provider == "azure":
            if self.headers.get("api-key") != key:
                raise azure_error(
                    401,
                    "401",
                    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a "
                    "valid key for an active subscription and use a correct regional API endpoint for your resource.",
                )
        else:
            if self.headers.get("x-api-key") != key:
                raise anthropic_error(401, "authentication_error", "invalid x-api-key")
            version = self.headers.get("anthropic-version")
            if version is None:
                raise anthropic_error(400, "invalid_request_error", "anthropic-version: header is required")
            if version not in ANTHROPIC_VERSIONS:
                raise anthropic_error(400, "invalid_request_error", f"anthropic-version: invalid version {version}")

    def _route(self, provider: str, path: str, query: str):
        if provider == "openai":
            if path == "/v1/chat/completions":
                return lambda body: self._openai_chat(body, azure=False)
            if path == "/v1/embeddings":
                return lambda body: self._openai_embeddings(body, azure=False)
            raise openai_error(404, f"Invalid URL (POST {path})", "invalid_request_error")
        if provider == "azure":
            segments = path.split("/")  # ['', 'openai', 'deployments', dep, operation...]
            if len(segments) < 5 or segments[2] != "deployments":
                raise azure_error(404, "404", "Resource not found")
            versions = parse_qs(query).get("api-version", [])
            if not versions:
                raise azure_error(404, "404", "Resource not found")
            if versions[0] not in AZURE_API_VERSIONS:
                raise azure_error(400, "BadRequest", "API version not supported")
            if segments[3] != self.fake.azure_deployment:
                raise azure_error(
                    404,
                    "DeploymentNotFound",
                    "The API deployment for this resource does not exist. If you created the deployment within "
                    "the last 5 minutes, please wait a moment and try again.",
                )
            operation = "/".join(segments[4:])
            if operation == "chat/completions":
                return lambda body: self._openai_chat(body, azure=True)
            if operation == "embeddings":
                return lambda body: self._openai_embeddings(body, azure=True)
            raise azure_error(404, "404", "Resource not found")
        return self._anthropic_messages

    def _check_fields(self, provider: str, body: dict[str, Any], allowed: set[str]) -> None:
        extra = sorted(set(body) - allowed)
        if extra:
            if provider == "anthropic":
                raise self._bad_request(provider, f"{extra[0]}: Extra inputs are not permitted")
            raise self._bad_request(provider, f"Unrecognized request argument supplied: {extra[0]}", extra[0])

    def _check_messages(self, provider: str, messages: Any) -> None:
        if not isinstance(messages, list) or not messages:
            raise self._bad_request(provider, "'messages' must be a non-empty array", "messages")
        for position, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise self._bad_request(provider, f"Invalid value for 'messages[{position}].role'",
                                        f"messages[{position}].role")

    # -- OpenAI and Azure ------------------------------------------------------------------------

    def _openai_chat(self, body: dict[str, Any], azure: bool) -> None:
        provider = "azure" if azure else "openai"
        self._check_fields(provider, body, OPENAI_CHAT_FIELDS)
        if not azure and body.get("model") != self.fake.openai_model:
            raise openai_error(404, f"The model `{body.get('model')}` does not exist or you do not have access "
                               "to it.", "invalid_request_error", "model_not_found")
        self._check_messages(provider, body.get("messages"))
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise self._bad_request(provider, "'stream' must be a boolean", "stream")
        options = body.get("stream_options")
        if options is not None and not stream:
            raise self._bad_request(provider, "The 'stream_options' parameter is only allowed when 'stream' is "
                                    "enabled.", "stream_options")
        answer = answer_for(body["messages"])
        prompt_tokens = sum(words(text_of(m.get("content"))) for m in body["messages"])
        completion_tokens = words(answer)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        model = "gpt-4o-mini-2024-07-18"
        created = int(time.time())
        ident = "chatcmpl-" + hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]
        filters = {name: {"filtered": False, "severity": "safe"} for name in ("hate", "self_harm", "sexual", "violence")}
        if not stream:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": answer, "refusal": None},
                                      "logprobs": None, "finish_reason": "stop"}
            response: dict[str, Any] = {"id": ident, "object": "chat.completion", "created": created, "model": model,
                                        "choices": [choice], "usage": usage, "system_fingerprint": "fp_fake"}
            if azure:
                choice["content_filter_results"] = filters
                response["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": filters}]
            self._send_json(200, response)
            return
        include_usage = isinstance(options, dict) and options.get("include_usage") is True

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            value: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk", "created": created,
                                     "model": model, "system_fingerprint": "fp_fake",
                                     "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": finish}]}
            if include_usage:
                value["usage"] = None
            if azure and delta.get("content"):
                value["choices"][0]["content_filter_results"] = filters
            return value

        pieces = []
        if azure:  # Azure's prompt-filter chunk: no choices, empty model
            pieces.append({"choices": [], "created": 0, "id": "", "model": "", "object": "",
                           "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": filters}]})
        pieces.append(chunk({"role": "assistant", "content": "", "refusal": None}, None))
        for index, word in enumerate(answer.split(" ")):
            pieces.append(chunk({"content": word if index == 0 else " " + word}, None))
        pieces.append(chunk({}, "stop"))
        if include_usage:
            pieces.append({"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                           "system_fingerprint": "fp_fake", "choices": [], "usage": usage})
        self._send_sse([f"data: {json.dumps(piece)}\n\n" for piece in pieces] + ["data: [DONE]\n\n"])

    def _openai_embeddings(self, body: dict[str, Any], azure: bool) -> None:
        provider = "azure" if azure else "openai"
        self._check_fields(provider, body, OPENAI_EMBEDDING_FIELDS)
        if not azure and body.get("model") != self.fake.openai_model:
            raise openai_error(404, f"The model `{body.get('model')}` does not exist or you do not have access "
                               "to it.", "invalid_request_error", "model_not_found")
        given = body.get("input")
        if isinstance(given, str):
            inputs: list[str] = [given]
        elif isinstance(given, list) and given and all(isinstance(x, str) for x in given):
            inputs = given
        elif isinstance(given, list) and given and all(isinstance(x, int) for x in given):
            inputs = [" ".join(map(str, given))]
        elif isinstance(given, list) and given and all(
                isinstance(x, list) and all(isinstance(t, int) for t in x) for x in given):
            inputs = [" ".join(map(str, x)) for x in given]
        else:
            raise self._bad_request(provider, "'input' must be a string, an array of strings or of token ids",
                                    "input")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise self._bad_request(provider, f"Invalid value for 'encoding_format': {encoding!r}",
                                    "encoding_format")
        data = []
        for index, text in enumerate(inputs):
            vector = embedding_of(text)
            value: Any = vector
            if encoding == "base64":
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": value})
        tokens = sum(words(text) for text in inputs)
        self._send_json(200, {"object": "list", "data": data, "model": "text-embedding-3-small",
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # -- Anthropic -------------------------------------------------------------------------------

    def _anthropic_messages(self, body: dict[str, Any]) -> None:
        self._check_fields("anthropic", body, ANTHROPIC_FIELDS)
        if body.get("model") != self.fake.anthropic_model:
            raise anthropic_error(404, "not_found_error", f"model: {body.get('model')}")
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise anthropic_error(400, "invalid_request_error", "max_tokens: Field required")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise anthropic_error(400, "invalid_request_error", "messages: at least one message is required")
        for position, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
                raise anthropic_error(400, "invalid_request_error",
                                      f"messages.{position}.role: Input should be 'user' or 'assistant'")
            if position and messages[position - 1].get("role") == message["role"]:
                raise anthropic_error(400, "invalid_request_error",
                                      "messages: roles must alternate between \"user\" and \"assistant\"")
        if "system" in body and not isinstance(body["system"], (str, list)):
            raise anthropic_error(400, "invalid_request_error", "system: Input should be a valid string")
        answer = answer_for(messages)
        input_tokens = sum(words(text_of(m.get("content"))) for m in messages) + words(text_of(body.get("system")))
        output_tokens = words(answer)
        ident = "msg_" + hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]
        model = self.fake.anthropic_model
        if not body.get("stream"):
            self._send_json(200, {
                "id": ident, "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": answer}], "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
            })
            return
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"type": "message_start", "message": {
                "id": ident, "type": "message", "role": "assistant", "content": [], "model": model,
                "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": 1}}}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            ("ping", {"type": "ping"}),
        ]
        for index, word in enumerate(answer.split(" ")):
            events.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "text_delta",
                                                             "text": word if index == 0 else " " + word}}))
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": output_tokens}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        self._send_sse([f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--rate-429", type=float, default=0.0)
    parser.add_argument("--rate-500", type=float, default=0.0)
    parser.add_argument("--no-log", action="store_true", help="keep no request log (long benchmark runs)")
    arguments = parser.parse_args()
    faults = Faults(rate_429=arguments.rate_429, rate_500=arguments.rate_500, latency_ms=arguments.latency_ms)
    provider = FakeProvider(port=arguments.port, faults=faults, keep_log=not arguments.no_log).start()
    print(f"fake provider on {provider.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        provider.stop()


if __name__ == "__main__":
    sys.exit(main())
