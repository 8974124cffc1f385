"""`DnsDiscovery`: every address of UPSTREAM_URL's host (a headless Service), re-resolved every
UPSTREAM_DNS_REFRESH_SECONDS with an async resolver (dnspython: it can be pointed at a given server, which the
system's getaddrinfo cannot); a failed refresh keeps the last good set. Its own module: dnspython is imported only
when this mode is on (wiring.py), not by every worker's start."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Sequence
from urllib.parse import urlsplit

import dns.asyncresolver
import dns.exception
import dns.resolver

from app.upstream.discovery import Endpoint, with_address

logger = logging.getLogger("app.upstream.discovery")
DNS_TIMEOUT_S = 2.0  # one resolution's budget (both address families), well below any sensible refresh


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class DnsDiscovery:
    """Every A and AAAA address of the base URL's host, as endpoints; refreshed on a period."""

    def __init__(self, base_url: str, *, refresh_s: float, nameserver: str | None = None) -> None:
        self._parts = urlsplit(base_url)
        self._host = self._parts.hostname or ""
        self._refresh_s = refresh_s
        self._resolver = dns.asyncresolver.Resolver(configure=nameserver is None)
        if nameserver is not None:  # "host" or "host:port" (IPv6: "[::1]:5353")
            ns = urlsplit("//" + nameserver)
            self._resolver.nameservers = [ns.hostname or nameserver]
            self._resolver.port = ns.port or 53
        self._resolver.lifetime = DNS_TIMEOUT_S
        self._endpoints: tuple[Endpoint, ...] = ()
        self._failing = False  # a failure is logged once, until a refresh succeeds again
        self._task: asyncio.Task[None] | None = None

    def endpoints(self) -> Sequence[Endpoint]:
        return self._endpoints

    async def _addresses(self) -> list[str]:
        if _is_address(self._host):
            return [self._host]
        found: list[str] = []
        failures: list[Exception] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(self._host, rdtype, search=True)
            except dns.resolver.NoAnswer:
                continue  # the host has no address of this family
            except dns.exception.DNSException as exc:
                failures.append(exc)
                continue
            found += sorted(record.to_text() for record in answer)
        if not found and failures:
            raise failures[0]
        return found

    async def refresh(self) -> None:
        try:
            addresses = await self._addresses()
        except dns.exception.DNSException as exc:
            if not self._failing:
                self._failing = True
                logger.warning(
                    "upstream DNS refresh failed: keeping the last addresses",
                    extra={"host": self._host, "error": repr(exc), "endpoints": len(self._endpoints)},
                )
            return
        if self._failing:
            self._failing = False
            logger.info("upstream DNS refresh succeeds again", extra={"host": self._host})
        if not addresses:  # an empty answer is not a fleet of zero: keep what worked
            return
        name = None if _is_address(self._host) else self._host
        endpoints = tuple(Endpoint(with_address(self._parts, address, None), name) for address in addresses)
        if endpoints != self._endpoints:
            self._endpoints = endpoints
            logger.info("upstream endpoints changed", extra={"host": self._host, "endpoints": len(endpoints)})

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            await self.refresh()

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._follow(), name="upstream-dns")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
