"""The default resume backend: one append-only file per stream in a directory the instance's
workers share (RESUME_DIR, prepared by `python -m app`; an emptyDir in Kubernetes).

Any worker can replay a stream another worker produces, within RESUME_TTL_SECONDS. Files live as
long as the instance's directory: a client can resume on the same instance, not on another one
(that is what the Redis backend is for).

File I/O runs on the event loop, deliberately: appends and reads of a few KB hit the page cache
and take microseconds, while handing them to a thread cost every stream ~5 ms of TTFT here (the GIL
switch interval, measured with the flusher on/off).

Expiry is incremental: each worker queues the files it is done with (its streams' logs, its readers'
marks) and removes those past the TTL as their time comes. Scanning the directory instead stalled the
event loop for every file of the last TTL (30,000 files at 100 streams/s: ~65 ms, a TTFT p99 spike
every sweep). A full scan, for files a crashed worker left behind, runs once per TTL in a thread.

A stream's file starts with one line naming its owner (`owner:<hash>`, empty without keys); it is
created with O_EXCL and every file is opened with O_NOFOLLOW, in a directory only this user can
enter (app/private_dir.py). Stops: `<id>.stop` marks and the bell `stops.bell`, which grows by one byte
per stop. Readers: `<id>.reader` marks (fresh while their mtime is) and the bell `readers.bell`, one byte
per mark placed where none was fresh (a million stops or resumed tails are a megabyte over the instance's
life). The readers' bell names no stream: a worker that hears it looks up the marks of every log it holds
back (`bells` answers None), a stat each, bounded by the streams of this one instance (one pod).

A stream's file is written once per flush that has its events: every flush for a stream someone reads
from here, once per RESUME_WRITE_DELAY_SECONDS for one whose client is connected (resume/store.py).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from app.private_dir import ensure_private

SUFFIX = ".sse"
READER_SUFFIX = ".reader"  # touched by clients tailing a stream; swept with the stream files
STOP_SUFFIX = ".stop"  # a stop request's mark; swept with the stream files
STOP_BELL = "stops.bell"
READER_BELL = "readers.bell"
_UNHEARD = object()  # the readers' bell before a worker's first `bells`
OWNER_TAG = b"owner:"
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW
APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW  # a tombstone after the stream's fd was closed


class DirectoryBackend:
    def __init__(self, directory: str, *, ttl_s: float, wall_clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(ensure_private(directory))
        self.ttl_s = ttl_s
        self._fds: dict[str, int] = {}  # streams this worker produces
        self._reader_ttl_s = 5.0  # replaced by the store's own value on the first mark
        self._now = wall_clock  # file mtimes are wall-clock
        # (when it may go, file), mostly in that order; one re-queued behind later ones just goes a little late
        self._expiring: deque[tuple[float, Path]] = deque()
        self._marked: set[str] = set()  # streams whose reader mark this worker queued
        self._readers_heard: object = _UNHEARD  # the readers' bell as `bells` last saw it
        self._next_full_scan = wall_clock() + ttl_s
        self._full_scan: asyncio.Task[None] | None = None

    def _path(self, stream_id: str) -> Path:
        return self.directory / f"{stream_id}{SUFFIX}"

    def _write_all(self, chunks: dict[str, bytes], created: dict[str, str]) -> None:
        for stream_id, payload in chunks.items():
            fd = self._fds.get(stream_id)
            if fd is None:
                owner = created.get(stream_id)
                if owner is None:
                    fd = self._fds[stream_id] = os.open(self._path(stream_id), APPEND_FLAGS)
                else:
                    fd = self._fds[stream_id] = os.open(self._path(stream_id), CREATE_FLAGS, 0o600)
                    payload = OWNER_TAG + owner.encode() + b"\n" + payload
            os.write(fd, payload)

    async def write(self, chunks: dict[str, bytes], created: dict[str, str]) -> None:
        self._write_all(chunks, created)

    def _read(self, stream_id: str, cursor: str, owner: str) -> tuple[bytes, str] | None:
        offset = int(cursor or 0)  # the cursor is a byte offset into the stream's file
        try:
            fd = os.open(self._path(stream_id), os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        with open(fd, "rb") as f:
            if not cursor:
                head = OWNER_TAG + owner.encode() + b"\n"
                if f.read(len(head)) != head:
                    return None  # someone else's stream reads as an unknown one, and its events stay unread
                offset = len(head)
            else:
                f.seek(offset)
            data = f.read()
        return data, str(offset + len(data))

    async def read(self, stream_id: str, cursor: str, owner: str) -> tuple[bytes, str] | None:
        return self._read(stream_id, cursor, owner)

    async def request_stop(self, stream_id: str, ttl_s: float) -> None:
        os.close(os.open(self.directory / f"{stream_id}{STOP_SUFFIX}", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        self._expiring.append((self._now() + self.ttl_s, self.directory / f"{stream_id}{STOP_SUFFIX}"))
        self._ring(STOP_BELL)  # after the mark: a worker that hears the bell finds it

    def _ring(self, name: str) -> None:
        bell = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        try:
            os.write(bell, b".")
        finally:
            os.close(bell)

    def _bell(self, name: str) -> object:
        try:
            info = os.stat(self.directory / name, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return info.st_ino, info.st_size

    async def stop_bell(self) -> object:
        return self._bell(STOP_BELL)

    async def bells(self) -> tuple[object, set[str] | None]:
        stops, readers = self._bell(STOP_BELL), self._bell(READER_BELL)
        heard, self._readers_heard = self._readers_heard, readers
        return stops, (set() if readers == heard else None)  # None: which streams, their marks say

    async def stops_requested(self, stream_ids: list[str]) -> set[str]:
        return {sid for sid in stream_ids if os.path.lexists(self.directory / f"{sid}{STOP_SUFFIX}")}

    async def expire(self, stream_id: str) -> None:
        fd = self._fds.pop(stream_id, None)
        if fd is not None:
            os.close(fd)  # the file stays for the TTL
            self._expiring.append((self._now() + self.ttl_s, self._path(stream_id)))

    def _reader_path(self, stream_id: str) -> Path:
        return self.directory / f"{stream_id}{READER_SUFFIX}"

    async def mark_reader(self, stream_id: str, ttl_s: float) -> None:
        # The mark is the file's mtime: fresh for `ttl_s` (checks read it against the same TTL).
        path = self._reader_path(stream_id)
        try:
            fresh = path.stat().st_mtime >= time.time() - ttl_s
        except FileNotFoundError:
            fresh = False
        path.touch()
        self._reader_ttl_s = ttl_s
        if not fresh:
            self._ring(READER_BELL)  # a new reader: after its mark, so a producer that hears the bell finds it
        if stream_id not in self._marked:
            self._marked.add(stream_id)
            self._expiring.append((self._now() + self.ttl_s, path))

    async def readers_seen(self, stream_ids: list[str]) -> set[str]:
        fresh_after = time.time() - self._reader_ttl_s
        seen = set()
        for stream_id in stream_ids:
            try:
                if self._reader_path(stream_id).stat().st_mtime >= fresh_after:
                    seen.add(stream_id)
            except FileNotFoundError:
                pass
        return seen

    def _sweep_due(self) -> None:
        """Remove the queued files whose TTL passed since their last write (or touch)."""
        now = self._now()
        while self._expiring and self._expiring[0][0] <= now:
            _, path = self._expiring.popleft()
            try:
                last_write = path.stat().st_mtime
            except FileNotFoundError:
                last_write = None
            if last_write is not None and last_write + self.ttl_s > now:  # touched again: a reader still marks it
                self._expiring.append((last_write + self.ttl_s, path))
                continue
            if path.suffix == READER_SUFFIX:
                self._marked.discard(path.name[: -len(READER_SUFFIX)])
            if last_write is not None:
                path.unlink(missing_ok=True)

    @staticmethod
    def _sweep_all(directory: Path, cutoff: float, writing: frozenset[str]) -> None:
        """Remove every stale file, whoever wrote it (a crashed worker's queue died with it)."""
        for entry in os.scandir(directory):
            name = entry.name
            if name.endswith(SUFFIX):
                if name[: -len(SUFFIX)] in writing:
                    continue  # a stream this worker still writes
            elif not name.endswith((READER_SUFFIX, STOP_SUFFIX)):
                continue  # not ours
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass  # another worker swept it first

    async def sweep(self) -> None:
        self._sweep_due()
        if self._now() >= self._next_full_scan and (self._full_scan is None or self._full_scan.done()):
            self._next_full_scan = self._now() + self.ttl_s
            # thousands of stats: in a thread, and beside the flushes rather than in their way
            self._full_scan = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self._sweep_all, self.directory, self._now() - self.ttl_s, frozenset(self._fds))
            )

    async def aclose(self) -> None:
        if self._full_scan is not None:
            await self._full_scan
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
