"""UPSTREAM_DISCOVERY=kubernetes: the model servers are the endpoints of a Service's EndpointSlices, watched.

List the slices labelled `kubernetes.io/service-name=<name>`, then watch from the list's
resourceVersion; each ADDED / MODIFIED / DELETED event replaces or drops one slice, and the endpoint set
is rebuilt from all of them. A watch that ends normally (the server's timeout) is resumed from the last
resourceVersion seen; a watch error (410 Gone: the version is too old; the connection failed; the API
server refused) leads to a re-list after a backoff (full jitter, doubling up to WATCH_BACKOFF_MAX_S).
The set in use stays the last good one meanwhile.

Each endpoint carries its conditions. Kubernetes reads an unset `ready` or `serving` as true and an
unset `terminating` as false. A terminating endpoint (a pod being deleted, still serving its streams)
gets no new streams; its streams in flight finish.

The official client is synchronous (urllib3), so the list/watch loop runs in a thread of its own; it
publishes each new set as one immutable tuple, which the event loop reads without a lock. The client
finds the API server as clients do: in a pod, its ServiceAccount (the chart grants list and watch on
EndpointSlices); elsewhere, KUBECONFIG.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from kubernetes import client, config, watch
from kubernetes.config.config_exception import ConfigException

from app.upstream.discovery import Endpoint, with_address

logger = logging.getLogger("app.upstream.discovery")
SERVICE_LABEL = "kubernetes.io/service-name"
WATCH_TIMEOUT_S = 300  # the API server ends a watch after this; it is resumed from the last resourceVersion
CONNECT_TIMEOUT_S = 5.0
WATCH_BACKOFF_BASE_S = 0.5
WATCH_BACKOFF_MAX_S = 30.0
HTTP_GONE = 410  # the watch's resourceVersion is older than the API server keeps: re-list


def _api() -> client.DiscoveryV1Api:
    try:
        config.load_incluster_config()
    except ConfigException:
        config.load_kube_config()
    return client.DiscoveryV1Api()


def slice_endpoints(obj: dict[str, Any], base_url: str) -> list[Endpoint]:
    """The endpoints of one EndpointSlice (a plain API object), as base URLs with their conditions."""
    parts = urlsplit(base_url)
    ports = [p.get("port") for p in obj.get("ports") or () if p.get("port")]
    port = parts.port if parts.port in ports else (ports[0] if ports else parts.port)
    endpoints = []
    for endpoint in obj.get("endpoints") or ():
        addresses = endpoint.get("addresses") or ()
        if not addresses:
            continue
        conditions = endpoint.get("conditions") or {}
        ready = conditions.get("ready") is not False
        serving = conditions.get("serving", conditions.get("ready")) is not False
        endpoints.append(
            Endpoint(
                with_address(parts, addresses[0], port),  # one endpoint's addresses are one pod's: the first serves
                parts.hostname,
                ready=ready,
                serving=serving,
                terminating=conditions.get("terminating") is True,
            )
        )
    return endpoints


class KubernetesDiscovery:
    def __init__(self, base_url: str, service: str) -> None:
        self._base_url = base_url
        self._namespace, _, self._name = service.partition("/")
        self._endpoints: tuple[Endpoint, ...] = ()
        self._slices: dict[str, list[Endpoint]] = {}
        self._stop = threading.Event()
        self._first = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread: threading.Thread | None = None

    def endpoints(self) -> Sequence[Endpoint]:
        return self._endpoints

    def _publish(self) -> None:
        endpoints = tuple(sorted({e for slice_ in self._slices.values() for e in slice_}, key=lambda e: e.url))
        if endpoints != self._endpoints:
            self._endpoints = endpoints
            logger.info(
                "upstream endpoints changed",
                extra={
                    "service": f"{self._namespace}/{self._name}",
                    "endpoints": len(endpoints),
                    "accepting": sum(e.accepts_new for e in endpoints),
                },
            )

    def _list(self, api: client.DiscoveryV1Api) -> str:
        """Replace every slice with the API server's list; the list's resourceVersion, to watch from."""
        listed = api.list_namespaced_endpoint_slice(
            self._namespace,
            label_selector=f"{SERVICE_LABEL}={self._name}",
            _request_timeout=(CONNECT_TIMEOUT_S, CONNECT_TIMEOUT_S),
        )
        body: dict[str, Any] = api.api_client.sanitize_for_serialization(listed)  # the API's own JSON shape
        self._slices = {item["metadata"]["name"]: slice_endpoints(item, self._base_url) for item in body["items"]}
        self._publish()
        return str(body["metadata"]["resourceVersion"])

    def _follow(self, api: client.DiscoveryV1Api, version: str) -> None:
        """Watch from `version` until the stop, or an error (raised)."""
        while not self._stop.is_set():
            self._watch = watch.Watch()
            for event in self._watch.stream(
                api.list_namespaced_endpoint_slice,
                self._namespace,
                label_selector=f"{SERVICE_LABEL}={self._name}",
                resource_version=version,
                timeout_seconds=WATCH_TIMEOUT_S,
                allow_watch_bookmarks=True,
                _request_timeout=(CONNECT_TIMEOUT_S, WATCH_TIMEOUT_S + CONNECT_TIMEOUT_S),
            ):
                obj = event["raw_object"]
                version = obj["metadata"].get("resourceVersion") or version
                if event["type"] == "BOOKMARK":
                    continue
                name = obj["metadata"]["name"]
                if event["type"] == "DELETED":
                    self._slices.pop(name, None)
                else:  # ADDED, MODIFIED
                    self._slices[name] = slice_endpoints(obj, self._base_url)
                self._publish()
            version = self._watch.resource_version or version

    def _run(self) -> None:
        failures = 0
        api: client.DiscoveryV1Api | None = None
        while not self._stop.is_set():
            try:
                api = api or _api()
                version = self._list(api)
                self._first.set()
                failures = 0
                self._follow(api, version)
            except Exception as exc:  # any failure: re-list after a backoff, with the last good set in use
                if self._stop.is_set():
                    return
                failures += 1
                delay = random.uniform(0, min(WATCH_BACKOFF_MAX_S, WATCH_BACKOFF_BASE_S * 2**failures))
                routine = isinstance(exc, client.ApiException) and exc.status == HTTP_GONE  # history compacted
                logger.log(
                    logging.WARNING if failures == 1 and not routine else logging.INFO,
                    "upstream EndpointSlice watch failed: re-listing",
                    extra={"error": repr(exc)[:500], "endpoints": len(self._endpoints), "retry_in_s": delay},
                )
                self._first.set()  # the first list failed: start without endpoints rather than wait
                self._stop.wait(delay)

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="upstream-endpointslices", daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._first.wait, CONNECT_TIMEOUT_S * 2)  # the first list, or its failure

    async def aclose(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()  # the watch ends at its next event; the thread is a daemon, not waited for
