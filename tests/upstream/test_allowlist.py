"""The allow-list covers everything the official SDK can send, and the image URL guard's cases."""

from __future__ import annotations

import typing

import pytest
from openai.types.chat import chat_completion_assistant_message_param as assistant_param
from openai.types.chat import chat_completion_message_custom_tool_call_param as custom_call_param
from openai.types.chat import chat_completion_message_function_tool_call_param as function_call_param
from openai.types.chat import completion_create_params as params
from openai.types.chat.chat_completion_message_param import ChatCompletionMessageParam
from openai.types.chat.chat_completion_message_tool_call_union_param import ChatCompletionMessageToolCallUnionParam

from app.upstream.allowlist import (
    CALLED_CUSTOM_FIELDS,
    CALLED_FUNCTION_FIELDS,
    DROPPED_FIELDS,
    FORWARDED_FIELDS,
    GATEWAY_FIELDS,
    MESSAGE_DROPPED_FIELDS,
    MESSAGE_FORWARDED_FIELDS,
    TOOL_CALL_FIELDS,
    image_url_problem,
)


def test_every_sdk_request_field_is_forwarded_or_dropped() -> None:
    sdk_fields = set(params.CompletionCreateParamsStreaming.__annotations__) | set(
        params.CompletionCreateParamsNonStreaming.__annotations__
    )
    for base in params.CompletionCreateParamsStreaming.__mro__:
        sdk_fields |= set(getattr(base, "__annotations__", {}))
    sdk_fields.discard("__annotations__")
    assert sdk_fields - (FORWARDED_FIELDS | DROPPED_FIELDS | GATEWAY_FIELDS) == set()
    assert not FORWARDED_FIELDS & DROPPED_FIELDS


def test_every_sdk_message_field_is_forwarded_or_dropped() -> None:
    fields: set[str] = set()
    for message_type in typing.get_args(ChatCompletionMessageParam):
        fields |= set(message_type.__annotations__)
    assert fields - (MESSAGE_FORWARDED_FIELDS | MESSAGE_DROPPED_FIELDS) == set()
    calls = typing.get_args(ChatCompletionMessageToolCallUnionParam)
    assert set().union(*(call.__annotations__ for call in calls)) <= TOOL_CALL_FIELDS
    assert set(function_call_param.Function.__annotations__) == CALLED_FUNCTION_FIELDS
    assert set(custom_call_param.Custom.__annotations__) == CALLED_CUSTOM_FIELDS
    assert set(assistant_param.FunctionCall.__annotations__) == CALLED_FUNCTION_FIELDS


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://images.example.com/cat.png", True),
        ("https://8.8.8.8/x.png", True),
        ("data:image/png;base64,AAAA", True),
        ("http://images.example.com/cat.png", False),
        ("https://169.254.169.254/latest/meta-data/", False),
        ("https://10.0.0.7/x", False),
        ("https://[::1]/x", False),
        ("https://[fe80::1]/x", False),
        ("https://metadata.google.internal/x", False),
        ("https://localhost:8443/x", False),
        ("https:///nohost", False),
        ("https://[::1/x", False),
        ("data:text/html,<script>", False),
        ("ftp://example.com/x.png", False),
        # IPv4 in the forms resolvers read besides dotted quads, and names with the root's trailing dot
        ("https://2130706433/x", False),
        ("https://127.1/x", False),
        ("https://0x7f.1/x", False),
        ("https://0x7f000001/x", False),
        ("https://0177.0.0.1/x", False),
        ("https://10.1/x", False),
        ("https://169.254.43518/x", False),
        ("https://127.0.0.1./x", False),
        ("https://localhost./x", False),
        ("https://LOCALHOST../x", False),
        ("https://metadata.google.internal./x", False),
        ("https://[::ffff:127.0.0.1]/x", False),
        ("https://./x", False),
        ("https://999999999999/x", False),
        ("https://1.2.3.4.5/x", False),
        ("https://images.example.0x1/x", False),
        ("https://134744072/x.png", True),  # 8.8.8.8
        ("https://images.example.com./cat.png", True),
        ("https://cdn1.example.com/cat.png", True),
    ],
)
def test_image_url_guard(url: str, allowed: bool) -> None:
    assert (image_url_problem(url) is None) is allowed
