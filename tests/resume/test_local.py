"""The local resume backend's expiry: files go after the TTL without scanning the directory on the loop."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from app.resume.local import DirectoryBackend

TTL_S = 300.0
T0 = 1_000_000.0  # the backend's wall clock; file mtimes are set to match it


class WallClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def _age(path: Path, mtime: float) -> None:
    os.utime(path, (mtime, mtime))


def test_finished_streams_go_after_the_ttl_and_live_ones_stay(tmp_path: Path) -> None:
    clock = WallClock()
    backend = DirectoryBackend(str(tmp_path), ttl_s=TTL_S, wall_clock=clock)

    async def scenario() -> None:
        await backend.write({"done1": b"data: 1\n\n", "live1": b"data: 2\n\n"}, {"done1": "", "live1": ""})
        await backend.expire("done1")
        _age(tmp_path / "done1.sse", T0)
        _age(tmp_path / "live1.sse", T0)
        clock.now = T0 + TTL_S - 1
        await backend.sweep()
        assert (tmp_path / "done1.sse").exists()  # within its TTL: a client may still replay it
        clock.now = T0 + TTL_S + 1
        await backend.sweep()
        assert not (tmp_path / "done1.sse").exists()
        assert (tmp_path / "live1.sse").exists()  # still being written by this worker
        assert await backend.read("live1", "", "") == (b"data: 2\n\n", "16")  # after its owner line
        await backend.aclose()

    asyncio.run(scenario())


def test_a_reader_mark_touched_again_lives_on(tmp_path: Path) -> None:
    clock = WallClock()
    backend = DirectoryBackend(str(tmp_path), ttl_s=TTL_S, wall_clock=clock)
    mark = tmp_path / "s1.reader"

    async def scenario() -> None:
        await backend.mark_reader("s1", ttl_s=1.5)
        _age(mark, T0)
        clock.now = T0 + TTL_S - 10
        await backend.mark_reader("s1", ttl_s=1.5)  # the reader polls again
        _age(mark, clock.now)
        clock.now = T0 + TTL_S + 1
        await backend.sweep()
        assert mark.exists()  # its TTL counts from the last touch
        clock.now = T0 + 2 * TTL_S
        await backend.sweep()
        assert not mark.exists()

    asyncio.run(scenario())


def test_files_a_crashed_worker_left_are_swept_by_the_rare_full_scan(tmp_path: Path) -> None:
    clock = WallClock()
    orphan, recent = tmp_path / "crashed.sse", tmp_path / "other-worker.sse"
    orphan.write_bytes(b"data: x\n\n")
    recent.write_bytes(b"data: y\n\n")
    _age(orphan, T0 - TTL_S - 1)  # written by a worker that died before expiring it
    _age(recent, T0)
    backend = DirectoryBackend(str(tmp_path), ttl_s=TTL_S, wall_clock=clock)

    async def scenario() -> None:
        await backend.sweep()
        assert orphan.exists()  # no directory scan on every sweep
        clock.now = T0 + TTL_S
        await backend.sweep()  # once per TTL, in a thread beside the flushes
        await backend.aclose()  # waits for that scan
        assert not orphan.exists()
        assert recent.exists()  # another worker's live or recent stream

    asyncio.run(scenario())
