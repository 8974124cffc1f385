"""Gunicorn configuration (`gunicorn -c app/gunicorn_conf.py`): bind, workers, hooks, worker class.

Read by the gunicorn master; every value comes from `Settings`, so the env vars documented in the
README are the only knobs.
"""

from __future__ import annotations

import functools
import gc
import resource
from typing import Any, ClassVar

from uvicorn_worker import UvicornWorker

from app.instance import SharedTables, create_shared
from app.observability.logging import logging_config
from app.protocol import SOCKET_HEADROOM, BoundedHttpProtocol, ReadLimits
from app.settings import Settings

_settings = Settings()


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_limits = ReadLimits(
    read_timeout_s=_settings.request_read_timeout_seconds,
    max_head_bytes=_settings.max_request_head_bytes,
    max_headers=_settings.max_request_headers,
    max_sockets=_settings.max_connections + SOCKET_HEADROOM,
)


def _raise_file_limit(needed: int) -> int:
    """Client sockets, as many upstream connections, and spare descriptors must fit under RLIMIT_NOFILE.

    Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return needed
    soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


class GatewayWorker(UvicornWorker):  # type: ignore[misc]  # untyped base
    """uvloop + the bounded httptools protocol (app/protocol.py), and a graceful-shutdown bound uvicorn-worker
    does not pass through."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        "loop": "uvloop",
        "http": functools.partial(BoundedHttpProtocol, limits=_limits),
        # a larger WebSocket frame is refused (close 1009) from its header, before its payload is read
        "ws_max_size": _settings.max_body_bytes,
        # Client addresses come from app/admission.py, which believes forwarded headers only from
        # TRUSTED_PROXIES; uvicorn's own rewrite would trust 127.0.0.1 (gunicorn's default).
        "proxy_headers": False,
        "lifespan": "on",
        # The app drains before uvicorn starts its own shutdown (app/drain.py), so by then
        # only final writes remain; this bound is what uvicorn waits before cancelling tasks.
        "timeout_graceful_shutdown": _settings.drain_close_grace_seconds,
        "server_header": False,
    }

    def init_process(self) -> None:
        needed = 2 * _limits.max_sockets + 256
        if _raise_file_limit(needed) < needed:
            self.log.warning(
                "open-file limit (RLIMIT_NOFILE) is below the %d descriptors MAX_CONNECTIONS=%d needs "
                "per worker; raise the hard limit",
                needed,
                _settings.max_connections,
            )
        super().init_process()


# Ignored under socket activation (LISTEN_FDS): then the second socket handed over must be METRICS_PORT's.
bind = [_bind_address(_settings.host, _settings.port), _bind_address(_settings.host, _settings.metrics_port)]
workers = _settings.web_concurrency
worker_class = "app.gunicorn_conf.GatewayWorker"
keepalive = int(_settings.keepalive_seconds)
graceful_timeout = _settings.graceful_timeout_seconds
loglevel = _settings.log_level
logconfig_dict = logging_config(_settings.log_level, _settings.log_format)
accesslog = None  # each stream logs one line when it ends; per-request access lines add nothing
proc_name = "streaming-gateway"
# gunicorn 27's control socket lives at one fixed path per user: several instances on one host
# (tests, the rollout rehearsal) would fight over it, and a read-only root filesystem refuses it.
control_socket_disable = True


_shared: list[SharedTables] = []  # the master's handles on the instance-wide tables


def on_starting(server: Any) -> None:
    """In the master, before any fork: the tables every worker counts against (app/instance.py)."""
    _shared.append(create_shared(_settings))


def post_worker_init(worker: Any) -> None:
    """In each worker, once the app is built and before it serves: its objects (modules, the app, settings) live
    as long as the worker, so they go out of the collector's sight. A full collection then walks only what the
    streams hold: over the ~95,000 startup objects it stalled every stream of the worker for 55 ms idle and
    up to ~0.5 s under load on a 2-core VM, a TTFT p99 spike each time."""
    gc.collect()
    gc.freeze()
    worker.log.info("froze %d startup objects out of the garbage collector's sight", gc.get_freeze_count())


def child_exit(server: Any, worker: Any) -> None:
    """A worker exited (crash, restart, shutdown): its slots and live gauges must stop counting."""
    from app.observability.metrics import mark_worker_dead

    for tables in _shared:
        reclaimed = tables.slots.reclaim(worker.pid)
        if reclaimed:
            server.log.warning("reclaimed %d connection slots of dead worker %d", reclaimed, worker.pid)
        tables.buffers.reclaim(worker.pid)  # its buffered bytes no longer count against the memory budget
        tables.inflight.reclaim(worker.pid)  # nor its streams against their upstream endpoints
    mark_worker_dead(worker.pid)
