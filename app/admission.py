"""Admission: who may open a stream, decided before the stream takes anything.

Order (cheapest refusal first; nothing is held until the last step succeeds):

    draining ─► auth (401 none / 403 wrong) ─► client identity ─► rate limit (429 + Retry-After,
    RateLimit headers) ─► circuit open (503 + Retry-After) ─► memory budget (503 memory_pressure)
    ─► [body parsed by the route] ─►
    connection slot: instance-wide, then per client (503)

Client identity is the API key when one is used, otherwise the peer address. X-Forwarded-For and
Forwarded are believed only when the peer is in TRUSTED_PROXIES: the client is the rightmost
address that is not itself a trusted proxy, so a forged header from anyone else changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

from app.errors import (
    CircuitOpenError,
    ConnectionLimitError,
    DrainingError,
    ForbiddenError,
    MemoryPressureError,
    RateLimitedError,
    UnauthorizedError,
)
from app.policies.breaker import CircuitBreaker
from app.policies.concurrency import ConnectionLimiter, Lease
from app.policies.ratelimit import RateLimiter, StorageError
from app.policies.redis_backend import LOCAL_ONLY, ClientSlots

logger = logging.getLogger("app.admission")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_IDENTITY_CHARS = 64  # a forwarded "address" longer than any real one is cut, never stored whole


def parse_networks(spec: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip())


def _is_trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def _forwarded_chain(connection: HTTPConnection) -> list[str]:
    """Addresses the proxies appended, oldest first: X-Forwarded-For, else RFC 7239 Forwarded `for=`."""
    chain: list[str] = []
    for value in connection.headers.getlist("x-forwarded-for"):
        chain.extend(part.strip() for part in value.split(",") if part.strip())
    if chain:
        return chain
    for value in connection.headers.getlist("forwarded"):
        for element in value.split(","):
            for pair in element.split(";"):
                name, _, token = pair.strip().partition("=")
                if name.lower() == "for" and token:
                    address = token.strip('"')
                    if address.startswith("["):  # [v6]:port
                        address = address[1:].split("]", 1)[0]
                    elif address.count(":") == 1:  # v4:port
                        address = address.split(":", 1)[0]
                    if address:  # `for=""`, `for="["`: no address, not an empty identity
                        chain.append(address)
    return chain


def client_address(connection: HTTPConnection, trusted: tuple[Network, ...]) -> str:
    peer = connection.client.host if connection.client else "unknown"
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    chain = _forwarded_chain(connection)
    for address in reversed(chain):
        if not _is_trusted(address, trusted):
            return address[:MAX_IDENTITY_CHARS]
    return chain[0][:MAX_IDENTITY_CHARS] if chain else peer


def presented_key(connection: HTTPConnection) -> str | None:
    authorization = connection.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = connection.headers.get("x-api-key") or connection.query_params.get("api_key")
    return key or None


class KeyRing:
    """Client API keys, compared in constant time (every key is compared, whichever matches)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [key.encode() for key in keys if key]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def matches(self, presented: str) -> bool:
        candidate = presented.encode()
        found = False
        for key in self._keys:
            found |= hmac.compare_digest(candidate, key)
        return found


@dataclass
class Ticket:
    """What an admitted stream holds; `release()` gives it back exactly once."""

    identity: str
    headers: dict[str, str] = field(default_factory=dict)
    lease: Lease | None = None
    remote: tuple[ClientSlots, str] | None = None  # the cross-replica lease, when Redis holds one

    async def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
        remote, self.remote = self.remote, None
        if remote is not None:
            slots, lease_id = remote
            try:
                await slots.release(self.identity, lease_id)
            except StorageError:
                pass  # unreachable Redis: the lease expires with MAX_STREAM_AGE_SECONDS


class Admission:
    def __init__(
        self,
        *,
        draining: Callable[[], bool],
        keys: KeyRing,
        trusted_proxies: tuple[Network, ...],
        rate_limiter: RateLimiter | None,
        breaker: CircuitBreaker,
        slots: ConnectionLimiter,
        remote_slots: ClientSlots | None = None,
        lease_ttl_s: float = 300.0,
        memory_pressure: Callable[[], bool] = lambda: False,
    ) -> None:
        self._draining = draining
        self._memory_pressure = memory_pressure
        self._keys = keys
        self._trusted = trusted_proxies
        self._rate_limiter = rate_limiter
        self._breaker = breaker
        self._slots = slots
        self._remote_slots = remote_slots
        self._lease_ttl_s = lease_ttl_s

    async def admit(self, connection: HTTPConnection) -> Ticket:
        """Every check but the slot; raises the refusal. Nothing is held yet."""
        if self._draining():
            raise DrainingError()
        identity = self._identify(connection)
        ticket = Ticket(identity=identity)
        if self._rate_limiter is not None:
            result = await self._rate_limiter.hit(identity)
            ticket.headers = result.headers()
            if not result.allowed:
                raise RateLimitedError(result.retry_after_seconds, ticket.headers)
        retry_after = self._breaker.retry_after_seconds()  # > 0 exactly when allow() would refuse:
        if retry_after > 0:  # open, or half-open with its one probe out
            raise CircuitOpenError(self._breaker.name, retry_after)
        if self._memory_pressure():
            raise MemoryPressureError("this instance holds its memory budget of buffered stream data; retry shortly")
        return ticket

    def _identify(self, connection: HTTPConnection) -> str:
        if self._keys:
            key = presented_key(connection)
            if key is None:
                raise UnauthorizedError()
            if not self._keys.matches(key):
                raise ForbiddenError()
            return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]  # the key itself is never kept
        return client_address(connection, self._trusted)

    async def take_slot(self, ticket: Ticket) -> None:
        """The last step: an instance-wide and per-client connection slot, released by the stream's end.

        With Redis, the per-client cap also holds across replicas; Redis down: local caps only."""
        lease = self._slots.try_acquire(ticket.identity)
        if lease is None:
            if self._slots.active() >= self._slots.max_total:
                raise ConnectionLimitError(
                    f"this instance carries its maximum of {self._slots.max_total} streams", per_client=False
                )
            raise ConnectionLimitError(
                f"this client already has its maximum of {self._slots.max_per_client} concurrent streams",
                per_client=True,
            )
        ticket.lease = lease
        if self._remote_slots is None:
            return
        limit = self._slots.max_per_client
        try:
            lease_id = await self._remote_slots.try_acquire(ticket.identity, limit, self._lease_ttl_s)
        except BaseException:
            lease.release()
            raise
        if lease_id is None:
            lease.release()
            raise ConnectionLimitError(
                f"this client already has its maximum of {limit} concurrent streams across the fleet", per_client=True
            )
        if lease_id != LOCAL_ONLY:
            ticket.remote = (self._remote_slots, lease_id)
