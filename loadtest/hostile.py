"""Hold N hostile sockets open against a server: idle (connected, nothing sent) or half-open (half a request head).

Run: `python -m loadtest.hostile --port 8000 --sockets 1000 --mode idle`. What an attacker does: every socket the
server closes is opened again at once, so N stay open for as long as the server lets them. Prints JSON lines:
`{"event": "open", ...}` once N are open (or after --open-timeout), then, on SIGTERM or SIGINT,
`{"event": "result", ...}`: how many the server closed, what it answered before closing, and the fewest open
at once after the first report.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field

import uvloop

from loadtest.loadgen import raise_nofile_limit

PARTIAL_HEAD = b"POST /stream HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\nContent-Len"
MODES = ("idle", "partial")
SAMPLE_S = 0.1
CONNECT_BACKOFF_S = 0.2


@dataclass
class Stats:
    open: int = 0
    reported: bool = False
    min_open: int | None = None
    closed_by_server: int = 0
    connect_errors: int = 0
    answers: Counter[str] = field(default_factory=Counter)  # status lines the server sent before closing


async def hold(host: str, port: int, mode: str, address: str, stats: Stats, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=(address, 0))
        except OSError:
            stats.connect_errors += 1
            await asyncio.sleep(CONNECT_BACKOFF_S)
            continue
        if mode == "partial":
            writer.write(PARTIAL_HEAD)
        stats.open += 1
        first = b""
        closed = asyncio.ensure_future(_read_to_eof(reader))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stats.open -= 1
        stopped.cancel()
        if closed.done():
            first = closed.result()
            stats.closed_by_server += 1
            stats.answers[first.split(b"\r\n", 1)[0].decode(errors="replace") or "(nothing)"] += 1
        else:
            closed.cancel()
        writer.close()


async def _read_to_eof(reader: asyncio.StreamReader) -> bytes:
    first = b""
    try:
        while chunk := await reader.read(65536):
            first = first or chunk
    except OSError:
        pass
    return first


async def run(host: str, port: int, sockets: int, mode: str, first_ip: str, open_timeout: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stats = Stats()
    base = int(ipaddress.IPv4Address(first_ip))
    tasks = [
        loop.create_task(hold(host, port, mode, str(ipaddress.IPv4Address(base + i // 200)), stats, stop))
        for i in range(sockets)
    ]
    give_up = loop.time() + open_timeout
    while not stop.is_set():
        if not stats.reported and (stats.open >= sockets or loop.time() > give_up):
            stats.reported = True
            emit({"event": "open", "open": stats.open, "mode": mode})
        if stats.reported:
            stats.min_open = stats.open if stats.min_open is None else min(stats.min_open, stats.open)
        try:
            await asyncio.wait_for(stop.wait(), SAMPLE_S)
        except TimeoutError:
            pass
    await asyncio.gather(*tasks)
    emit(
        {
            "event": "result",
            "mode": mode,
            "sockets": sockets,
            "min_open": stats.min_open,
            "closed_by_server": stats.closed_by_server,
            "connect_errors": stats.connect_errors,
            "answers": dict(stats.answers),
        }
    )


def emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sockets", type=int, default=1000)
    p.add_argument("--mode", choices=MODES, default="idle")
    p.add_argument("--first-ip", default="127.0.3.1", help="source addresses: 200 sockets per loopback address")
    p.add_argument("--open-timeout", type=float, default=30.0, help="report `open` after this long at the latest")
    a = p.parse_args(argv)
    raise_nofile_limit()
    uvloop.run(run(a.host, a.port, a.sockets, a.mode, a.first_ip, a.open_timeout))


if __name__ == "__main__":
    main()
