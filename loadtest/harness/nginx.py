"""Debian's nginx in front of gateway instances, configured like the chart's Ingress.

The config is rendered from loadtest/nginx.conf.template with the chart's `ingress` values (chart/values.yaml:
timeout, body size): no buffering, long timeouts, HTTP/1.1 keep-alive upstream, WebSocket upgrades, a 503 from
a draining instance retried on the next one. Each rendering has a generation number that nginx answers on
`/__rehearsal/generation`, so a reload is known to be in effect once new connections get the new number.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from loadtest.harness.errors import HarnessError
from loadtest.harness.ports import free_port
from loadtest.harness.process import Child, require_binary, tail
from loadtest.harness.wait import wait_until

ROOT = Path(__file__).resolve().parents[2]
NGINX_TEMPLATE = ROOT / "loadtest" / "nginx.conf.template"
CHART_VALUES = ROOT / "chart" / "values.yaml"  # nginx takes the Ingress' timeout and body size from here
START_TIMEOUT_S = 90.0  # guard only: nginx answering after start
RELOAD_TIMEOUT_S = 20.0  # guard only: nginx answering with the new configuration
BIND_ATTEMPTS = 3  # the port is free when picked; another process may take it before nginx binds


def chart_ingress() -> dict[str, Any]:
    """The chart's `ingress` values (chart/values.yaml): the settings nginx mirrors come from there."""
    import yaml

    values: dict[str, Any] = yaml.safe_load(CHART_VALUES.read_text())
    ingress: dict[str, Any] = values["ingress"]
    return ingress


class Nginx:
    """nginx with its own prefix (config, pid, logs, temp paths), `daemon off`, reloaded with SIGHUP."""

    def __init__(self, prefix: Path, spawn: Callable[..., Child] = Child) -> None:
        self.binary = require_binary("nginx")
        self.prefix = prefix
        self.conf = prefix / "nginx.conf"
        self.spawn = spawn
        self.generation = 0
        self.port = 0
        self.child: Child | None = None
        self.reloads: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def flags(self) -> list[str]:
        """Its own prefix, config and early error log: nothing of the system's nginx setup is read or written."""
        return ["-p", f"{self.prefix}/", "-c", str(self.conf), "-e", str(self.prefix / "error.log")]

    def render(self, servers: Sequence[str]) -> str:
        user = ""
        if os.geteuid() == 0:  # workers would run as nobody, who cannot write to this prefix
            user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
        upstream = "\n".join(f"        server {address} max_fails=1 fail_timeout=10s;" for address in servers)
        ingress = chart_ingress()
        text = NGINX_TEMPLATE.read_text()
        for key, value in {
            "PREFIX": str(self.prefix),
            "PORT": str(self.port),
            "GENERATION": str(self.generation),
            "UPSTREAM_SERVERS": upstream,
            "USER_DIRECTIVE": user,
            "PROXY_TIMEOUT": str(int(ingress["proxyTimeoutSeconds"])),
            "BODY_SIZE": str(ingress["proxyBodySize"]),
        }.items():
            text = text.replace("{{" + key + "}}", value)
        leftover = re.findall(r"\{\{\w+\}\}", text)
        if leftover:
            raise HarnessError(f"nginx template: unknown placeholders {leftover}")
        return text

    def _write(self, servers: Sequence[str]) -> None:
        self.conf.write_text(self.render(servers))
        check = subprocess.run([self.binary, "-t", "-q", *self.flags], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise HarnessError(f"nginx -t refused the configuration:\n{check.stderr}")

    def answering_generation(self) -> int | None:
        try:  # a new connection each time: a kept-alive one could still be served by an old worker
            response = httpx.get(self.url + "/__rehearsal/generation", timeout=2.0, headers={"Connection": "close"})
            return int(response.text.strip()) if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def start(self, servers: Sequence[str]) -> None:
        for _attempt in range(BIND_ATTEMPTS):
            self.port = free_port()
            self.generation = 1
            self._write(servers)
            child = self.child = self.spawn("nginx", [self.binary, *self.flags], log_path=self.prefix / "stdout.log")
            try:
                child.wait_ready(lambda: self.answering_generation() == 1, START_TIMEOUT_S, "nginx")
                return
            except HarnessError:
                child.stop()
                if "Address already in use" not in tail(self.prefix / "error.log"):
                    raise HarnessError(f"nginx did not start:\n{tail(self.prefix / 'error.log')}") from None
        raise HarnessError(f"nginx: no free port after {BIND_ATTEMPTS} attempts")

    def reload(self, servers: Sequence[str], why: str, t0: float) -> float:
        """New upstream list, SIGHUP, and wait until new connections get the new configuration; returns seconds."""
        child = self.child
        assert child is not None
        self.generation += 1
        self._write(servers)
        began = time.monotonic()
        child.send(signal.SIGHUP)
        wanted = self.generation

        def settled() -> bool:  # three new connections in a row answered by the new workers
            return all(self.answering_generation() == wanted for _ in range(3))

        waited = wait_until(
            settled, RELOAD_TIMEOUT_S, f"nginx reload to generation {wanted}", alive=lambda: not child.exited()
        )
        self.reloads.append(
            {
                "generation": wanted,
                "why": why,
                "servers": list(servers),
                "at": round(began - t0, 3),
                "took_s": round(waited, 3),
            }
        )
        return waited
