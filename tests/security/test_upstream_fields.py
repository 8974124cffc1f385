"""Only known fields reach the upstream: the real gateway relaying the recording fake upstream.

Attacks from issue 12: a tenant steering the shared model server with server-specific knobs
(`best_of`, `min_tokens` above `max_tokens`, `ignore_eos`, `chat_template`), an unknown message
field, an image URL pointing at the cloud metadata address, image parts that escape
MAX_PROMPT_CHARS, and any model name. Each is refused before the upstream sees anything, or
stripped where the allow-list says so; the official SDK's own fields all still work.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionUserMessageParam
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import FakeUpstream, Gateway, GatewayFactory, launch_gateway

V1 = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
USER: ChatCompletionUserMessageParam = {"role": "user", "content": "hello"}


@pytest.fixture(scope="module")
def gateway(fake_upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = launch_gateway(
        {
            "UPSTREAM_URL": fake_upstream_server.url,
            "UPSTREAM_RETRIES": 0,
            "CIRCUIT_FAILURE_THRESHOLD": 1000,
            "UPSTREAM_EXTRA_FIELDS": "top_k,min_p",
        },
        tmp_path_factory.mktemp("gateway") / "gateway.log",
    )
    yield gateway
    gateway.stop()


def chat(gateway: Gateway, **fields: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [USER], "max_tokens": 3, **fields}
    return httpx.post(gateway.url + V1, json=body, timeout=30)


def refused(response: httpx.Response, *, status: int, code: str, param: str) -> str:
    """An OpenAI-shaped refusal naming the field; returns its message."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)
    assert isinstance(error["message"], str)
    return error["message"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("best_of", 50),
        ("min_tokens", 30000),
        ("ignore_eos", True),
        ("chat_template", "{{ secrets }}"),
        ("guided_json", {"type": "object"}),
        ("add_generation_prompt", False),
    ],
)
def test_server_specific_fields_are_refused_by_name(
    gateway: Gateway, fake_upstream: FakeUpstream, field: str, value: Any
) -> None:
    message = refused(chat(gateway, **{field: value}), status=400, code="unknown_parameter", param=field)
    assert field in message and "UPSTREAM_EXTRA_FIELDS" in message
    assert fake_upstream.stats()["requests"] == 0


def test_an_unknown_message_field_is_refused(gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    response = chat(gateway, messages=[{"role": "system", "content": "be brief"}, {**USER, "secret_flag": 1}])
    refused(response, status=400, code="unknown_parameter", param="messages[1].secret_flag")
    part = {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}
    response = chat(gateway, messages=[{"role": "user", "content": [part]}])
    refused(response, status=400, code="unknown_parameter", param="messages[0].content[0].cache_control")
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}", "strict_mode": "off"}}
    response = chat(gateway, messages=[{"role": "assistant", "content": None, "tool_calls": [call]}, USER])
    refused(response, status=400, code="unknown_parameter", param="messages[0].tool_calls[0].function.strict_mode")
    assert fake_upstream.stats()["requests"] == 0


METADATA_URLS = [
    "http://169.254.169.254/latest/meta-data/iam/",
    "https://169.254.169.254/latest/meta-data/",
    "https://[fd00:ec2::254]/latest/",
    "https://127.0.0.1/x.png",
    "https://localhost/x.png",
    "file:///etc/passwd",
    "data:text/plain;base64,aGk=",
]


@pytest.mark.parametrize("url", METADATA_URLS)
def test_image_parts_are_refused_while_images_are_off(gateway: Gateway, fake_upstream: FakeUpstream, url: str) -> None:
    content = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": url}}]
    message = refused(
        chat(gateway, messages=[{"role": "user", "content": content}]),
        status=400,
        code="content_not_allowed",
        param="messages[0].content[1].type",
    )
    assert "IMAGE_INPUT_ENABLED" in message
    assert fake_upstream.stats()["requests"] == 0


@pytest.fixture
def image_gateway(start_gateway: GatewayFactory, fake_upstream: FakeUpstream) -> Gateway:
    return start_gateway(
        UPSTREAM_URL=fake_upstream.url, UPSTREAM_RETRIES=0, IMAGE_INPUT_ENABLED="true", MAX_PROMPT_CHARS=1000
    )


def test_with_images_on_only_public_https_and_data_images_pass(
    image_gateway: Gateway, fake_upstream: FakeUpstream
) -> None:
    for url in METADATA_URLS:
        content = [{"type": "image_url", "image_url": {"url": url}}]
        refused(
            chat(image_gateway, messages=[{"role": "user", "content": content}]),
            status=400,
            code="content_not_allowed",
            param="messages[0].content[0].image_url.url",
        )
    assert fake_upstream.stats()["requests"] == 0
    content = [
        {"type": "text", "text": "compare"},
        {"type": "image_url", "image_url": {"url": "https://images.example.com/a.png", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]
    response = chat(image_gateway, messages=[{"role": "user", "content": content}])
    assert response.status_code == 200, response.text
    (sent,) = fake_upstream.stats()["bodies"]
    assert sent["messages"] == [{"role": "user", "content": content}]


def test_every_text_part_and_image_counts_toward_max_prompt_chars(
    image_gateway: Gateway, fake_upstream: FakeUpstream
) -> None:
    """MAX_PROMPT_CHARS=1000 here: parts are summed, an image's URL (a data: image is its payload) counts."""
    parts = [{"type": "text", "text": "x" * 400} for _ in range(3)]
    response = chat(image_gateway, messages=[{"role": "user", "content": parts}])
    assert response.status_code == 422 and "1200 characters" in response.json()["error"]["message"]
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 2000}}
    response = chat(image_gateway, messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}])
    assert response.status_code == 422, response.text
    assert fake_upstream.stats()["requests"] == 0


def test_tools_and_response_formats_count_toward_max_prompt_chars(
    image_gateway: Gateway, fake_upstream: FakeUpstream
) -> None:
    """MAX_PROMPT_CHARS=1000 here: chat templates render tool schemas, response formats and earlier calls
    into the prompt, so their JSON counts as prompt text."""
    schema = {"type": "object", "properties": {"x": {"type": "string", "description": "é" * 1200}}}
    function = {"name": "f", "description": "look something up", "parameters": schema}
    for fields in (
        {"tools": [{"type": "function", "function": function}]},
        {"functions": [function]},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}},
        {"tool_choice": {"type": "function", "function": {"name": "f" * 1200}}},
        {"function_call": {"name": "f" * 1200}},
    ):
        response = chat(image_gateway, **fields)
        assert response.status_code == 422, (fields.keys(), response.text)
        assert "above this gateway's limit of 1000" in response.json()["error"]["message"]
    call: dict[str, Any] = {"id": "c" * 1200, "type": "function", "function": {"name": "f", "arguments": "{}"}}
    response = chat(image_gateway, messages=[{"role": "assistant", "content": None, "tool_calls": [call]}, USER])
    assert response.status_code == 422 and "above this gateway's limit" in response.json()["error"]["message"]
    for name, value in (("id", {"nested": "x" * 1200}), ("type", ["function"]), ("id", None)):
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}, name: value}
        response = chat(image_gateway, messages=[{"role": "assistant", "content": None, "tool_calls": [call]}, USER])
        refused(response, status=422, code="invalid_request", param=f"messages[0].tool_calls[0].{name}")
    assert fake_upstream.stats()["requests"] == 0
    small = {"type": "function", "function": {**function, "parameters": {"type": "object"}}}
    response = chat(image_gateway, tools=[small], tool_choice="auto")
    assert response.status_code == 200, response.text
    (sent,) = fake_upstream.stats()["bodies"]
    assert sent["tools"] == [small]


def test_audio_and_file_parts_are_not_accepted(gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    for part in (
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "file", "file": {"file_id": "file-abc"}},
    ):
        refused(
            chat(gateway, messages=[{"role": "user", "content": [part]}]),
            status=400,
            code="content_not_allowed",
            param="messages[0].content[0].type",
        )
    refused(
        chat(gateway, messages=[{"role": "user", "content": [{"type": "video", "video": "x"}]}]),
        status=400,
        code="unknown_parameter",
        param="messages[0].content[0].type",
    )
    assert fake_upstream.stats()["requests"] == 0


def test_operator_extensions_pass_and_dropped_fields_stay_home(gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    response = chat(
        gateway,
        top_k=20,
        min_p=0.05,
        temperature=0.2,
        store=True,
        metadata={"tenant": "a"},
        service_tier="priority",
        user="u-1",
        prompt_cache_key="k",
        safety_identifier="s",
        messages=[{**USER, "name": "alice"}],
    )
    assert response.status_code == 200, response.text
    (sent,) = fake_upstream.stats()["bodies"]
    assert (sent["top_k"], sent["min_p"], sent["temperature"]) == (20, 0.05, 0.2)
    assert not {"store", "metadata", "service_tier", "user", "prompt_cache_key", "safety_identifier"} & set(sent)
    assert sent["messages"] == [{**USER, "name": "alice"}]


def test_the_openai_sdk_with_many_optional_fields(gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    """Every field the SDK's `create` takes is accepted; the generation options arrive, the rest is dropped."""
    tools: Any = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    messages: Any = [
        {"role": "developer", "content": "be brief", "name": "ops"},
        {"role": "system", "content": [{"type": "text", "text": "really brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {
            "role": "assistant",
            "content": None,
            "refusal": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        {"role": "assistant", "content": [{"type": "text", "text": "42"}]},
        {"role": "user", "content": "and now?"},
    ]
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0, timeout=30) as client:
        with client.chat.completions.create(
            model=MODEL,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            max_completion_tokens=4,
            temperature=0.5,
            top_p=0.9,
            frequency_penalty=0.1,
            presence_penalty=0.2,
            seed=7,
            stop=["END"],
            logprobs=False,
            top_logprobs=0,
            logit_bias={"50256": -100},
            n=1,
            response_format={"type": "text"},
            tools=tools,
            tool_choice="auto",
            parallel_tool_calls=False,
            reasoning_effort="low",
            verbosity="low",
            store=False,
            metadata={"k": "v"},
            service_tier="auto",
            user="u",
            safety_identifier="sid",
            prompt_cache_key="pck",
            prompt_cache_retention="24h",
            modalities=["text"],
            prediction={"type": "content", "content": "42"},
            web_search_options={"search_context_size": "low"},
        ) as stream:
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "".join(f"tok{i} " for i in range(4))
    (sent,) = fake_upstream.stats()["bodies"]
    forwarded = {
        "temperature": 0.5,
        "top_p": 0.9,
        "frequency_penalty": 0.1,
        "presence_penalty": 0.2,
        "seed": 7,
        "stop": ["END"],
        "logprobs": False,
        "top_logprobs": 0,
        "logit_bias": {"50256": -100},
        "response_format": {"type": "text"},
        "tools": tools,
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning_effort": "low",
        "verbosity": "low",
    }
    assert {k: sent[k] for k in forwarded} == forwarded
    gateway_owned = {"model", "messages", "max_tokens", "stream", "stream_options"}
    assert set(sent) - {"authorization", "traceparent"} == set(forwarded) | gateway_owned
    assert sent["messages"] == messages
    assert sent["max_tokens"] == 4


def test_a_model_outside_models_is_not_found(gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    refused(chat(gateway, model="llama-3-70b-internal"), status=404, code="model_not_found", param="model")
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0, timeout=30) as client:
        with pytest.raises(openai.NotFoundError) as raised:
            client.chat.completions.create(model="llama-3-70b-internal", messages=[USER])
    assert raised.value.code == "model_not_found"
    response = httpx.post(gateway.url + "/stream", json={"prompt": "hi", "model": "llama-3-70b-internal"}, timeout=30)
    assert response.status_code == 422 and response.json()["code"] == "model_not_found"
    with connect(gateway.url.replace("http://", "ws://") + "/ws") as ws:
        ws.send(json.dumps({"prompt": "hi", "model": "llama-3-70b-internal"}))
        event = json.loads(ws.recv(timeout=30))
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
    assert event["code"] == "model_not_found" and ws.close_code == 1007
    assert fake_upstream.stats()["requests"] == 0


def test_empty_models_means_any_model(start_gateway: GatewayFactory, fake_upstream: FakeUpstream) -> None:
    gateway = start_gateway(UPSTREAM_URL=fake_upstream.url, MODELS="")
    assert chat(gateway, model="anything-at-all").status_code == 200
    assert fake_upstream.stats()["bodies"][0]["model"] == "anything-at-all"
    metrics = httpx.get(gateway.metrics_url + "/metrics", timeout=30).text
    assert "anything-at-all" not in metrics  # metric labels stay bounded: every model is "other"
