"""What of a client's OpenAI chat completion request may reach the upstream.

The model server trusts the gateway, so the gateway forwards only what OpenAI's chat completion API
defines (the fields of openai-python's `completion_create_params.py` and message param types),
plus the extensions an operator names in UPSTREAM_EXTRA_FIELDS. Anything else is refused with 400
`unknown_parameter` naming the field, so a typo or a server-specific knob (vLLM's `best_of`,
`min_tokens`, `ignore_eos`, `chat_template`, ...) never steers a shared model server silently.

Each OpenAI field is either forwarded or accepted and dropped:

- forwarded: fields that shape the generation itself and that OpenAI-compatible servers implement;
- dropped: OpenAI platform features that mean nothing to a self-hosted model, or that would let one
  tenant act on the operator's account or data when the upstream is OpenAI itself: `store` and
  `metadata` (keep the conversation on the operator's account), `service_tier` (billing),
  `prompt_cache_key` / `prompt_cache_options` / `prompt_cache_retention` (cache routing shared by
  every tenant), `safety_identifier` and `user` (end-user ids chosen by the tenant), `moderation`,
  `web_search_options` (paid tools), `prediction` (billed, unsupported by vLLM), `modalities` and
  `audio` (the gateway relays text only). Dropping them keeps every SDK request valid.

The gateway itself interprets `model`, `messages`, `stream`, `stream_options`, `max_tokens`,
`max_completion_tokens` and `n` (app/routes/bodies.py) and writes its own values of them upstream.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

FORWARDED_FIELDS = frozenset(
    {
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "seed",
        "stop",
        "temperature",
        "top_p",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "functions",
        "function_call",
        "reasoning_effort",
        "verbosity",
    }
)
DROPPED_FIELDS = frozenset(
    {
        "store",
        "metadata",
        "service_tier",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "safety_identifier",
        "user",
        "moderation",
        "web_search_options",
        "prediction",
        "modalities",
        "audio",
    }
)
# Forwarded options that chat templates render into the prompt: they count toward MAX_PROMPT_CHARS (as JSON).
PROMPT_FIELDS = frozenset({"tools", "tool_choice", "functions", "function_call", "response_format"})
GATEWAY_FIELDS = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "n",
    }
)

# Message fields: forwarded, or dropped (`audio` refers to an earlier audio answer; the gateway relays text).
MESSAGE_FORWARDED_FIELDS = frozenset(
    {"role", "content", "name", "tool_call_id", "tool_calls", "function_call", "refusal"}
)
MESSAGE_DROPPED_FIELDS = frozenset({"audio"})
# An assistant message's earlier calls: `tool_calls[]` (function or custom tools) and the deprecated `function_call`.
TOOL_CALL_FIELDS = frozenset({"id", "type", "function", "custom"})
TOOL_CALL_TEXT_FIELDS = frozenset({"id", "type"})  # strings, rendered into the prompt with the call
CALLED_FUNCTION_FIELDS = frozenset({"name", "arguments"})
CALLED_CUSTOM_FIELDS = frozenset({"name", "input"})

# Content parts: text (and an assistant's refusal) always; images when IMAGE_INPUT_ENABLED. Audio and file
# parts are OpenAI's too, but the gateway does not accept them (their payloads bypass every text limit).
TEXT_PART_TYPES = frozenset({"text", "refusal"})
IMAGE_PART_TYPE = "image_url"
KNOWN_PART_TYPES = frozenset({*TEXT_PART_TYPES, IMAGE_PART_TYPE, "input_audio", "file"})
PART_DROPPED_FIELDS = frozenset({"prompt_cache_breakpoint"})
IMAGE_URL_FIELDS = frozenset({"url", "detail"})
IMAGE_DETAILS = frozenset({"auto", "low", "high", "original"})
# A last label like this makes a host an IPv4 address to URL parsers and resolvers (WHATWG URL "ends in a number").
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)", re.IGNORECASE)


def image_url_problem(url: str) -> str | None:
    """Why an image URL may not go to the model server (which would fetch it), or None.

    Only `data:image/...` and `https:` URLs pass, and an https URL must not name a loopback, private,
    link-local or otherwise non-global address literally (the model server's own network, its cloud
    metadata service). Resolvers read IPv4 in more forms than dotted quads (`2130706433`, `127.1`,
    `0x7f.1`, `0177.0.0.1`): any form `inet_aton` reads is checked as the address it names, and a host
    ending in another numeric label is refused. A host *name* is not resolved here: the model server's
    egress policy is the only complete guard against names that resolve inside the network.
    """
    if url.startswith("data:"):
        return None if url.startswith("data:image/") else "a data: URL must hold an image (data:image/...)"
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return "not a valid URL"
    if parts.scheme != "https":
        return "only https: and data: image URLs are accepted"
    host = (host or "").rstrip(".")  # `localhost.` is `localhost` to a resolver
    if not host:
        return "the URL has no host"
    if host == "localhost" or host.endswith((".localhost", ".internal", ".local")):
        return "the URL names a local host"
    address = _address(host)
    if address is not None:
        return None if address.is_global else "the URL names a non-public address"
    if ":" in host or _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
        return "the URL names a malformed address"
    return None


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address `host` names literally, in any form a resolver accepts, or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None
