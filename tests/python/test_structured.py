"""Structured output from a BaseModel through the official `openai` Python client.

examples/quickstart.yaml serves SmolLM2-135M-Instruct (the offline Q4_1 GGUF). Through an
unmodified OpenAI SDK: `response_format` json_schema (strict) answers sampled at temperature 1
that parse and validate on 100 varied prompts; a tool call parsed into `tool_calls`, streamed and
not; log probabilities that are a consistent log-softmax (sorted, summing to at most 1, the greedy
token on top, the same streamed and whole; crates/nstream-llm/tests/structured.rs checks them
against the model's logits directly); and bad input (an unsupported schema keyword, a tool with
an invalid schema, an image part) answered with BadRequestError while the server keeps serving.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import openai
import pytest

from test_openai_client import RunningServer, nstream_server

MODEL = "smollm2-135m-instruct"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "role": {"enum": ["student", "teacher", "engineer", "artist"]},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "minItems": 1, "maxItems": 2},
        "kind": {"const": "person"},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 6}]},
    },
    "required": ["name", "age", "role", "tags", "kind", "note"],
    "additionalProperties": False,
    "$defs": {"tag": {"enum": ["kind", "busy", "new", "tall"]}},
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


def validate(value: Any, schema: dict, root: dict) -> list[str]:
    """The errors of `value` against the subset of JSON Schema the tests use (no dependency)."""
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return validate(value, target, root)
    if "anyOf" in schema:
        if all(validate(value, option, root) for option in schema["anyOf"]):
            return [f"{value!r} matches no anyOf branch"]
        return []
    errors = []
    if "const" in schema and value != schema["const"]:
        errors.append(f"{value!r} != const {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{value!r} not in {schema['enum']}")
    kind = schema.get("type")
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "null": lambda v: v is None,
    }
    if kind and not checks[kind](value):
        return errors + [f"{value!r} is not {kind}"]
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
            errors.append(f"{value!r} has the wrong length")
    if isinstance(value, int) and not isinstance(value, bool):
        if value < schema.get("minimum", -math.inf) or value > schema.get("maximum", math.inf):
            errors.append(f"{value} out of range")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
            errors.append(f"{value!r} has the wrong number of items")
        for item in value:
            errors += validate(item, schema.get("items", {}), root)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [f"missing {name}" for name in schema.get("required", []) if name not in value]
        for name, item in value.items():
            if name in properties:
                errors += validate(item, properties[name], root)
            elif schema.get("additionalProperties") is False:
                errors.append(f"unexpected property {name}")
    return errors


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with nstream_server() as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


SUBJECTS = ["a nurse", "my neighbour", "a pilot", "a child", "a painter", "an old sailor", "a chef",
            "a student of law", "a robot", "a farmer"]
ASKS = ["Describe {} as JSON.", "Invent {} and give their profile.", "Who is {}? Reply in JSON.",
        "Make up a record for {}.", "Give a person card for {}, please.", "{}: fill in the profile.",
        "Tell me about {} in one JSON object.", "Create a character: {}.", "Profile of {}?",
        "JSON for {} with tags."]


def test_json_schema_strict_answers_validate_on_100_prompts_at_temperature_1(client: openai.OpenAI) -> None:
    prompts = [ask.format(subject) for ask in ASKS for subject in SUBJECTS]
    assert len(set(prompts)) == 100

    def answer(prompt: str) -> tuple[str, str | None, str | None]:
        response = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            temperature=1,
            # Room for the longest answer the schema allows (10 and 6 characters of any script,
            # several tokens each): a limit the answer can hit would cut it, constrained or not.
            max_tokens=160,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}},
        )
        choice = response.choices[0]
        return prompt, choice.message.content, choice.finish_reason

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(answer, prompts))
    failures = []
    distinct = set()
    for prompt, content, finish_reason in answers:
        try:
            value = json.loads(content or "")
        except json.JSONDecodeError as error:
            failures.append(f"{prompt!r}: {error}: {content!r} ({finish_reason})")
            continue
        errors = validate(value, PERSON, PERSON)
        if errors or finish_reason != "stop":
            failures.append(f"{prompt!r}: {errors} {content!r} ({finish_reason})")
        distinct.add(content)
    assert not failures, "\n".join(failures)
    # Temperature 1 samples: the answers differ.
    assert len(distinct) > 50


def test_json_object_answers_are_objects(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "A JSON object about cats."}],
        temperature=0,
        max_tokens=48,
        response_format={"type": "json_object"},
    )
    content = response.choices[0].message.content
    if response.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:
        assert content.startswith("{")


def tool_request(**extra: Any) -> dict:
    return dict(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather like in Paris today?"}],
        tools=[WEATHER_TOOL],
        temperature=1,
        seed=11,
        max_tokens=64,
        **extra,
    )


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_a_tool_call_is_parsed_into_tool_calls_streamed_and_not(client: openai.OpenAI, tool_choice: Any) -> None:
    whole = client.chat.completions.create(**tool_request(tool_choice=tool_choice))
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and len(calls) == 1
    assert calls[0].type == "function" and calls[0].function.name == "get_weather"
    assert calls[0].id.startswith("call_")
    arguments = json.loads(calls[0].function.arguments)
    assert not validate(arguments, WEATHER_TOOL["function"]["parameters"], {}), arguments

    stream = client.chat.completions.create(**tool_request(tool_choice=tool_choice), stream=True)
    chunks = [chunk for chunk in stream if chunk.choices]
    deltas = [call for chunk in chunks for call in (chunk.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].index == 0 and deltas[0].function.name == "get_weather"
    streamed_arguments = "".join(delta.function.arguments or "" for delta in deltas)
    # The same seed: the same call.
    assert streamed_arguments == calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_answers_in_text(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(**tool_request(tool_choice="none"))
    assert response.choices[0].message.tool_calls is None
    assert response.choices[0].message.content


def test_logprobs_are_a_log_softmax_streamed_and_not(client: openai.OpenAI) -> None:
    request = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a colour."}],
        temperature=0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=5,
    )
    whole = client.chat.completions.create(**request)
    content = whole.choices[0].logprobs.content
    assert content
    assert "".join(entry.token for entry in content) == whole.choices[0].message.content
    for entry in content:
        top = entry.top_logprobs
        assert len(top) == 5
        assert all(a.logprob >= b.logprob for a, b in zip(top, top[1:]))
        assert sum(math.exp(item.logprob) for item in top) <= 1.0 + 1e-4
        # Greedy: the chosen token is the most likely one, with the same log probability.
        assert entry.token == top[0].token and math.isclose(entry.logprob, top[0].logprob)
        assert entry.logprob <= 0 and bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    streamed = [
        entry
        for chunk in client.chat.completions.create(**request, stream=True)
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]

    completion = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0, logprobs=3)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert "".join(logprobs.tokens) == completion.choices[0].text
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and math.isclose(max(top.values()), logprob) and top[token] == logprob


BAD = [
    ("unsupported-keyword",
     dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
         "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}),
     "response_format.json_schema.schema", "uniqueItems"),
    ("invalid-tool-schema",
     dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 7}}}]),
     "tools[0].function.parameters", "properties"),
    ("tool-choice-unknown-function",
     dict(tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice", "nope"),
    ("image-part",
     dict(messages=[{"role": "user", "content": [
         {"type": "text", "text": "What is this?"},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]),
     "messages[0].content[1]", "image_url"),
]


@pytest.mark.parametrize("case,arguments,param,named", BAD, ids=[case for case, *_ in BAD])
def test_bad_structured_requests_are_clear_400s_and_serving_goes_on(
    client: openai.OpenAI, case: str, arguments: dict, param: str, named: str
) -> None:
    request = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    request.update(arguments)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**request)
    assert caught.value.param == param, caught.value.body
    assert named in caught.value.message, caught.value.body
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert answer.choices[0].message.content is not None
