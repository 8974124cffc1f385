"""The local resume backend's expiry: files go after the TTL without scanning the directory on the loop."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

from app.resume.local import DirectoryBackend
from app.resume.store import ResumeStore, StreamMeta

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


class FullDisk(DirectoryBackend):
    """The local backend on a disk that fills up once (ENOSPC on one write)."""

    full = False

    async def write(self, chunks: dict[str, bytes], created: dict[str, str]) -> None:
        if self.full:
            self.full = False
            raise OSError(errno.ENOSPC, "No space left on device")
        await super().write(chunks, created)


def _open_on(path: Path) -> int:
    """How many of this process's descriptors are open on `path`."""
    fds = Path("/proc/self/fd")
    found = 0
    for fd in fds.iterdir():
        try:
            found += os.readlink(fd) == str(path)
        except OSError:
            pass  # the directory's own descriptor, closed while listing
    return found


def test_a_stream_that_ends_in_a_failed_flush_gets_its_tombstone_and_no_handle_stays(tmp_path: Path) -> None:
    clock = WallClock()
    backend = FullDisk(str(tmp_path), ttl_s=TTL_S, wall_clock=clock)
    store = ResumeStore(backend, flush_interval_s=60.0, max_events=100, ttl_s=TTL_S)
    path = tmp_path / "s1.sse"

    async def scenario() -> None:
        log = store.open(StreamMeta(stream_id="s1", model="m", messages=[], max_tokens=5))
        log.append(b"id: s1-0\ndata: a\n\n", 1)
        await store.flush()
        assert _open_on(path) == 1  # the producer's handle
        log.append(b"id: s1-1\ndata: b\n\n", 1)
        log.close(b"id: s1-2\ndata: [DONE]\n\n")
        backend.full = True
        await store.flush()  # the stream's last events are lost; its handle is closed
        assert _open_on(path) == 0
        await store.flush()  # the tombstone: the log's last word
        assert b"not_resumable" in path.read_bytes()
        assert _open_on(path) == 0
        _age(path, T0)
        clock.now = T0 + TTL_S + 1
        await backend.sweep()
        assert not path.exists()
        await backend.aclose()

    asyncio.run(scenario())


def _bytes_read() -> int:
    """What this process has read so far (rchar: every read call, page cache or not)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_a_read_of_someone_elses_stream_stops_at_its_owner_line(tmp_path: Path) -> None:
    backend = DirectoryBackend(str(tmp_path), ttl_s=TTL_S)
    events = b"data: x\n\n" * 100_000  # ~1 MB of someone's stream

    async def scenario() -> None:
        await backend.write({"s1": events}, {"s1": "alice"})
        before = _bytes_read()
        assert await backend.read("s1", "", "mallory") is None
        assert await backend.read("s1", "", "") is None
        assert await backend.read("s1", "", "alic") is None
        assert _bytes_read() - before < 64 * 1024  # the owner lines, not the events
        head = len(b"owner:alice\n")
        assert await backend.read("s1", "", "alice") == (events, str(head + len(events)))
        assert await backend.read("s1", str(head + len(events)), "alice") == (b"", str(head + len(events)))
        await backend.aclose()

    asyncio.run(scenario())
