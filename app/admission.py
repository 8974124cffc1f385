"""Admission: who may open a stream, decided before the stream takes anything.

Order (cheapest refusal first; nothing is held until the last step succeeds):

    draining ─► auth (401 none / 403 wrong) ─► client identity ─► rate limit (429 + Retry-After,
    RateLimit headers) ─► circuit open (503 + Retry-After) ─► memory budget (503 memory_pressure)
    ─► [body parsed by the route] ─►
    connection slot: instance-wide, then per client (503)

A resume skips the memory budget (it holds no upstream) and the slot; a stop is only authenticated and
rate limited (draining, an open circuit and the memory budget never keep an owner from stopping a stream).

Client identity is the API key when one is used, otherwise the peer address. Keys come from
`Authorization: Bearer` or `X-API-Key`; a key in an HTTP URL is refused (401), /ws also takes a
`bearer.<key>` subprotocol or `?api_key=` because browsers cannot set its headers. The one header
FORWARDED_HEADER names (X-Forwarded-For or Forwarded; the other is ignored) is believed only when
the peer is in TRUSTED_PROXIES: the client is the rightmost address that is not itself a trusted
proxy, so a forged header from anyone else changes nothing; an entry that is not an IP address
leaves the peer as the identity.
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
    KeyInUrlError,
    MemoryPressureError,
    RateLimitedError,
    UnauthorizedError,
)
from app.observability.redaction import URL_KEY_PARAMETERS
from app.policies.breaker import Circuit
from app.policies.concurrency import LOCAL_ONLY, ClientSlots, ConnectionLimiter, Lease
from app.policies.ratelimit import RateLimiter
from app.storage.errors import StorageError

logger = logging.getLogger("app.admission")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(spec: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip())


def _is_trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def _address(token: str) -> str:
    """One forwarded entry as a normalised IP address (ports and brackets dropped), or "" for anything else:
    "unknown", an obfuscated "_hidden" identifier, junk."""
    address = token.strip().strip('"')
    if address.startswith("["):  # [v6] or [v6]:port
        address = address[1:].split("]", 1)[0]
    elif address.count(":") == 1:  # v4:port
        address = address.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return ""


def forwarded_chain(connection: HTTPConnection, header: str) -> list[str]:
    """Addresses the proxies appended to `header`, oldest first (`x-forwarded-for`, or RFC 7239 `forwarded`
    `for=`); an entry that is not an IP address is kept as an empty string, so it can never become an identity."""
    chain: list[str] = []
    for value in connection.headers.getlist(header):
        for element in value.split(","):
            if header == "x-forwarded-for":
                chain.append(_address(element))
                continue
            for pair in element.split(";"):
                name, _, token = pair.strip().partition("=")
                if name.lower() == "for":
                    chain.append(_address(token))
    return chain


def client_address(connection: HTTPConnection, trusted: tuple[Network, ...], header: str = "x-forwarded-for") -> str:
    """The peer, or (peer in `trusted`) the rightmost address in `header` that is not a trusted proxy.

    Only the configured header is read. An entry that is not an IP address stops the walk and the peer
    is the identity: a client cannot mint identities by sending junk."""
    peer = connection.client.host if connection.client else "unknown"
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    chain = forwarded_chain(connection, header)
    for address in reversed(chain):
        if not address:
            return peer
        if not _is_trusted(address, trusted):
            return address
    return chain[0] if chain and chain[0] else peer


# A key in an HTTP URL (URL_KEY_PARAMETERS) is refused: 401 says where the key belongs. /ws takes
# `api_key`, because browsers cannot set headers on a WebSocket; logs and spans redact it.
WS_QUERY_KEY = "api_key"
WS_SUBPROTOCOL_PREFIX = "bearer."


def header_key(connection: HTTPConnection) -> str | None:
    authorization = connection.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return connection.headers.get("x-api-key") or None


def websocket_key(connection: HTTPConnection) -> str | None:
    """Headers first; then a `bearer.<key>` subprotocol, then `?api_key=` (what a browser can send)."""
    key = header_key(connection)
    if key is not None:
        return key
    for value in connection.headers.getlist("sec-websocket-protocol"):
        for offered in value.split(","):
            offered = offered.strip()
            if offered.startswith(WS_SUBPROTOCOL_PREFIX) and len(offered) > len(WS_SUBPROTOCOL_PREFIX):
                return offered[len(WS_SUBPROTOCOL_PREFIX) :]
    return connection.query_params.get(WS_QUERY_KEY) or None


def presented_key(connection: HTTPConnection) -> str | None:
    """The key this request carries where its protocol allows one; a key in an HTTP URL is refused."""
    if connection.scope["type"] == "websocket":
        return websocket_key(connection)
    for name in URL_KEY_PARAMETERS:
        if name in connection.query_params:
            raise KeyInUrlError(name)
    return header_key(connection)


def stream_owner(key: str) -> str:
    """The owner recorded with a stream: 128 bits of a hash of its API key, never the key."""
    return hashlib.sha256(b"gateway stream owner\0" + key.encode()).hexdigest()[:32]


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
    owner: str = ""  # what its streams are recorded as belonging to: a hash of its API key, "" without keys
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
        forwarded_header: str = "x-forwarded-for",
        rate_limiter: RateLimiter | None,
        breaker: Circuit,
        slots: ConnectionLimiter,
        remote_slots: ClientSlots | None = None,
        lease_ttl_s: float = 300.0,
        memory_pressure: Callable[[], bool] = lambda: False,
    ) -> None:
        self._draining = draining
        self._memory_pressure = memory_pressure
        self._keys = keys
        self._trusted = trusted_proxies
        self._forwarded_header = forwarded_header
        self._rate_limiter = rate_limiter
        self._breaker = breaker
        self._slots = slots
        self._remote_slots = remote_slots
        self._lease_ttl_s = lease_ttl_s

    async def admit(self, connection: HTTPConnection, *, resume: bool = False) -> Ticket:
        """Every check but the slot; raises the refusal. Nothing is held yet.

        A resume (`resume=True`) starts no generation and holds no upstream: the memory budget does not refuse it."""
        if self._draining():
            raise DrainingError()
        ticket = await self._limited(connection)
        retry_after = self._breaker.retry_after_seconds()  # > 0 exactly when allow() would refuse:
        if retry_after > 0:  # open, or half-open with its one probe out
            raise CircuitOpenError(self._breaker.name, retry_after)
        if not resume and self._memory_pressure():
            raise MemoryPressureError("this instance holds its memory budget of buffered stream data; retry shortly")
        return ticket

    async def admit_stop(self, connection: HTTPConnection) -> Ticket:
        """A stop: who asks (the owner) and the rate limit, nothing else. Draining, an open circuit and the memory
        budget are when stopping a generation is needed most, and a stop frees what they guard."""
        return await self._limited(connection)

    async def _limited(self, connection: HTTPConnection) -> Ticket:
        identity, owner = self._identify(connection)
        ticket = Ticket(identity=identity, owner=owner)
        if self._rate_limiter is not None:
            result = await self._rate_limiter.hit(identity)
            ticket.headers = result.headers()
            if not result.allowed:
                raise RateLimitedError(result.retry_after_seconds, ticket.headers)
        return ticket

    def slots_in_use(self) -> int:
        """Slots held in the instance's table right now (all workers; the Redis leases are per client)."""
        return self._slots.active()

    def authenticate(self, connection: HTTPConnection) -> tuple[str, str] | None:
        """With keys set: (the key's identity, the stream owner), or the refusal (401 none or in the URL,
        403 wrong). Without keys: None."""
        if not self._keys:
            return None
        key = presented_key(connection)
        if key is None:
            raise UnauthorizedError()
        if not self._keys.matches(key):
            raise ForbiddenError()
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16], stream_owner(key)  # the key is never kept

    def _identify(self, connection: HTTPConnection) -> tuple[str, str]:
        """(client identity for the limits, stream owner)."""
        found = self.authenticate(connection)
        if found is not None:
            return found
        # Without keys a stream's 128-bit id is the capability: never bound to the address, which a
        # reconnect after a network change does not keep.
        return client_address(connection, self._trusted, self._forwarded_header), ""

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
