"""What a handed-over stream's resume log says about its generation so far (the claimer reads it)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from app.resume.store import Backend, frame_seq, split_events


@dataclass(frozen=True)
class Progress:
    """What a stream's log says about its generation so far."""

    text: str
    tokens: int
    last_seq: int
    final: bool  # it already ended (done or error): nothing to continue


def parse_log(payload: bytes, stream_id: str) -> Progress | None:
    """Reconstruct a generation from its seed frames; None if events are missing or unreadable."""
    parts: list[str] = []
    last = -1
    for frame in split_events(payload):
        try:
            seq = frame_seq(frame, stream_id)
        except (IndexError, ValueError):
            return None
        if seq <= last:
            continue  # a second copy (a claimer that lost its lease wrote on): the first one counts
        if seq != last + 1:
            return None
        last = seq
        data = next((line[6:] for line in frame.split(b"\n") if line.startswith(b"data: ")), b"")
        try:
            event = json.loads(data)
        except ValueError:
            return None
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "token":
            parts.append(str(event.get("content", "")))
        elif kind in ("done", "error"):
            return Progress("".join(parts), len(parts), last, True)
    return Progress("".join(parts), len(parts), last, False)


async def read_log(backend: Backend, stream_id: str, owner: str) -> bytes | None:
    """A stream's whole log, over as many reads as the backend needs; None if it has none."""
    found = await backend.read(stream_id, "", owner)
    if found is None:
        return None
    parts, cursor = [found[0]], found[1]
    while True:
        more = await backend.read(stream_id, cursor, owner)
        if more is None or not more[0]:
            return b"".join(parts)
        parts.append(more[0])
        cursor = more[1]
