"""The request bodies clients send: the seed's `/stream` request and OpenAI's chat completion request.

Types are strict: `"max_tokens": "10"` or `"prompt": 5` is a 422, not a silent coercion. What of a
chat completion request reaches the upstream is decided by `ChatCompletionRequest.screen` against
the allow-list in app/upstream/allowlist.py: unknown fields are a 400 naming the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)

from app.errors import ContentNotAllowedError, InvalidRequestError, UnknownParameterError
from app.upstream.allowlist import (
    CALLED_CUSTOM_FIELDS,
    CALLED_FUNCTION_FIELDS,
    DROPPED_FIELDS,
    FORWARDED_FIELDS,
    IMAGE_DETAILS,
    IMAGE_PART_TYPE,
    IMAGE_URL_FIELDS,
    KNOWN_PART_TYPES,
    MESSAGE_DROPPED_FIELDS,
    MESSAGE_FORWARDED_FIELDS,
    PART_DROPPED_FIELDS,
    PROMPT_FIELDS,
    TOOL_CALL_FIELDS,
    TOOL_CALL_TEXT_FIELDS,
    image_url_problem,
)

MODEL_NAME_MAX = 256


class StreamRequest(BaseModel):
    """`POST /stream` and the `/ws` request message."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(min_length=1)
    model: StrictStr = Field("gpt-4o-mini", min_length=1, max_length=MODEL_NAME_MAX)
    max_tokens: StrictInt | None = Field(None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must contain non-whitespace text")
        return value


class ChatMessage(BaseModel):
    """One message; fields outside the allow-list are refused by `ChatCompletionRequest.screen`."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[dict[str, Any]] | None = None
    name: StrictStr | None = None
    tool_call_id: StrictStr | None = None
    tool_calls: list[dict[str, Any]] | None = None
    function_call: dict[str, Any] | None = None
    refusal: StrictStr | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = None  # OpenAI's; the gateway's chunks carry no obfuscation


@dataclass(frozen=True, slots=True)
class Screened:
    """What of a chat completion request goes upstream, and how much prompt text it carries."""

    messages: list[dict[str, Any]]
    options: dict[str, Any]
    prompt_chars: int


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions`: OpenAI's fields (typed where the gateway can check them)."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr = Field(min_length=1, max_length=MODEL_NAME_MAX)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    n: StrictInt | None = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    # forwarded sampling and tool options (allowlist.FORWARDED_FIELDS)
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    presence_penalty: StrictFloat | None = None
    seed: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0)
    logit_bias: dict[str, StrictInt] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: StrictStr | dict[str, Any] | None = None
    reasoning_effort: StrictStr | None = None
    verbosity: StrictStr | None = None

    def screen(self, *, extra_fields: frozenset[str], images: bool) -> Screened:
        """The upstream's view of this request; raises the 400 for a field or part it may not carry."""
        options = {name: getattr(self, name) for name in FORWARDED_FIELDS & self.model_fields_set}
        for name, value in (self.model_extra or {}).items():
            if name in extra_fields:
                options[name] = value
            elif name not in DROPPED_FIELDS:
                raise UnknownParameterError(name)
        # tool schemas and response formats reach the model as prompt text too
        chars = sum(
            len(json.dumps(options[name], ensure_ascii=False, separators=(",", ":")))
            for name in PROMPT_FIELDS & options.keys()
        )
        messages = []
        for i, message in enumerate(self.messages):
            forwarded, n = _screen_message(message, f"messages[{i}]", images)
            messages.append(forwarded)
            chars += n
        return Screened(messages=messages, options=options, prompt_chars=chars)


def _screen_message(message: ChatMessage, where: str, images: bool) -> tuple[dict[str, Any], int]:
    for name in message.model_extra or {}:
        if name not in MESSAGE_DROPPED_FIELDS:
            raise UnknownParameterError(f"{where}.{name}")
    forwarded = {name: getattr(message, name) for name in MESSAGE_FORWARDED_FIELDS & message.model_fields_set}
    forwarded["role"] = message.role
    content, chars = message.content, len(message.refusal or "")
    if isinstance(content, str):
        chars += len(content)
    elif content is not None:
        parts = []
        for j, part in enumerate(content):
            screened, n = _screen_part(part, f"{where}.content[{j}]", images)
            parts.append(screened)
            chars += n
        forwarded["content"] = parts
    for k, call in enumerate(message.tool_calls or ()):  # earlier calls are prompt text too
        chars += _screen_call(call, f"{where}.tool_calls[{k}]")
    if message.function_call is not None:
        chars += _screen_fields(message.function_call, CALLED_FUNCTION_FIELDS, f"{where}.function_call")
    return forwarded, chars


def _screen_call(call: dict[str, Any], where: str) -> int:
    _only(call, TOOL_CALL_FIELDS, where)
    chars = 0
    for name in TOOL_CALL_TEXT_FIELDS & call.keys():
        if not isinstance(call[name], str):
            raise InvalidRequestError(f"{where}.{name}: expected a string", param=f"{where}.{name}")
        chars += len(call[name])
    for name, fields in (("function", CALLED_FUNCTION_FIELDS), ("custom", CALLED_CUSTOM_FIELDS)):
        if call.get(name) is not None:
            chars += _screen_fields(call[name], fields, f"{where}.{name}")
    return chars


def _screen_fields(obj: Any, fields: frozenset[str], where: str) -> int:
    """Only `fields`, each a string; returns their length."""
    if not isinstance(obj, dict):
        raise InvalidRequestError(f"{where}: expected an object with {sorted(fields)}", param=where)
    _only(obj, fields, where)
    for name, value in obj.items():
        if not isinstance(value, str):
            raise InvalidRequestError(f"{where}.{name}: expected a string", param=f"{where}.{name}")
    return sum(len(value) for value in obj.values())


def _screen_part(part: dict[str, Any], where: str, images: bool) -> tuple[dict[str, Any], int]:
    kind = part.get("type")
    if not isinstance(kind, str) or kind not in KNOWN_PART_TYPES:
        raise UnknownParameterError(f"{where}.type", f"unknown content part type {str(kind)[:40]!r}")
    if kind in ("text", "refusal"):
        value = part.get(kind)
        if not isinstance(value, str):
            raise UnknownParameterError(f"{where}.{kind}", f"a {kind} part needs a string {kind!r}")
        _only(part, {"type", kind}, where)
        return {"type": kind, kind: value}, len(value)
    if kind != IMAGE_PART_TYPE or not images:
        raise ContentNotAllowedError(
            f"{where}.type",
            f"{kind} content parts are not accepted by this gateway"
            + (" (IMAGE_INPUT_ENABLED is off)" if kind == IMAGE_PART_TYPE else ""),
        )
    _only(part, {"type", IMAGE_PART_TYPE}, where)
    image = part.get(IMAGE_PART_TYPE)
    url = image.get("url") if isinstance(image, dict) else None
    if not isinstance(image, dict) or not isinstance(url, str):
        raise UnknownParameterError(f"{where}.image_url", 'an image_url part needs {"url": "..."}')
    _only(image, IMAGE_URL_FIELDS, f"{where}.image_url")
    detail = image.get("detail")
    if detail is not None and detail not in IMAGE_DETAILS:
        raise ContentNotAllowedError(f"{where}.image_url.detail", f"detail must be one of {sorted(IMAGE_DETAILS)}")
    problem = image_url_problem(url)
    if problem is not None:
        raise ContentNotAllowedError(f"{where}.image_url.url", f"image URL refused: {problem}")
    return {"type": IMAGE_PART_TYPE, IMAGE_PART_TYPE: dict(image)}, len(url)


def _only(obj: dict[str, Any], allowed: frozenset[str] | set[str], where: str) -> None:
    for name in obj:
        if name not in allowed and name not in PART_DROPPED_FIELDS:
            raise UnknownParameterError(f"{where}.{name}")
