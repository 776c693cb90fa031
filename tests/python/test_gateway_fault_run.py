"""The gateway fault run: 1,000 chat requests through nstream-server to a flaky provider.

The fake OpenAI provider (fake_provider.py) answers 30% of attempts with 429 (Azure-style
`retry-after` seconds plus `retry-after-ms`, the hint drawn at random) and 5% with 500. The
MegaModel allows 8 retries and 3,000 requests per minute, which nstream enforces over sliding
10-second windows (500 attempts each). Sixteen concurrent `openai` clients send 1,000 distinct
requests (each tagged by `user`) and the test checks, from the provider's own log:

- every request completed, or failed with a clear OpenAI-shaped error once its retry budget ran out;
- no request reached the provider more often than 1 + its retries, and none again after a 200;
- no 10-second window at the provider saw more than the configured rate allows.
"""

from __future__ import annotations

import bisect
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import openai
import pytest

from fake_provider import FakeProvider, Faults
from test_openai_client import RunningServer, nstream_server

KEY = "sk-proj-FAULTRUNSECRET-4c1d"
REQUESTS = 1_000
CLIENTS = 16
MAX_RETRIES = 8
REQUESTS_PER_MINUTE = 3_000
WINDOW_S = 10.0
PER_WINDOW = REQUESTS_PER_MINUTE * WINDOW_S / 60.0


@pytest.fixture(scope="module")
def flaky() -> Iterator[FakeProvider]:
    faults = Faults(rate_429=0.30, rate_500=0.05, retry_after_style="both", retry_after_ms=(1, 50), seed=2026)
    with FakeProvider(openai_key=KEY, faults=faults) as provider:
        yield provider


@pytest.fixture(scope="module")
def gateway(flaky: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    path = tmp_path_factory.mktemp("fault-run") / "mega.yaml"
    path.write_text(f"""apiVersion: llm.nstream.ai/v1
kind: MegaModel
metadata:
  name: flaky-mega
spec:
  modelProvider: OpenAI
  modelTemplate:
    openAI: {{endpoint: "{flaky.url}/v1", model: gpt-4o-mini, apikeySecretRef: {{name: fault, key: openai}}}}
  limits: {{requestsPerMinute: {REQUESTS_PER_MINUTE}, maxRetries: {MAX_RETRIES}, timeoutSeconds: 20}}
""")
    env = {key: value for key, value in os.environ.items() if not key.startswith("NSTREAM_")}
    env.update(HF_HUB_OFFLINE="1", NO_COLOR="1", RUST_LOG="info", NSTREAM_SECRET_FAULT_OPENAI=KEY)
    with nstream_server(model_file=path, env=env) as server:
        yield server
    assert KEY not in server.logs


def test_a_thousand_requests_through_a_flaky_provider(gateway: RunningServer, flaky: FakeProvider) -> None:
    client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0, timeout=120)

    def call(index: int) -> tuple[str, str]:
        user = f"fault-{index:04d}"
        try:
            answer = client.chat.completions.create(
                model="flaky-mega", messages=[{"role": "user", "content": f"question {index}"}], user=user
            )
        except openai.APIStatusError as error:
            return user, f"error {error.status_code}: {error.message}"
        return user, "ok" if answer.choices[0].message.content else "empty answer"

    with ThreadPoolExecutor(CLIENTS) as pool:
        outcomes = dict(pool.map(call, range(REQUESTS)))

    log = flaky.snapshot()
    attempts = log["by_id"]
    assert len(outcomes) == REQUESTS
    failures = {user: outcome for user, outcome in outcomes.items() if outcome != "ok"}
    for user, outcome in outcomes.items():
        statuses = attempts.get(user, [])
        assert statuses, f"{user} never reached the provider ({outcome})"
        assert len(statuses) <= 1 + MAX_RETRIES, f"{user} was sent {len(statuses)} times: {statuses}"
        assert 200 not in statuses[:-1], f"{user} was sent again after a 200: {statuses}"
        if outcome == "ok":
            assert statuses[-1] == 200, f"{user} succeeded without a 200 upstream: {statuses}"
        else:
            # Only an exhausted budget may fail a request here: every fault is retryable.
            assert 200 not in statuses and len(statuses) == 1 + MAX_RETRIES, f"{user}: {outcome}, {statuses}"
            assert outcome.startswith(("error 429", "error 500", "error 502", "error 503")), f"{user}: {outcome}"
            assert "retr" in outcome.lower() or "rate" in outcome.lower() or "server" in outcome.lower(), outcome
    # With 35% faults per attempt and 8 retries, an exhausted budget is (0.35^9 ≈ 8e-5) rare.
    assert len(failures) <= 2, failures

    # The rate, as the provider saw it: no 10-second window above the per-window share of the RPM.
    # Arrival order can differ from admission order by the requests in flight, hence the slack.
    arrivals = sorted(entry["at"] for entry in log["requests"])
    busiest = max(bisect.bisect_left(arrivals, start + WINDOW_S) - index for index, start in enumerate(arrivals))
    retried = sum(len(statuses) - 1 for statuses in attempts.values())
    span = arrivals[-1] - arrivals[0]
    print(
        f"\nfault run: {REQUESTS} requests, {len(arrivals)} attempts upstream ({retried} retries), "
        f"{len(failures)} failed after the retry budget, {span:.1f}s, busiest {WINDOW_S:.0f}s window {busiest} "
        f"(limit {PER_WINDOW:.0f})"
    )
    assert busiest <= PER_WINDOW + CLIENTS, f"{busiest} attempts in {WINDOW_S}s, limit {PER_WINDOW}"
