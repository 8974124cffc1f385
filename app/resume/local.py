"""The default resume backend: one append-only file per stream in a directory the instance's
workers share (RESUME_DIR, prepared by `python -m app`; an emptyDir in Kubernetes).

Any worker can replay a stream another worker produces, within RESUME_TTL_SECONDS. Files live as
long as the instance's directory: a client can resume on the same instance, not on another one
(that is what the Redis backend is for).

File I/O runs on the event loop, deliberately: appends and reads of a few KB hit the page cache
(the chart mounts a memory-backed emptyDir) and take microseconds, while handing them to a thread
cost every stream ~5 ms of TTFT here (the GIL switch interval, measured with the flusher on/off).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

SUFFIX = ".sse"
READER_SUFFIX = ".reader"  # touched by clients tailing a stream; swept with the stream files


class DirectoryBackend:
    def __init__(self, directory: str, *, ttl_s: float) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ttl_s = ttl_s
        self._fds: dict[str, int] = {}  # streams this worker produces
        self._reader_ttl_s = 5.0  # replaced by the store's own value on the first mark

    def _path(self, stream_id: str) -> Path:
        return self.directory / f"{stream_id}{SUFFIX}"

    def _write_all(self, chunks: dict[str, bytes]) -> None:
        for stream_id, payload in chunks.items():
            fd = self._fds.get(stream_id)
            if fd is None:
                flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
                fd = self._fds[stream_id] = os.open(self._path(stream_id), flags, 0o600)
            os.write(fd, payload)

    async def write(self, chunks: dict[str, bytes]) -> None:
        self._write_all(chunks)

    def _read(self, stream_id: str, cursor: str) -> tuple[bytes, str] | None:
        offset = int(cursor or 0)  # the cursor is a byte offset into the stream's file
        try:
            with open(self._path(stream_id), "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return None
        return data, str(offset + len(data))

    async def read(self, stream_id: str, cursor: str) -> tuple[bytes, str] | None:
        return self._read(stream_id, cursor)

    async def expire(self, stream_id: str) -> None:
        fd = self._fds.pop(stream_id, None)
        if fd is not None:
            os.close(fd)  # the file stays until the sweep finds it older than the TTL

    def _reader_path(self, stream_id: str) -> Path:
        return self.directory / f"{stream_id}{READER_SUFFIX}"

    async def mark_reader(self, stream_id: str, ttl_s: float) -> None:
        # The mark is the file's mtime: fresh for `ttl_s` (checks read it against the same TTL).
        self._reader_path(stream_id).touch()
        self._reader_ttl_s = ttl_s

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

    def _sweep(self) -> None:
        cutoff = time.time() - self.ttl_s  # file mtimes are wall-clock
        for entry in os.scandir(self.directory):
            try:
                if entry.name.endswith(READER_SUFFIX) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                elif entry.name.endswith(SUFFIX) and entry.stat().st_mtime < cutoff:
                    stream_id = entry.name[: -len(SUFFIX)]
                    fd = self._fds.pop(stream_id, None)
                    if fd is not None:
                        os.close(fd)
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass  # another worker swept it first

    async def sweep(self) -> None:
        self._sweep()

    async def aclose(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
