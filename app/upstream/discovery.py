"""Where the model servers of a fleet are: one interface, one implementation per source of truth.

A `Discovery` holds the current endpoint set, each endpoint with the conditions Kubernetes gives
(`ready`, `serving`, `terminating`); the fleet (fleet.py) sends new streams only to endpoints that
`accept_new`, and a stream already in flight on an endpoint that left or is terminating finishes
there. Each worker runs its own discovery (started and stopped by the worker's lifespan); the
streams in flight they balance on are counted for the whole instance.

- `StaticDiscovery`: UPSTREAM_URL's comma-separated base URLs, never changing.
- `DnsDiscovery` (dns_discovery.py): every address of UPSTREAM_URL's host (a headless Service), re-resolved.
- `KubernetesDiscovery` (k8s_discovery.py): a watch on the Service's EndpointSlices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import SplitResult, urlunsplit


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One model server: its base URL and its EndpointSlice conditions (static and DNS ones are all ready)."""

    url: str
    # the URL holds a discovered address: the name the server answers to (TLS server name and Host header)
    server_name: str | None = None
    ready: bool = True
    serving: bool = True
    terminating: bool = False

    @property
    def accepts_new(self) -> bool:
        """New streams go here: ready and not on its way out (its streams in flight finish either way)."""
        return self.ready and self.serving and not self.terminating


def accepting(endpoints: Sequence[Endpoint]) -> dict[str, Endpoint]:
    """The endpoints new streams may go to, by URL (in discovery's order)."""
    return {endpoint.url: endpoint for endpoint in endpoints if endpoint.accepts_new}


class Discovery(Protocol):
    def endpoints(self) -> Sequence[Endpoint]:
        """The current endpoint set (empty until the first answer)."""
        ...

    async def start(self) -> None:
        """Learn the first set (or give up on it, logged), then follow changes in the background."""
        ...

    async def aclose(self) -> None: ...


class StaticDiscovery:
    def __init__(self, urls: Sequence[str]) -> None:
        self._endpoints = tuple(Endpoint(url) for url in urls)

    def endpoints(self) -> Sequence[Endpoint]:
        return self._endpoints

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def with_address(parts: SplitResult, address: str, port: int | None) -> str:
    """`parts` (a base URL) with its host replaced by `address`, keeping scheme, port (or `port`) and path."""
    host = f"[{address}]" if ":" in address else address
    port = parts.port if port is None else port
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
