"""The fleet-wide resume backend: one Redis Stream per stream, so a client resumes on any replica.

Each flush is one call for every dirty stream of the worker (storage/lua/resume_append.lua, one EVALSHA):
per stream `XADD <prefix><stream id> MAXLEN ~ n * d <bytes>` (one entry per flush, holding whole SSE frames)
and `PEXPIRE <key> <ttl>`. One command instead of a pipeline of two per stream: redis-py packs and parses
every command of a pipeline in Python, which cost more than Redis itself (measured: see the commit); the
command is packed by storage's `run_script` from bytes built here, not argument by argument. The TTL is
renewed by every write, so a stream lives RESUME_TTL_SECONDS after its last event; Redis deletes
it, and neither `expire` nor `sweep` has anything to do. A cursor is the id of the last entry read; XRANGE from the
exclusive `(<id>` returns what was appended after it.

A stream is written once per flush that has its events: every flush for a stream someone reads, once per
RESUME_WRITE_DELAY_SECONDS for one whose client is connected (resume/store.py), so an entry holds all the
frames of that while.

A stream's first entry also holds its owner (field `o`); a read from the start checks it. A first entry
without one (written before owners were recorded, during a rolling upgrade) is a keyless stream's. Stops:
`SET <prefix>stop:<id>` with the log's TTL, then `INCR <prefix>stops`, the fleet's stop bell.

Readers: `<prefix>reader:<id>`, set by a resumed tail every poll; one set where none was is announced by
`XADD <prefix>readers MAXLEN ~ 10000 * s <id>` (storage/lua/resume_reader.lua, one call either way). Each
worker keeps a cursor in that stream and, every tick while it holds logs back, reads the entries after it in
the same call as the stop bell's GET (`bells`: storage/lua/resume_bells.lua, one EVALSHA packed by `run_script`,
not a redis-py pipeline of three commands): it learns which streams have a new reader,
not only that some have, and matches them against its own logs. The readers' stream has no TTL, only its
MAXLEN (~10,000 entries of an id each, about a megabyte at most): a key that expired and came back would
restart its entry ids from the clock, which a worker's cursor may be ahead of; a capped stream's ids only grow.
Each read also takes the newest entry's id: one below the cursor means the key was lost and came back (a Redis
restarted without persistence, an eviction: keep the `gw:rs:` keys out of an `allkeys-*` eviction policy), and
the worker starts again from it, looking up every held-back log's mark once.
A cursor a whole read's batch behind (a worker that held nothing back for a while) is not caught up batch by
batch: it starts again from the newest entry, and those two calls answer None (look up every held-back log's
mark, as on the first call).

Every Redis or socket error leaves this class as `StorageError`; the `ResumeStore` turns it into
"this stream is not resumable" and keeps the stream itself running.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Any, cast

from app.storage.errors import wrap_errors
from app.storage.redis import REDIS_ERRORS, LazyRedis, RedisScripts, load_lua, run_script

DEFAULT_PREFIX = "gw:rs:"
FIELD = b"d"  # the field of an entry that holds the frames of one flush
OWNER_FIELD = b"o"  # the first entry of a stream: its owner
READ_BATCH = 1000  # entries per XRANGE; a longer backlog arrives over several reads
READERS_MAXLEN = 10_000  # announcements of new readers kept (approximately): enough for any worker's tick
READER_FIELD = b"s"  # an announcement's field: the id of the stream with a new reader
WRITE_BATCH = 1000  # streams per append call: bounds how long one call holds Redis
_APPEND = load_lua("resume_append")
_READER = load_lua("resume_reader")
_BELLS = load_lua("resume_bells")


def _entry_id(value: str) -> tuple[int, int]:
    """A Redis Stream entry id (`<ms>-<seq>`) as numbers, to compare two."""
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def redis_resume_errors() -> AbstractContextManager[None]:
    """Redis or socket errors of the resume store and its handovers, as `StorageError`."""
    return wrap_errors("redis resume store", REDIS_ERRORS)


class RedisStreamsBackend:
    """`Backend` over Redis Streams: events survive the instance that produced them."""

    def __init__(
        self, redis: LazyRedis, *, ttl_s: float, prefix: str = DEFAULT_PREFIX, max_entries: int | None = None
    ) -> None:
        if not 0 < ttl_s < math.inf:
            raise ValueError("ttl_s must be positive and finite")
        self.redis = redis
        self.prefix = prefix
        self.ttl_ms = math.ceil(ttl_s * 1000)
        # An entry holds at least one event, so RESUME_MAX_EVENTS entries bound any stream the store
        # still appends to (it stops at that many events); trimming is approximate (`~`), hence cheap.
        self.max_entries = max_entries
        self._scripts = RedisScripts(redis, _APPEND, _READER, _BELLS)
        self._append_head = [b"%d" % self.ttl_ms, b"%d" % max_entries if max_entries else b""]
        self._readers_cursor: str | None = None  # the last announcement of a new reader read (None: not yet)

    def key(self, stream_id: str) -> str:
        return self.prefix + stream_id

    async def write(self, chunks: dict[str, bytes], created: dict[str, str]) -> None:
        items = list(chunks.items())
        with redis_resume_errors():
            client, (append, _, _) = self._scripts.scripts()
            for start in range(0, len(items), WRITE_BATCH):
                keys: list[bytes] = []
                args = self._append_head.copy()
                for stream_id, payload in items[start : start + WRITE_BATCH]:
                    owner = created.get(stream_id)
                    keys.append(self.key(stream_id).encode())
                    args += (payload, b"0", b"") if owner is None else (payload, b"1", owner.encode())
                await run_script(client, append, keys, args)

    async def read(self, stream_id: str, cursor: str, owner: str) -> tuple[bytes, str] | None:
        key = self.key(stream_id)
        with redis_resume_errors():
            pipe = self.redis.client().pipeline(transaction=False)
            pipe.xrange(key, min=f"({cursor}" if cursor else "-", max="+", count=READ_BATCH)
            pipe.exists(key)
            entries, exists = await pipe.execute()
        if not entries:
            return (b"", cursor) if exists else None
        if not cursor and entries[0][1].get(OWNER_FIELD, b"") != owner.encode():
            return None  # someone else's stream reads as an unknown one
        last_id = entries[-1][0]
        return b"".join(fields[FIELD] for _, fields in entries), last_id.decode()

    async def expire(self, stream_id: str) -> None:
        """Nothing to send: a key lives RESUME_TTL_SECONDS after its last write, and the flush that ends a stream
        writes its final event first. (A log that broke earlier ended with its tombstone's write: it is known as
        not resumable for the TTL after that, no longer after the stream's end.) A PEXPIRE per stream saved."""

    async def request_stop(self, stream_id: str, ttl_s: float) -> None:
        with redis_resume_errors():
            pipe = self.redis.client().pipeline(transaction=True)
            pipe.set(self.stop_key(stream_id), b"1", px=math.ceil(ttl_s * 1000))
            pipe.incr(self.bell_key)  # after the mark: a worker that hears the bell finds it
            await pipe.execute()

    @property
    def bell_key(self) -> str:
        return self.prefix + "stops"

    @property
    def readers_key(self) -> str:
        return self.prefix + "readers"

    async def stop_bell(self) -> object:
        with redis_resume_errors():
            return await self.redis.client().get(self.bell_key)

    async def bells(self) -> tuple[object, set[str] | None]:
        cursor = self._readers_cursor
        with redis_resume_errors():
            client, (_, _, bells) = self._scripts.scripts()
            keys = [self.bell_key.encode(), self.readers_key.encode()]
            reply = await run_script(client, bells, keys, [(cursor or "").encode(), b"%d" % READ_BATCH])
        bell, *readers = cast(list[Any], reply)
        if len(readers) != 2:  # the readers' stream could not be read (the stop bell was, all the same)
            return bell, None  # which readers are new is unknown: every held-back log's mark is looked up
        newest_id, entries = readers
        newest = newest_id.decode() if newest_id else "0-0"
        # the cursor moves only here, after a read that succeeded: a failed one is read again on the next call
        if cursor is None or _entry_id(newest) < _entry_id(cursor):
            # the first call (announcements from now on), or the key was lost and came back with ids from a
            # clock behind the cursor (a restarted Redis without persistence): what came before is unknown
            self._readers_cursor = newest
            return bell, None
        if len(entries) == READ_BATCH:
            self._readers_cursor = None  # maybe more behind: start again from the newest on the next call
            return bell, None
        if entries:
            self._readers_cursor = entries[-1][0].decode()
        # an entry is [id, [field, value, ...]]: its one field names the stream with a new reader
        return bell, {fields[1].decode() for _, fields in entries if fields[:1] == [READER_FIELD]}

    def stop_key(self, stream_id: str) -> str:
        return f"{self.prefix}stop:{stream_id}"

    async def stops_requested(self, stream_ids: list[str]) -> set[str]:
        with redis_resume_errors():
            pipe = self.redis.client().pipeline(transaction=False)
            for stream_id in stream_ids:
                pipe.exists(self.stop_key(stream_id))
            found = await pipe.execute()
        return {stream_id for stream_id, exists in zip(stream_ids, found, strict=True) if exists}

    def reader_key(self, stream_id: str) -> str:
        return f"{self.prefix}reader:{stream_id}"

    async def mark_reader(self, stream_id: str, ttl_s: float) -> None:
        keys = [self.reader_key(stream_id).encode(), self.readers_key.encode()]
        args = [b"%d" % math.ceil(ttl_s * 1000), b"%d" % READERS_MAXLEN, stream_id.encode()]
        with redis_resume_errors():
            client, (_, mark, _) = self._scripts.scripts()
            await run_script(client, mark, keys, args)

    async def readers_seen(self, stream_ids: list[str]) -> set[str]:
        with redis_resume_errors():
            pipe = self.redis.client().pipeline(transaction=False)
            for stream_id in stream_ids:
                pipe.exists(self.reader_key(stream_id))
            found = await pipe.execute()
        return {stream_id for stream_id, exists in zip(stream_ids, found, strict=True) if exists}

    async def sweep(self) -> None:
        return None  # Redis expires the keys itself

    async def aclose(self) -> None:
        return None  # the LazyRedis belongs to the worker state; lifespan closes it
