"""A fleet of model servers behind one `Upstream`: each new stream goes to the endpoint with the fewest
streams in flight.

kube-proxy balances connections, not requests, and pooled keep-alive connections pin streams to a
few pods. Here every stream picks: the endpoints its discovery says accept new streams, the one with
the fewest streams in flight instance-wide (policies/inflight.py; random tie-break). A slow endpoint
keeps its streams longer, so it is picked less. The count is taken at the pick and given back once,
when the stream is closed (or its opening failed): `FleetStream.aclose` is the one exit every stream
passes (the relay always closes what it opened).

A request that names a session (ChatRequest.affinity) prefers the endpoints in the session's own order
(rendezvous hashing), taking the first whose load stays within UPSTREAM_AFFINITY_LOAD_FACTOR of the mean:
the model server's prefix cache keeps hitting, and one hot session or a shared system prompt cannot pile
onto one endpoint (consistent hashing with bounded loads).

Health (health.py): a pick considers only endpoints whose breaker grants a permit, takes that endpoint's
permit, and prefers endpoints this request has not tried yet (`ChatRequest.tried_endpoints`: a retry or a
continuation goes elsewhere while it can). The fleet reports every failure on an endpoint itself, at opening
and from its stream, so a refused or reset endpoint is ejected for the whole instance before the error goes
up to the guard's retry (or a continuation), whose next pick already skips it. When no endpoint grants a
permit the answer is the gateway's "circuit open".

Iteration costs one frame per batch (`FleetStream.__anext__` around the endpoint's): the only place an
endpoint's mid-stream failure is sure to be seen. Measured at about 0.25 µs per batch over a pass-through
wrapper (a few tenths of a percent of the gateway's CPU per token). Nothing per token.

UPSTREAM_LOAD_METRICS=vllm: the pick prefers the endpoint with the lowest load its server reports (its queue
and KV-cache usage, scraped every few seconds: load.py, scrape.py), least in flight breaking ties and standing in
for an endpoint whose scrape failed or is stale. A session's bound (above) stays on streams in flight: the
scraped load is per worker and a few seconds old, the bound must hold for every worker at once.

UPSTREAM_BALANCE=round_robin takes the accepting endpoints in turn instead, a cursor per worker: what a naive
router does, kept as the benchmark's baseline (loadtest/bench), not as a recommendation.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping

from app.errors import CircuitOpenError, GatewayError, UpstreamError
from app.policies.breaker import PROBE_BUSY_RETRY_AFTER_SECONDS, BreakerState, Permit
from app.policies.inflight import InFlightTable
from app.upstream.base import Batch, ChatRequest, UpstreamStream, UpstreamStreamWrapper
from app.upstream.client import UNREACHABLE, OpenAIUpstream
from app.upstream.discovery import Discovery, Endpoint, accepting
from app.upstream.failures import charged_client
from app.upstream.health import EndpointHealth
from app.upstream.load import LoadBoard


def _weight(session: str, url: str) -> bytes:
    """Rendezvous hashing: a session ranks endpoints the same way in every worker and replica, and an endpoint
    leaving or joining moves only the sessions that ranked it first."""
    return hashlib.blake2b(f"{session}\0{url}".encode("utf-8", "surrogatepass"), digest_size=8).digest()


class FleetStream(UpstreamStreamWrapper):
    """A stream on one endpoint: gives its in-flight count back once, settles the endpoint's permit at the first
    batch, and reports the endpoint's failures itself (mid-stream too: a wrapper above may continue the stream
    elsewhere, so nothing above is guaranteed to see them), before the error goes up."""

    __slots__ = ("_fleet", "_endpoint", "_permit", "_request", "_counted")

    def __init__(
        self, inner: UpstreamStream, fleet: FleetUpstream, endpoint: str, permit: Permit, request: ChatRequest
    ) -> None:
        super().__init__(inner)
        self._fleet = fleet
        self._endpoint = endpoint
        self._permit: Permit | None = permit  # None once settled (the first batch, or a failure)
        self._request = request
        self._counted = True  # the in-flight count is still held

    def __aiter__(self) -> FleetStream:
        return self

    async def __anext__(self) -> Batch:
        # One frame per batch: the price of seeing this endpoint's failures here (see the module docstring).
        try:
            batch = await self._inner.__anext__()
        except StopAsyncIteration:
            self._settle()  # an empty but clean answer is still healthy
            raise
        except GatewayError as error:
            permit, self._permit = self._permit, None
            self._fleet.health.failed(self._endpoint, error, permit, charged_client(error, self._request))
            raise
        if self._permit is not None:
            self._settle()
        return batch

    def _settle(self) -> None:
        permit, self._permit = self._permit, None
        if permit is not None:
            permit.record_success()

    def mark_failed(self) -> None:
        """Cut for a first-token or inter-token stall: counted against this endpoint."""
        permit, self._permit = self._permit, None
        self._fleet.health.record(self._endpoint, "timeout", permit)

    async def aclose(self) -> None:
        counted, self._counted = self._counted, False
        permit, self._permit = self._permit, None
        try:
            await self._inner.aclose()
        finally:
            if permit is not None:
                permit.release()  # no verdict: the client left before the first batch
            if counted:  # once, however often it is closed
                self._fleet.table.release(self._endpoint)


class FleetUpstream:
    """OpenAI-compatible model servers found by a `Discovery`, one shared connection pool for all."""

    def __init__(
        self,
        client: OpenAIUpstream,
        discovery: Discovery,
        table: InFlightTable,
        health: EndpointHealth,
        *,
        affinity_load_factor: float,
        round_robin: bool = False,
        load: LoadBoard | None = None,
    ) -> None:
        self.name = client.name  # UPSTREAM_URL's host: one bounded label for the fleet
        self.discovery = discovery
        self.health = health
        self.table = table
        self._load_factor = affinity_load_factor
        self._round_robin = round_robin  # UPSTREAM_BALANCE=round_robin: the benchmark's baseline
        self.load = load  # UPSTREAM_LOAD_METRICS: the load the servers report (load.py), else None
        self._client = client
        self._clients: dict[str, OpenAIUpstream] = {}

    def at(self, endpoint: Endpoint) -> OpenAIUpstream:
        """The client of one endpoint (the shared pool)."""
        client = self._clients.get(endpoint.url)
        if client is None:
            client = self._clients[endpoint.url] = self._client.at(endpoint.url, endpoint.server_name)
        return client

    def _accepting(self) -> dict[str, Endpoint]:
        endpoints = self.discovery.endpoints()
        if len(self._clients) > 2 * len(endpoints):  # endpoints came and went: forget the departed ones' URLs
            known = {endpoint.url for endpoint in endpoints}
            self._clients = {url: client for url, client in self._clients.items() if url in known}
        ready = accepting(endpoints)
        if not ready:
            detail = f"no upstream endpoint ready ({len(endpoints)} known)"
            raise UpstreamError(UNREACHABLE, kind="connect", detail=detail)
        return ready

    def _pick(self, request: ChatRequest, candidates: list[str]) -> str:
        """Counted one more stream on the least loaded candidate (a session's: the first within its bound)."""
        if request.affinity:  # a session: its endpoints in rendezvous-hash order, the first within the load bound
            order = sorted(candidates, key=lambda url: _weight(request.affinity, url), reverse=True)
            return self.table.acquire_preferred(order, self._load_factor)
        if self._round_robin:
            return self.table.acquire_next(candidates)
        if self.load is None:
            return self.table.acquire_least(candidates)
        scores = self.load.scores(candidates, self.table.counts(candidates))
        lowest = min(scores)
        url = self.table.acquire_least([url for url, score in zip(candidates, scores, strict=True) if score == lowest])
        self.load.started(url)
        return url

    def retry_at_once(self, request: ChatRequest, longest_wait_s: float) -> bool:
        """Need this request's next attempt not wait its backoff (at most `longest_wait_s`)? It goes to an endpoint
        it has not tried yet; or every endpoint stays open for longer than the wait, so the attempt would be
        refused after it anyway (an endpoint half-open, or whose open period ends within the wait, is worth it)."""
        accepting = list(self._accepting())
        available = self.health.available(accepting)
        if available:
            tried = request.tried_endpoints
            return any(url not in tried for url in available)
        every_open = all(state is BreakerState.OPEN for state in self.health.states(accepting))
        return bool(accepting) and every_open and self.health.retry_after(accepting) > longest_wait_s

    async def open(
        self, request: ChatRequest, *, max_batch: int, headers: Mapping[str, str] | None = None
    ) -> UpstreamStream:
        ready = self._accepting()
        everyone = list(ready)
        tried = request.tried_endpoints
        while True:
            urls = self.health.available(list(ready))
            if not urls:  # every endpoint that accepts new streams is open (or has its one probe out)
                raise CircuitOpenError(self.name, self.health.retry_after(everyone) or PROBE_BUSY_RETRY_AFTER_SECONDS)
            # not one this request already failed on, while there are others
            url = self._pick(request, [url for url in urls if url not in tried] or urls)
            permit = self.health.permit(url)
            if permit is not None:
                break
            self.table.release(url)  # another worker took its half-open probe meanwhile
            del ready[url]
        tried.append(url)
        try:
            stream = await self.at(ready[url]).open(request, max_batch=max_batch, headers=headers)
        except GatewayError as error:
            self.table.release(url)
            self.health.failed(url, error, permit, charged_client(error, request))
            raise
        except asyncio.CancelledError:
            self.table.release(url)
            if request.cut_for_upstream_fault():  # a deadline cut it while this endpoint withheld its answer
                self.health.record(url, "timeout", permit)  # a half-open probe that never answered reopens it
            else:
                permit.release()  # the client left: no verdict
            raise
        except BaseException:
            self.table.release(url)
            permit.release()
            raise
        return FleetStream(stream, self, url, permit, request)

    async def aclose(self) -> None:
        await self._client.aclose()  # the pool every endpoint's client shares
