"""The official `openai` Python client chatting with a BaseModel served by the real nstream-server.

examples/quickstart.yaml holds SmolLM2-135M-Instruct (the offline Q4_1 GGUF). Through an unmodified
OpenAI SDK: chat and completions, streamed and not (the streamed text equals the whole answer, the
last chunk carries usage), stop sequences, seed reproducibility, an abort mid-stream that frees the
slot at once, and bad input answered with the SDK's exception classes (nothing crashes: the server
still answers afterwards).
"""

from __future__ import annotations

import re
import time
import urllib.request
from typing import Iterator

import openai
import pytest

from test_openai_client import RunningServer, nstream_server

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "Write a haiku about the sea."}]


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with nstream_server() as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def metric(server: RunningServer, name: str) -> float:
    """The value of one `nstream_llm_*` series of the served model."""
    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf'^{name}\{{model="{MODEL}"\}} (\S+)$', text, re.MULTILINE)
    assert match, f"{name} not in /metrics:\n{text}"
    return float(match.group(1))


def test_greedy_chat_is_deterministic_with_usage(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    second = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    answer = first.choices[0].message.content
    assert answer and answer == second.choices[0].message.content
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].finish_reason in ("stop", "length")
    assert first.object == "chat.completion" and first.model == MODEL and first.id.startswith("chatcmpl-")
    usage = first.usage
    assert usage is not None and usage.prompt_tokens > 20
    assert 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_chat_equals_the_whole_answer(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    finished = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finished == [whole.choices[0].finish_reason]
    # With include_usage, the last chunk has no choices and the usage of the whole answer.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_streamed_and_not(client: openai.OpenAI) -> None:
    prompt = "The three primary colors are"
    whole = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16)
    assert whole.object == "text_completion"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == 5 and whole.usage.completion_tokens == 16
    assert "color" in whole.choices[0].text.lower(), whole.choices[0].text
    streamed = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == whole.choices[0].text


def test_stop_sequence_cuts_the_answer_before_it(client: openai.OpenAI) -> None:
    prompt = "Count from one to ten in words: one, two,"
    free = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=24).choices[0].text
    words = [word for word in re.findall(r"[A-Za-z]+", free) if len(word) > 2]
    assert len(words) >= 2, free
    stop = words[1]
    cut = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=24, stop=[stop])
    choice = cut.choices[0]
    assert choice.finish_reason == "stop"
    assert stop not in choice.text
    assert free.startswith(choice.text) and free[len(choice.text) :].startswith(stop), (free, choice.text)


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        answer = client.chat.completions.create(
            model=MODEL, messages=QUESTION, temperature=1.0, top_p=0.95, seed=seed, max_tokens=32
        )
        return answer.choices[0].message.content or ""

    first, again, other = sample(42), sample(42), sample(4242)
    assert first == again
    assert first != other


def test_abort_mid_stream_frees_the_slot() -> None:
    # One running sequence at most: the next request can only run once the aborted one is gone.
    with nstream_server("--max-running-sequences", "1") as single:
        client = openai.OpenAI(base_url=f"{single.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        cancelled_before = metric(single, "nstream_llm_cancelled_sequences_total")
        stream = client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=3000,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        received = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
                if received == 5:
                    break
        stream.close()  # the client disconnects with ~3,000 tokens left to generate
        started = time.monotonic()
        answer = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8)
        waited = time.monotonic() - started
        assert answer.choices[0].message.content
        # Generating the aborted stream's remaining tokens would take minutes on this model.
        assert waited < 30, f"the next request waited {waited:.1f}s: the aborted stream kept its slot"
        deadline = time.monotonic() + 10
        while metric(single, "nstream_llm_cancelled_sequences_total") <= cancelled_before:
            assert time.monotonic() < deadline, "the aborted sequence was never counted as cancelled"
            time.sleep(0.1)
        assert metric(single, "nstream_llm_running_sequences") == 0


BAD_CHATS = [
    ("no messages", {"messages": []}, "messages"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("max_tokens 0", {"messages": QUESTION, "max_tokens": 0}, "max_tokens"),
    # As OpenAI answers: context_length_exceeded, on `messages`.
    ("max_tokens huge", {"messages": QUESTION, "max_tokens": 10_000_000}, "messages"),
    ("negative temperature", {"messages": QUESTION, "temperature": -0.5}, "temperature"),
    ("top_p above 1", {"messages": QUESTION, "top_p": 1.5}, "top_p"),
    ("a 1 MB prompt", {"messages": [{"role": "user", "content": "word " * 200_000}]}, "messages"),
]


@pytest.mark.parametrize("case,arguments,param", BAD_CHATS, ids=[case for case, _, _ in BAD_CHATS])
def test_bad_chat_requests_are_bad_requests(client: openai.OpenAI, case: str, arguments: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, **arguments)
    assert raised.value.status_code == 400, case
    assert raised.value.type == "invalid_request_error", f"{case}: {raised.value.body}"
    assert raised.value.param == param, f"{case}: {raised.value.body}"
    assert raised.value.message, case
    # The server is unharmed.
    assert client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2).choices


def test_unknown_chat_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert raised.value.code == "model_not_found"


def test_models_list_shows_the_chat_model(client: openai.OpenAI) -> None:
    assert MODEL in [model.id for model in client.models.list()]
