"""Fake model servers of a fleet: `loadtest/fake_openai.py` processes, each on a socket the test binds."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest

from loadtest import fake_openai
from tests.conftest import ROOT, FakeUpstream, Gateway, _wait_until_up, gateway_running


@contextmanager
def fake_server(
    host: str = "127.0.0.1", port: int = 0, *, tokens_per_second: float = 400, sock: socket.socket | None = None
) -> Iterator[FakeUpstream]:
    """One fake on `host:port` (port 0: the kernel picks), or on `sock` (bound, not yet listening); stopped
    when the block ends."""
    if sock is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    host = sock.getsockname()[0]
    sock.listen(1024)
    sock.set_inheritable(True)
    bound = sock.getsockname()[1]
    proc = subprocess.Popen(
        fake_openai.command(sock.fileno(), tokens_per_second=tokens_per_second),
        cwd=ROOT,
        pass_fds=(sock.fileno(),),
    )
    sock.close()
    url = f"http://{host}:{bound}"
    try:
        _wait_until_up(url, proc, "/_stats")
        fake = FakeUpstream(url=url + "/v1", proc=proc)
        try:
            yield fake
        finally:
            fake.client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def fake_fleet(*specs: dict[str, Any]) -> Iterator[list[FakeUpstream]]:
    """Several fakes; each spec is `fake_server`'s keyword arguments."""
    with ExitStack() as stack:
        yield [stack.enter_context(fake_server(**spec)) for spec in specs]


@contextmanager
def gateway_on_fleet(
    tmp_path_factory: pytest.TempPathFactory, **env: Any
) -> Iterator[tuple[Gateway, list[FakeUpstream]]]:
    """Three idle fakes and a gateway over them (no retries: a test sees each endpoint's own answer), for a module."""
    with fake_fleet({}, {}, {}) as fakes:
        urls = ",".join(fake.url for fake in fakes)
        with gateway_running({"UPSTREAM_URL": urls, "UPSTREAM_RETRIES": 0, **env}, tmp_path_factory) as gateway:
            yield gateway, fakes


def stream_chat(base_url: str, max_tokens: int, client: httpx.Client) -> str:
    """One streamed /v1 chat completion through the gateway, read to its end; the text received."""
    body = {
        "model": "gpt-4o-mini",
        "stream": True,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hi"}],
    }
    with client.stream("POST", base_url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        return response.read().decode()
