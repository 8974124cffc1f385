"""Client-facing wire models: the seed's `/stream` request and OpenAI's chat completion request.

Types are strict: `"max_tokens": "10"` or `"prompt": 5` is a 422, not a silent coercion.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

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


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... pass through

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions`. Unknown sampling options pass through to the upstream."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr = Field(min_length=1, max_length=MODEL_NAME_MAX)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    n: StrictInt = Field(1, ge=1, le=1, description="Only one choice per request is supported.")

    def passthrough_options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})
