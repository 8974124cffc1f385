"""A small Kubernetes API server for one resource: EndpointSlices, over the real list/watch wire protocol.

An API server cannot run here (no cluster, no etcd). This speaks what the official client reads:

- `GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=...`: an
  `EndpointSliceList` whose `metadata.resourceVersion` is the store's version;
- the same with `watch=1` (`true`): a chunked response of JSON lines `{"type": ADDED|MODIFIED|DELETED,
  "object": EndpointSlice}`, every change after the request's `resourceVersion`, held open until
  `timeoutSeconds` or until the test breaks it: `expire_watches()` ends each open watch with the
  `ERROR` event of a real "410 Gone" (the client must re-list).

Every object served is checked against the Kubernetes schema (kubernetes-validate, strict), so the
test's EndpointSlices are ones a real API server would hold.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate

KUBE_VERSION = "1.35.0"
SERVICE_LABEL = "kubernetes.io/service-name"
GONE = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Failure",
    "code": 410,
    "reason": "Expired",
    "message": "too old resource version",
}


def endpoint_slice(
    namespace: str, service: str, name: str, port: int, endpoints: list[tuple[str, dict[str, bool]]]
) -> dict[str, Any]:
    """An EndpointSlice as the EndpointSlice controller writes it: (address, conditions) per pod."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace, "labels": {SERVICE_LABEL: service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [address],
                "conditions": conditions,
                "targetRef": {"kind": "Pod", "namespace": namespace, "name": f"model-{address.replace('.', '-')}"},
            }
            for address, conditions in endpoints
        ],
    }


READY = {"ready": True, "serving": True, "terminating": False}
TERMINATING = {"ready": False, "serving": True, "terminating": True}


class FakeApiServer:
    def __init__(self, namespace: str, service: str) -> None:
        self.namespace, self.service = namespace, service
        self.version = 100
        self.slices: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[int, str, dict[str, Any]]] = []  # (version, type, object)
        self.lists = 0
        self.watches = 0
        self._changed = threading.Condition()
        self._epoch = 0

    def _stamp(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.version)
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)  # raises on anything a real server refuses
        return obj

    def put(self, obj: dict[str, Any]) -> None:
        """Create or replace a slice: an ADDED or MODIFIED event."""
        with self._changed:
            kind = "MODIFIED" if obj["metadata"]["name"] in self.slices else "ADDED"
            obj = self._stamp(obj)
            self.slices[obj["metadata"]["name"]] = obj
            self.events.append((self.version, kind, obj))
            self._changed.notify_all()

    def put_silently(self, obj: dict[str, Any]) -> None:
        """Change a slice without a watch event (what a watcher misses while disconnected): only a re-list sees it."""
        with self._changed:
            obj = self._stamp(obj)
            self.slices[obj["metadata"]["name"]] = obj

    def delete(self, name: str) -> None:
        with self._changed:
            obj = self.slices.pop(name)
            self.version += 1
            self.events.append((self.version, "DELETED", obj))
            self._changed.notify_all()

    def expire_watches(self) -> None:
        """Every open watch gets `ERROR` 410 Gone and ends; the history before now is gone too."""
        with self._changed:
            self._epoch += 1
            self.events.clear()
            self._changed.notify_all()

    def listing(self) -> dict[str, Any]:
        with self._changed:
            self.lists += 1
            return {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSliceList",
                "metadata": {"resourceVersion": str(self.version)},
                "items": list(self.slices.values()),
            }

    def watch(self, since: int, timeout_s: float) -> Iterator[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            self.watches += 1
            epoch = self._epoch
            if (self.events and since < self.events[0][0] - 1) or (not self.events and since < self.version):
                yield {"type": "ERROR", "object": GONE}  # history not kept that far back
                return
        while True:
            with self._changed:
                while True:
                    if self._epoch != epoch:
                        yield {"type": "ERROR", "object": GONE}
                        return
                    pending = [(v, t, o) for v, t, o in self.events if v > since]
                    left = deadline - time.monotonic()
                    if pending or left <= 0:
                        break
                    self._changed.wait(left)
            if not pending:
                return
            for version, kind, obj in pending:
                since = version
                yield {"type": kind, "object": obj}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api: FakeApiServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return None

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        api = self.server.api  # type: ignore[attr-defined]
        expected = f"/apis/discovery.k8s.io/v1/namespaces/{api.namespace}/endpointslices"
        if parts.path != expected or query.get("labelSelector") != f"{SERVICE_LABEL}={api.service}":
            self._json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})
            return
        if query.get("watch") not in ("1", "true", "True"):
            self._json(200, api.listing())
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for event in api.watch(int(query.get("resourceVersion") or 0), float(query.get("timeoutSeconds") or 60)):
                line = json.dumps(event).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            return

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextmanager
def serving(api: FakeApiServer) -> Iterator[str]:
    """Serve `api` on a loopback port; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.api = api  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        api.expire_watches()
        server.shutdown()
        server.server_close()
