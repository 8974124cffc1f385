"""The interface every upstream implements, and the normalized request all protocols map to.

An upstream turns a `ChatRequest` into an `UpstreamStream`: an async iterator of *batches*: text
deltas, or whole delta objects (`DeltaBatch`) when the request asks for them (`full_deltas`). A batch
holds every delta that was already waiting when the relay asked (one network read, or every mock
token that is due), so the relay writes it to the client in one go.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

# What the OpenAI-compatible client (client.py, aiohttp) buffers of a response the relay is not reading (a client
# that does not read): it stops reading the socket at twice its read buffer (2 x 64 KiB by default). Counted by the
# memory budget.
READ_AHEAD_BYTES = 2 * 2**16


@dataclass(slots=True)
class ChatRequest:
    """What the client asked for, independent of the protocol it used."""

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int
    # OpenAI sampling options passed through verbatim to an OpenAI-compatible upstream.
    options: dict[str, Any] = field(default_factory=dict)
    # A handed-over generation continues after what was already produced (streaming/continuation.py):
    # `max_tokens` stays the stream's total; the upstream produces the rest.
    continuation_text: str = ""
    continuation_tokens: int = 0
    # The client speaks OpenAI (/v1): deltas that carry more than text (tool calls, a refusal) reach it
    # whole, as a `DeltaBatch`. The seed protocol has no place for them: text only.
    full_deltas: bool = False
    # Who asked (the admission identity): failures this request's content can cause are charged to it,
    # capped per client, so one tenant cannot open the circuit for all (upstream/guard.py). Empty: nobody.
    client: str = ""
    # The session it belongs to (a fleet's endpoint affinity: its streams prefer one endpoint). Empty: none.
    affinity: str = ""
    # A fleet's endpoints this request's attempts went to, in order (upstream/fleet.py appends at each pick): a
    # retry or a continuation goes to another one while there is another.
    tried_endpoints: list[str] = field(default_factory=list)
    # Asked when an attempt to open is cancelled: was it cut for the upstream's fault (a first-token or an
    # inter-token deadline while the model server withheld its answer)? Then that attempt counts as failed, not
    # as a client leaving. The guard sets it (upstream/guard.py); the fleet settles the attempt's permit by it.
    cut_for_upstream_fault: Callable[[], bool] = field(default=lambda: False)

    @property
    def prompt_text(self) -> str:
        return "\n".join(_content_text(m.get("content")) for m in self.messages)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class DeltaBatch(list[dict[str, Any]]):
    """A batch of whole OpenAI `delta` objects (role left out), in order: what an upstream yields instead
    of a list of texts when a delta carries more than text and the request asked for `full_deltas`.
    Plain-text batches stay lists of `str`, so the common path pays one type check per batch."""


Batch = list[str] | DeltaBatch  # what an upstream yields per read: texts, or whole deltas (see above)


def utf8_len(text: str) -> int:
    """The UTF-8 size of `text`; ASCII (nearly every token) is measured without encoding it."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def texts_bytes(texts: list[str]) -> int:
    """The UTF-8 size of a batch of texts (what the memory budget counts)."""
    return sum(map(utf8_len, texts))


def batch_texts(batch: Batch) -> list[str]:
    """The text of a batch, for consumers that relay text only (the seed protocol, handover)."""
    if isinstance(batch, DeltaBatch):
        return [text for delta in batch if (text := delta.get("content"))]
    return batch


class UpstreamStream(Protocol):
    """One open generation. Iterate for batches (texts, or whole deltas); always `aclose()` it."""

    @property
    def finish_reason(self) -> str | None:
        """ "stop" | "length" once the stream ended normally."""
        ...

    @property
    def usage(self) -> Usage | None:
        """Token counts, when the upstream reports them."""
        ...

    @property
    def dropped_more_than_text(self) -> bool:
        """True once it left out a delta that carried more than text (tool calls, a refusal) for a client that
        takes text only (`ChatRequest.full_deltas` False): the text relayed is not the whole answer so far, so
        it cannot be continued as a partial message (upstream/continuing.py)."""
        ...

    def __aiter__(self) -> AsyncIterator[Batch]: ...

    async def __anext__(self) -> Batch: ...

    def mark_failed(self) -> None:
        """The relay cut the stream for the upstream's fault (a deadline): health accounting hook."""
        ...

    async def aclose(self) -> None: ...


class UpstreamStreamWrapper:
    """An `UpstreamStream` around another one: every operation goes to the wrapped stream; a subclass
    overrides only what it changes. `__aiter__` hands out the wrapped stream's iterator, so a wrapper that
    leaves iteration alone adds nothing per batch."""

    __slots__ = ("_inner",)

    def __init__(self, inner: UpstreamStream) -> None:
        self._inner = inner

    @property
    def finish_reason(self) -> str | None:
        return self._inner.finish_reason

    @property
    def usage(self) -> Usage | None:
        return self._inner.usage

    @property
    def dropped_more_than_text(self) -> bool:
        return self._inner.dropped_more_than_text

    def __aiter__(self) -> AsyncIterator[Batch]:
        return self._inner.__aiter__()

    async def __anext__(self) -> Batch:
        return await self._inner.__anext__()

    def mark_failed(self) -> None:
        self._inner.mark_failed()

    async def aclose(self) -> None:
        await self._inner.aclose()


class Upstream(Protocol):
    """A model server. `open` raises `GatewayError`s (connect failure, refusal) before any token."""

    name: str  # bounded label value for metrics ("mock" or the upstream host)

    async def open(
        self, request: ChatRequest, *, max_batch: int, headers: Mapping[str, str] | None = None
    ) -> UpstreamStream:
        """Start a generation; `headers` (trace context) go on the upstream request where there is one."""
        ...

    async def aclose(self) -> None: ...
