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

UPSTREAM_BALANCE=round_robin takes the accepting endpoints in turn instead, a cursor per worker: what a naive
router does, kept as the benchmark's baseline (loadtest/bench), not as a recommendation.

Iteration goes straight to the endpoint's stream (`__aiter__` returns it): nothing per token.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from app.errors import UpstreamError
from app.policies.inflight import InFlightTable
from app.upstream.base import ChatRequest, UpstreamStream, UpstreamStreamWrapper
from app.upstream.client import UNREACHABLE, OpenAIStream, OpenAIUpstream
from app.upstream.discovery import Discovery, Endpoint


def _weight(session: str, url: str) -> bytes:
    """Rendezvous hashing: a session ranks endpoints the same way in every worker and replica, and an endpoint
    leaving or joining moves only the sessions that ranked it first."""
    return hashlib.blake2b(f"{session}\0{url}".encode("utf-8", "surrogatepass"), digest_size=8).digest()


class FleetStream(UpstreamStreamWrapper):
    __slots__ = ("_table", "_endpoint")

    def __init__(self, inner: OpenAIStream, table: InFlightTable, endpoint: str) -> None:
        super().__init__(inner)
        self._table = table
        self._endpoint = endpoint

    async def aclose(self) -> None:
        endpoint, self._endpoint = self._endpoint, ""
        try:
            await self._inner.aclose()
        finally:
            if endpoint:  # once, however often it is closed
                self._table.release(endpoint)


class FleetUpstream:
    """OpenAI-compatible model servers found by a `Discovery`, one shared connection pool for all."""

    def __init__(
        self,
        client: OpenAIUpstream,
        discovery: Discovery,
        table: InFlightTable,
        *,
        affinity_load_factor: float,
        round_robin: bool = False,
    ) -> None:
        self.name = client.name  # UPSTREAM_URL's host: one bounded label for the fleet
        self.discovery = discovery
        self._load_factor = affinity_load_factor
        self._round_robin = round_robin  # UPSTREAM_BALANCE=round_robin: the benchmark's baseline
        self._client = client
        self._table = table
        self._clients: dict[str, OpenAIUpstream] = {}

    def _at(self, endpoint: Endpoint) -> OpenAIUpstream:
        client = self._clients.get(endpoint.url)
        if client is None:
            client = self._clients[endpoint.url] = self._client.at(endpoint.url, endpoint.server_name)
        return client

    async def open(
        self, request: ChatRequest, *, max_batch: int, headers: Mapping[str, str] | None = None
    ) -> UpstreamStream:
        endpoints = self.discovery.endpoints()
        accepting = {endpoint.url: endpoint for endpoint in endpoints if endpoint.accepts_new}
        if not accepting:
            detail = f"no upstream endpoint ready ({len(endpoints)} known)"
            raise UpstreamError(UNREACHABLE, kind="connect", detail=detail)
        if len(self._clients) > 2 * len(endpoints):  # endpoints came and went: forget the departed ones' URLs
            known = {endpoint.url for endpoint in endpoints}
            self._clients = {url: client for url, client in self._clients.items() if url in known}
        if request.affinity:  # a session: its endpoints in rendezvous-hash order, the first within the load bound
            order = sorted(accepting, key=lambda url: _weight(request.affinity, url), reverse=True)
            url = self._table.acquire_preferred(order, self._load_factor)
        elif self._round_robin:
            url = self._table.acquire_next(list(accepting))
        else:
            url = self._table.acquire_least(list(accepting))
        try:
            stream = await self._at(accepting[url]).open(request, max_batch=max_batch, headers=headers)
        except BaseException:
            self._table.release(url)
            raise
        return FleetStream(stream, self._table, url)

    async def aclose(self) -> None:
        await self._client.aclose()  # the pool every endpoint's client shares
