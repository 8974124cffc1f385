"""A generation whose model server died mid-stream continues through another one (UPSTREAM_CONTINUATION=vllm).

    batch ─► its tokens kept ─► relay ... ─► the stream breaks: its model server died
                                                            (connection reset, closed before the end,
                                                            no connection for the continuation)
                                                                   │ text only, attempts left
                                                                   ▼
    the broken stream closed ─► wrapped upstream's `open`: prompt + the text so far as a partial assistant
    message (`continue_final_message`), the tokens still to produce ─► its batches follow the kept ones

The client sees one answer: no gap (the continuation starts after the last token relayed), no duplicate (it
never repeats one). Through a fleet a continuation goes to whichever endpoint the fleet picks; behind one
UPSTREAM_URL (a Service) a new connection reaches another pod. An open that finds no server (the dead one
offered again) is one more attempt: at most UPSTREAM_CONTINUATION_MAX_ATTEMPTS per stream, each inside the
relay's inter-token deadline (it runs inside the `__anext__` the deadline watches).

Not continued, the original error goes on: a break before the first batch (the guard retries those), an
error the model server sent or garbled data (it is alive: asking again would get the same), a deadline cut
(a cancellation: it goes on up, a continuation being opened counted as failed), and a stream that relayed more
than text (tool calls, a refusal) or left some out (a text-only client: /stream, /ws): a partial assistant
message carries text only.

Cost: per batch one type check, one list extend (references to the token strings the upstream made anyway,
copied in C) and one addition: about 0.2 µs per batch (README, "A model server dies mid-stream"). Every
COMPACT_TOKENS tokens the kept ones are joined into one string, so a long answer is held as its characters
(about 7 bytes per 7-character token), not as an object per token. The text is joined whole only when a
continuation opens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping

from app.errors import GatewayError, StreamTimeoutError, UpstreamError
from app.observability.metrics import UPSTREAM_CONTINUATIONS_TOTAL
from app.upstream.base import Batch, ChatRequest, DeltaBatch, Upstream, UpstreamStream, UpstreamStreamWrapper, Usage
from app.upstream.failures import CONNECT_DEADLINE

logger = logging.getLogger("app.upstream.continuing")
COMPACT_TOKENS = 1024  # kept tokens joined into one string this often: a long answer is held as its characters


def died(error: GatewayError) -> bool:
    """The model server went away (a reset, a response closed before its end, no connection): not an answer it
    gave. An error event, an HTTP status or garbled data come from a server that is alive."""
    if isinstance(error, StreamTimeoutError):
        return error.deadline == CONNECT_DEADLINE
    return isinstance(error, UpstreamError) and error.kind in ("broken", "connect")


class ContinuingStream(UpstreamStreamWrapper):
    __slots__ = (
        "_upstream",
        "_request",
        "_max_batch",
        "_headers",
        "_kept",
        "_text",
        "_tokens",
        "_before",
        "_left",
        "_closed",
    )

    def __init__(
        self,
        upstream: ContinuingUpstream,
        request: ChatRequest,
        max_batch: int,
        headers: Mapping[str, str] | None,
        inner: UpstreamStream,
    ) -> None:
        super().__init__(inner)
        self._upstream = upstream
        self._request = request
        self._max_batch = max_batch
        self._headers = headers
        self._kept: list[str] | None = []  # tokens relayed since the last compaction; None: not continuable
        self._text: list[str] = []  # compacted text, in order
        self._tokens = 0  # tokens relayed by this stream (the request's own continued ones not counted)
        self._before = 0  # of those, relayed before the current inner stream (a continuation) began
        self._left = upstream.max_attempts
        self._closed = False  # the current inner stream was closed (a continuation that failed to open)

    def __aiter__(self) -> ContinuingStream:
        return self

    async def __anext__(self) -> Batch:
        while True:
            try:
                batch = await self._inner.__anext__()
            except GatewayError as error:
                if not self._tokens or self._kept is None or not died(error):
                    raise
                if self._inner.dropped_more_than_text:  # a text-only client was sent part of the answer only
                    raise
                if self._inner.finish_reason is not None:  # the answer had ended; only its end was lost
                    raise StopAsyncIteration from None
                await self._continue(error)
                continue
            kept = self._kept
            if kept is not None:
                if not isinstance(batch, DeltaBatch):
                    kept += batch
                    if len(kept) >= COMPACT_TOKENS:
                        self._text.append("".join(kept))
                        kept.clear()
                else:
                    self._kept = None  # whole deltas (tool calls, a refusal): a partial message cannot carry them
            self._tokens += len(batch)
            return batch

    async def _continue(self, error: GatewayError) -> None:
        """Replace the broken stream with a continuation, or raise `error` (the attempts are used up)."""
        assert self._kept is not None
        request = self._request
        relayed = "".join(self._text) + "".join(self._kept)
        self._text, self._kept = [relayed], []
        # a handed-over stream (streaming/continuation.py) was a continuation already: its text goes first
        done = request.continuation_tokens + self._tokens
        continuation = dataclasses.replace(
            request, continuation_text=request.continuation_text + relayed, continuation_tokens=done
        )
        self._closed = True
        await self._inner.aclose()
        if done >= request.max_tokens:  # every token was relayed; only the end was lost
            self._inner = _Ended(self._inner.usage)
            self._closed = False
            return
        cause: GatewayError | None = None  # the last continuation's failure, chained for the log
        while self._left > 0:
            self._left -= 1
            try:
                inner = await self._upstream.inner.open(continuation, max_batch=self._max_batch, headers=self._headers)
            except asyncio.CancelledError:  # cut while opening (a deadline, the client gone): an outcome too
                UPSTREAM_CONTINUATIONS_TOTAL.labels("failed").inc()
                raise
            except GatewayError as failure:
                UPSTREAM_CONTINUATIONS_TOTAL.labels("failed").inc()
                logger.warning(
                    "continuation failed to open",
                    extra={"error": failure.code, "detail": getattr(failure, "detail", None), "tokens": done},
                )
                cause = failure
                if not died(failure):  # a server that answered (a 4xx: it cannot continue): asking again won't help
                    break
            else:
                UPSTREAM_CONTINUATIONS_TOTAL.labels("continued").inc()
                logger.info("stream continued after its model server died", extra={"tokens": done})
                self._inner, self._closed, self._before = inner, False, self._tokens
                return
        if cause is None:
            raise error
        raise error from cause

    @property
    def usage(self) -> Usage | None:
        usage, before = self._inner.usage, self._before
        if usage is None or not before:
            return usage
        # the continuation's prompt held the text so far; its completion is the rest of the answer
        return Usage(max(0, usage.prompt_tokens - before), usage.completion_tokens + before)

    def mark_failed(self) -> None:
        """A deadline cut: counted against the stream being read. None while a continuation is opening: that
        attempt settles itself on the endpoint it went to (`ChatRequest.cut_for_upstream_fault`), and the broken
        stream before it already reported its own failure."""
        if not self._closed:
            self._inner.mark_failed()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._inner.aclose()


class _Ended:
    """What follows a stream that broke after its last token: nothing (finish_reason "length")."""

    finish_reason = "length"
    dropped_more_than_text = False

    def __init__(self, usage: Usage | None) -> None:
        self.usage = usage

    def __aiter__(self) -> _Ended:
        return self

    async def __anext__(self) -> Batch:
        raise StopAsyncIteration

    def mark_failed(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class ContinuingUpstream:
    """An OpenAI-compatible upstream (one URL or a fleet) whose streams survive their model server's death."""

    def __init__(self, inner: Upstream, *, max_attempts: int) -> None:
        self.inner = inner
        self.max_attempts = max_attempts
        self.name = inner.name

    async def open(
        self, request: ChatRequest, *, max_batch: int, headers: Mapping[str, str] | None = None
    ) -> UpstreamStream:
        stream = await self.inner.open(request, max_batch=max_batch, headers=headers)
        return ContinuingStream(self, request, max_batch, headers, stream)

    async def aclose(self) -> None:
        await self.inner.aclose()
