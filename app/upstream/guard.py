"""Guards an upstream: the circuit breaker around every attempt, and retries before the first token.

    open ─► breaker.allow()? ─no─► CircuitOpenError (503 + Retry-After)
              │ permit
              ▼
           attempt ─► first batch ─► permit.record_success() ─► relay ... ─► mid-stream failure:
              │ connect error / 429 / 5xx / broken before any token         breaker.record_failure()
              ▼
           permit settled (failure; 429: no verdict) ─► retry? (RetryPolicy: kind, attempt, no token
           sent yet) ─► backoff with full jitter, honouring Retry-After ─► next attempt

A retry can happen even after the response headers went out, as long as no token did: the
client only ever saw the opening event. Once relaying, the guard adds nothing per batch: the relay reads the
upstream's own `__anext__` and reports a break itself.

Over a fleet (upstream/fleet.py) the breakers are per endpoint and the fleet takes and settles their permits
(health.py): the guard then has no breaker of its own (its permits count nothing) and keeps the retry policy.
A retry that the fleet can send to an endpoint this request has not tried yet goes at once (failover); only
when none is left does it back off, and not even then when every endpoint stays open for longer than the
backoff could last (the request is refused at once: a wait would only delay the 503).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol

from app.errors import CircuitOpenError, GatewayError, UpstreamError
from app.observability.metrics import CIRCUIT_BREAKER_TRANSITIONS_TOTAL, UPSTREAM_RETRIES_TOTAL
from app.policies.breaker import BreakerState, CircuitBreaker, Permit
from app.policies.retry import ErrorKind, RetryPolicy
from app.upstream.base import Batch, ChatRequest, Upstream, UpstreamStream, UpstreamStreamWrapper
from app.upstream.failures import charged_client, error_kind, waited_for_pool


def _not_cut() -> bool:
    return False


class Failover(Protocol):
    """A fleet, seen from the guard: where the next attempt can go. (An attempt cut while opening the fleet
    settles itself, on the endpoint it went to: `ChatRequest.cut_for_upstream_fault`.)"""

    def retry_at_once(self, request: ChatRequest, longest_wait_s: float) -> bool:
        """The request's next attempt need not wait its backoff (at most `longest_wait_s`): it goes to an endpoint
        it has not tried yet, or to none at all (every endpoint stays open for longer: it is refused at once)."""
        ...


def _settle_failed_attempt(permit: Permit, kind: ErrorKind, client: str | None, error: GatewayError) -> None:
    if kind is ErrorKind.RATE_LIMITED or waited_for_pool(error):
        permit.release()  # alive and said "slow down", or never reached (this worker's pool was full): no verdict
    elif kind is ErrorKind.CLIENT:
        permit.record_success()  # it answered sensibly (any 4xx); the request was at fault
    else:
        permit.record_failure(client)


_UNCOUNTED = Permit.uncounted()


class GuardedStream(UpstreamStreamWrapper):
    __slots__ = (
        "_guard",
        "_request",
        "_max_batch",
        "_headers",
        "_permit",
        "_attempt",
        "_started",
        "_retrying",
        "_cut_for_upstream_fault",
    )

    def __init__(
        self,
        guard: GuardedUpstream,
        request: ChatRequest,
        max_batch: int,
        headers: Mapping[str, str] | None,
        inner: UpstreamStream,
        permit: Permit,
        attempt: int,
        cut_for_upstream_fault: Callable[[], bool],
    ) -> None:
        super().__init__(inner)
        self._guard = guard
        self._cut_for_upstream_fault = cut_for_upstream_fault
        self._request = request
        self._max_batch = max_batch
        self._headers = headers
        self._permit = permit
        self._attempt = attempt
        self._started = False  # a batch went to the relay: no more retries
        self._retrying = False  # the stream failed before its first batch; a retry is opening

    def __aiter__(self) -> GuardedStream:
        return self

    def __anext__(self) -> Coroutine[Any, Any, Batch]:
        # Relaying (every batch but the first): the permit is settled and there is nothing to do per batch, so the
        # relay awaits the upstream's own read, with no await level of the guard's; it reports a break (`broke`).
        if self._started:
            return self._inner.__anext__()
        return self._first_batch()

    def broke(self, error: GatewayError) -> None:
        """Reading this stream raised `error`: a failure after its first batch counts against the upstream (one
        before it was settled by the retry loop already)."""
        if self._started:
            self._guard.broke_mid_stream(charged_client(error, self._request))

    async def _first_batch(self) -> Batch:
        while True:
            try:
                batch = await self._inner.__anext__()
            except StopAsyncIteration:
                if not self._permit.settled:  # an empty but clean answer is still healthy
                    self._guard.judge(self._permit.record_success)
                raise
            except GatewayError as error:
                client = charged_client(error, self._request)
                kind = error_kind(error)
                self._guard.judge(functools.partial(_settle_failed_attempt, self._permit, kind, client, error))
                self._retrying = True  # the failed stream is done with: a cut from here on is the retry's
                await self._inner.aclose()
                self._inner, self._permit, self._attempt = await self._guard.retry(
                    self._request,
                    self._max_batch,
                    self._headers,
                    error,
                    kind,
                    self._attempt,
                    self._cut_for_upstream_fault,
                )
                self._retrying = False
                continue
            self._started = True
            if self._permit.probe:  # only a half-open probe's success can change the state
                self._guard.judge(self._permit.record_success)
            else:
                self._permit.record_success()
            return batch

    def mark_failed(self) -> None:
        """The relay cut this stream for the upstream's fault (a stall): count it against the upstream."""
        if self._retrying:
            return  # cut while a retry was opening: that attempt settled its own permit (`GuardedUpstream._attempt`)
        if self._guard.failover is not None:
            self._inner.mark_failed()  # a fleet: the endpoint's breaker (upstream/fleet.py)
        elif self._started:
            self._guard.broke_mid_stream(None)
        else:
            self._guard.judge(self._permit.record_failure)

    async def aclose(self) -> None:
        self._permit.release()  # no verdict if it was never settled (client left first)
        await self._inner.aclose()


class GuardedUpstream:
    """`breaker`: the upstream's; None over a fleet (`failover`), whose endpoints have a breaker each."""

    def __init__(
        self, inner: Upstream, breaker: CircuitBreaker | None, policy: RetryPolicy, failover: Failover | None = None
    ) -> None:
        if (breaker is None) == (failover is None):
            raise ValueError("a guard has a breaker, or a fleet's failover, not both")
        self.inner = inner
        self.breaker = breaker
        self.policy = policy
        self.failover = failover
        self.name = inner.name

    def judge(self, verdict: Callable[[], object]) -> None:
        """Report to the breaker, counting a state change this worker caused (the state is shared)."""
        if self.breaker is None:
            return  # a fleet: its permits count nothing here
        before = self.breaker.state
        verdict()
        after = self.breaker.state
        if after is not before:
            CIRCUIT_BREAKER_TRANSITIONS_TOTAL.labels(self.name, after.name.lower()).inc()

    def broke_mid_stream(self, client: str | None) -> None:
        """A stream failed after its first batch (a fleet's stream reported it to its endpoint already)."""
        if self.breaker is not None:
            self.judge(functools.partial(self.breaker.record_failure, client=client))

    def _permit(self) -> Permit:
        breaker = self.breaker
        if breaker is None:
            return _UNCOUNTED  # a fleet takes each endpoint's permit, and refuses when all are open
        if breaker.state is BreakerState.CLOSED:  # the common case: allowing changes nothing
            permit = breaker.allow()
        else:
            permits: list[Permit | None] = []
            self.judge(lambda: permits.append(breaker.allow()))  # may move open -> half-open
            permit = permits[0]
        if permit is None:
            raise CircuitOpenError(self.name, breaker.retry_after_seconds())
        return permit

    async def _attempt(
        self,
        request: ChatRequest,
        max_batch: int,
        headers: Mapping[str, str] | None,
        attempt: int,
        cut_for_upstream_fault: Callable[[], bool],
    ) -> tuple[UpstreamStream, Permit, int]:
        while True:
            permit = self._permit()
            try:
                return await self.inner.open(request, max_batch=max_batch, headers=headers), permit, attempt
            except GatewayError as error:
                kind, client = error_kind(error), charged_client(error, request)
                self.judge(functools.partial(_settle_failed_attempt, permit, kind, client, error))
                if not self.policy.should_retry(attempt, kind, tokens_sent=0):
                    raise
                await self._backoff(request, error, kind, attempt)
                attempt += 1
            except asyncio.CancelledError:
                if self.failover is None and cut_for_upstream_fault():
                    self.judge(permit.record_failure)  # a half-open probe that never answered reopens it
                else:
                    permit.release()  # the client left; or a fleet, which settled its endpoint's permit itself
                raise
            except BaseException:
                permit.release()
                raise

    async def _backoff(self, request: ChatRequest, error: GatewayError, kind: ErrorKind, attempt: int) -> None:
        UPSTREAM_RETRIES_TOTAL.labels(kind.value).inc()
        retry_after = error.retry_after_seconds if isinstance(error, UpstreamError) else None
        longest_wait_s = min(self.policy.max_seconds, max(self.policy.backoff_ceiling(attempt), retry_after or 0.0))
        if self.failover is not None and self.failover.retry_at_once(request, longest_wait_s):
            return  # failover: another endpoint takes the next attempt now, or the fleet refuses it now
        await self.policy.wait(attempt, retry_after)

    async def retry(
        self,
        request: ChatRequest,
        max_batch: int,
        headers: Mapping[str, str] | None,
        error: GatewayError,
        kind: ErrorKind,
        attempt: int,
        cut_for_upstream_fault: Callable[[], bool],
    ) -> tuple[UpstreamStream, Permit, int]:
        """After an attempt failed before its first token: back off and open a new one, or re-raise."""
        if not self.policy.should_retry(attempt, kind, tokens_sent=0):
            raise error
        await self._backoff(request, error, kind, attempt)
        return await self._attempt(request, max_batch, headers, attempt + 1, cut_for_upstream_fault)

    async def open(
        self,
        request: ChatRequest,
        *,
        max_batch: int,
        headers: Mapping[str, str] | None = None,
        cut_for_upstream_fault: Callable[[], bool] = _not_cut,
    ) -> GuardedStream:
        """`cut_for_upstream_fault`: asked when an attempt is cancelled (opening, or a retry before the first
        token): was the stream cut for the upstream's fault (a first-token deadline while the upstream still
        withheld its answer)? Then the attempt in flight is a failure, not a client leaving. A cut during a
        retry's backoff settles nothing: no attempt is in flight then."""
        request.cut_for_upstream_fault = cut_for_upstream_fault  # what a fleet (or a continuation) asks too
        inner, permit, attempt = await self._attempt(request, max_batch, headers, 0, cut_for_upstream_fault)
        return GuardedStream(self, request, max_batch, headers, inner, permit, attempt, cut_for_upstream_fault)

    async def aclose(self) -> None:
        await self.inner.aclose()
