"""The official `openai` SDK, sync and async, against the real gateway: mock upstream and relayed fake upstream."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageFunctionToolCall

from app.upstream.mock import mock_tokens
from tests.conftest import FakeUpstream, Gateway

PROMPT = "Tell me about streaming gateways"
MESSAGES: list[Any] = [{"role": "user", "content": PROMPT}]
MODEL = "gpt-4o-mini"
MAX_TOKENS_LIMIT = 32768  # the gateway's default MAX_TOKENS_LIMIT


def expected_mock_text(n: int, prompt: str = PROMPT) -> str:
    return "".join(mock_tokens(prompt, 0, n))


def fake_text(n: int) -> str:
    return "".join(f"tok{i} " for i in range(n))  # the fake upstream's default tokens


@pytest.fixture
def client(mock_gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=mock_gateway.url + "/v1", api_key="x", max_retries=0, timeout=30) as c:
        yield c


@pytest.fixture
def relay_client(relay_gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=relay_gateway.url + "/v1", api_key="x", max_retries=0, timeout=30) as c:
        yield c


def stream_text(client: openai.OpenAI, **kwargs: Any) -> tuple[str, list[Any]]:
    with client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **kwargs) as stream:
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def check_openai_error(err: openai.APIStatusError, *, status: int, code: str) -> dict[str, Any]:
    assert err.status_code == status
    error: dict[str, Any] = err.response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code
    assert err.body == error  # the SDK unwraps OpenAI's {"error": {...}} envelope
    assert err.code == code
    return error


# --- mock upstream -------------------------------------------------------------------------------------


def test_non_stream_completion(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12)
    (choice,) = completion.choices
    content = choice.message.content
    assert content == expected_mock_text(12)
    words = content.split(" ")
    assert len(words) == 13 and words[-1] == "" and all(words[:-1])  # 12 words, each followed by a space
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert completion.object == "chat.completion"
    assert completion.model == MODEL
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 12
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12


def test_stream_equals_non_stream(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)
    text, chunks = stream_text(client, max_tokens=20)
    assert text == completion.choices[0].message.content == expected_mock_text(20)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.usage is None for c in chunks)  # not asked for


def test_stream_include_usage(client: openai.OpenAI) -> None:
    text, chunks = stream_text(client, max_tokens=9, stream_options={"include_usage": True})
    assert text == expected_mock_text(9)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 9
    assert last.usage.prompt_tokens == len(PROMPT.split())
    assert last.usage.total_tokens == last.usage.prompt_tokens + 9
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"


def test_max_completion_tokens_is_honoured(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=5)
    assert completion.choices[0].message.content == expected_mock_text(5)
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    text, _ = stream_text(client, max_completion_tokens=6)
    assert text == expected_mock_text(6)


def test_models_list(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models] == ["gpt-4o-mini", "gpt-4o"]
    assert all(m.object == "model" for m in models)


def test_max_tokens_above_limit_is_422(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS_LIMIT + 1)
    error = check_openai_error(info.value, status=422, code="invalid_request")
    assert str(MAX_TOKENS_LIMIT) in error["message"]
    assert error["param"] == "max_tokens"


def test_max_completion_tokens_above_limit_is_422_streaming(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_completion_tokens=MAX_TOKENS_LIMIT + 1, stream=True
        )
    error = check_openai_error(info.value, status=422, code="invalid_request")
    assert error["param"] == "max_completion_tokens"


def test_empty_messages_is_422(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model=MODEL, messages=[])
    error = check_openai_error(info.value, status=422, code="invalid_request")
    assert "messages" in error["message"]


def test_wrong_path_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.get("/no/such/route", cast_to=object)
    check_openai_error(info.value, status=404, code="not_found")


def test_raw_response_has_stream_id(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=3, stream=True)
    with raw.parse() as stream:
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert raw.http_response.status_code == 200
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["x-stream-id"]
    assert text == expected_mock_text(3)


@pytest.mark.anyio
async def test_async_client(mock_gateway: Gateway) -> None:
    async with openai.AsyncOpenAI(base_url=mock_gateway.url + "/v1", api_key="x", max_retries=0, timeout=30) as c:
        completion = await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=15)
        assert completion.choices[0].message.content == expected_mock_text(15)
        assert completion.usage is not None and completion.usage.completion_tokens == 15
        stream = await c.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=15, stream=True, stream_options={"include_usage": True}
        )
        async with stream:
            chunks = [chunk async for chunk in stream]
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected_mock_text(15)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 15
        assert [m.id async for m in c.models.list()] == ["gpt-4o-mini", "gpt-4o"]
        with pytest.raises(openai.UnprocessableEntityError) as info:
            await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS_LIMIT + 1)
        check_openai_error(info.value, status=422, code="invalid_request")
        with pytest.raises(openai.UnprocessableEntityError):
            await c.chat.completions.create(model=MODEL, messages=[], stream=True)
        with pytest.raises(openai.NotFoundError) as not_found:
            await c.get("/no/such/route", cast_to=object)
        check_openai_error(not_found.value, status=404, code="not_found")


# --- relayed from the fake OpenAI-compatible upstream ----------------------------------------------------


def upstream_request(fake: FakeUpstream) -> dict[str, Any]:
    body: dict[str, Any]
    (body,) = fake.stats()["bodies"]
    return body


def test_relay_non_stream(relay_client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    completion = relay_client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0.3, stop=["\n\n", "END"], top_p=0.9, seed=42
    )
    assert completion.choices[0].message.content == fake_text(8)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 8
    assert completion.usage.prompt_tokens == 7  # the fake's count, relayed
    sent = upstream_request(fake_upstream)
    assert sent["authorization"] == "Bearer sk-upstream-secret"  # the gateway's key, never the client's
    assert sent["temperature"] == 0.3
    assert sent["stop"] == ["\n\n", "END"]
    assert sent["top_p"] == 0.9
    assert sent["seed"] == 42
    assert sent["model"] == MODEL
    assert sent["messages"] == MESSAGES
    assert sent["max_tokens"] == 8


def test_relay_stream(relay_client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    text, chunks = stream_text(
        relay_client, max_tokens=10, temperature=0.3, stop="END", stream_options={"include_usage": True}
    )
    assert text == fake_text(10)
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == 7
    assert chunks[-2].choices[0].finish_reason == "length"
    sent = upstream_request(fake_upstream)
    assert sent["authorization"] == "Bearer sk-upstream-secret"
    assert sent["temperature"] == 0.3
    assert sent["stop"] == "END"
    assert sent["stream"] is True


TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALLS = [  # what the fake upstream "decides" to call: arguments stream in 4-character pieces
    {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
    {"name": "get_time", "arguments": '{"zone": "Europe/Zurich", "format": "24h"}'},
]


def test_relay_tool_calls_stream(relay_client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    """Tool-call deltas reach the client whole; the SDK assembles them as it would from OpenAI."""
    fake_upstream.script({"tokens": ["Let me check. "], "tool_calls": CALLS})
    with relay_client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, tools=TOOLS) as stream:
        chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "Let me check. "
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for part in chunk.choices[0].delta.tool_calls or ():
            call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += part.id or ""
            assert part.function is not None
            call["name"] += part.function.name or ""
            call["arguments"] += part.function.arguments or ""
    assert [(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (f"call_{i}", call["name"], call["arguments"]) for i, call in enumerate(CALLS)
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert upstream_request(fake_upstream)["tools"] == TOOLS  # passed through


def test_relay_tool_calls_non_stream(relay_client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script({"tokens": [], "tool_calls": CALLS})
    completion = relay_client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None  # OpenAI's shape for an answer that is only tool calls
    assert choice.message.tool_calls is not None
    calls = [c for c in choice.message.tool_calls if isinstance(c, ChatCompletionMessageFunctionToolCall)]
    assert calls == choice.message.tool_calls  # function calls only
    assert [(c.id, c.type, c.function.name, c.function.arguments) for c in calls] == [
        (f"call_{i}", "function", call["name"], call["arguments"]) for i, call in enumerate(CALLS)
    ]


def test_relay_stream_finish_reason_stop(relay_client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script({"tokens": ["Hello", ", ", "world", "!"]})
    text, chunks = stream_text(relay_client, max_tokens=50)
    assert text == "Hello, world!"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_relay_max_completion_tokens(relay_client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    completion = relay_client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=4)
    assert completion.choices[0].message.content == fake_text(4)
    assert upstream_request(fake_upstream)["max_tokens"] == 4


def test_relay_upstream_rejection_is_an_openai_error(relay_client: openai.OpenAI, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script({"status": 400, "message": "temperature must be at most 2"})
    with pytest.raises(openai.BadRequestError) as info:
        relay_client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=5, stream=True)
    error = info.value.response.json()["error"]
    assert "HTTP 400" in error["message"]  # the upstream's own message stays in the gateway's log
    assert "temperature must be at most 2" not in info.value.response.text
    assert error["code"] == "upstream_rejected"
    assert fake_upstream.stats()["requests"] == 1


@pytest.mark.anyio
async def test_relay_async_client(relay_gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    async with openai.AsyncOpenAI(base_url=relay_gateway.url + "/v1", api_key="x", max_retries=0, timeout=30) as c:
        stream = await c.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=6, stream=True, temperature=0.3
        )
        async with stream:
            text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        completion = await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6)
    assert text == completion.choices[0].message.content == fake_text(6)
    bodies = fake_upstream.stats()["bodies"]
    assert [b["authorization"] for b in bodies] == ["Bearer sk-upstream-secret"] * 2
    assert bodies[0]["temperature"] == 0.3
