"""Raw-socket clients for the attacks: what a hostile or broken peer sends, byte by byte.

Waits are guards, never assertions: a test waits for the gateway to close the socket (or answer) and
fails only if that has not happened within GUARD_S, far above any deadline the tests configure.
"""

from __future__ import annotations

import base64
import os
import select
import socket
import struct
import time
from collections.abc import Iterable

GUARD_S = 30.0


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=GUARD_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket, guard_s: float = GUARD_S) -> bytes:
    """Everything the gateway sends until it closes the connection; fails if it is still open after the guard."""
    received = bytearray()
    deadline = time.monotonic() + guard_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"the gateway kept the socket open for {guard_s:g}s; got {bytes(received[:200])!r}")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return bytes(received)
        if not chunk:
            return bytes(received)
        received += chunk


def send_until_answered(sock: socket.socket, chunks: Iterable[bytes]) -> bytes:
    """Send `chunks` one by one, stopping as soon as the gateway answers or hangs up; then read to the close."""
    for chunk in chunks:
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            break
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            break
    return read_until_closed(sock)


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


def ws_handshake(path: str, headers: dict[str, str], host: str = "127.0.0.1") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_head(sock: socket.socket) -> bytes:
    """The response head (through the blank line); fails if the gateway closes before sending one."""
    received = b""
    sock.settimeout(GUARD_S)
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(4096)
        assert chunk, f"closed before a response head: {received!r}"
        received += chunk
    return received


def ws_frame_header(length: int, opcode: int = 0x1) -> bytes:
    """A masked client frame header announcing `length` payload bytes (the payload follows separately)."""
    if length < 126:
        size = bytes([0x80 | length])
    elif length < 1 << 16:
        size = bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        size = bytes([0x80 | 127]) + struct.pack("!Q", length)
    return bytes([0x80 | opcode]) + size + b"\x00\x00\x00\x00"  # mask key 0: the payload goes as is


def ws_close_code(data: bytes) -> int | None:
    """The code of the first close frame in server bytes `data` (server frames are unmasked)."""
    while len(data) >= 2:
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        offset = 2
        if length == 126:
            length, offset = struct.unpack("!H", data[2:4])[0], 4
        elif length == 127:
            length, offset = struct.unpack("!Q", data[2:10])[0], 10
        if opcode == 0x8:
            return int(struct.unpack("!H", data[offset : offset + 2])[0]) if length >= 2 else None
        data = data[offset + length :]
    return None
