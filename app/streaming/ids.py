"""Stream ids: 128 random bits from `secrets`, and the one format check every entry point runs.

Without API keys a stream id is the capability to read (and stop) its stream, so it carries no
pid, counter or clock, and ids of consecutive streams share nothing. An id from a client is checked
against the format before any store sees it: it names a file in the local store and a key in Redis.
"""

from __future__ import annotations

import re
import secrets

STREAM_ID_BYTES = 16  # 128 bits
STREAM_ID_FORMAT = re.compile(r"[0-9a-f]{32}")  # token_hex(16)


def new_stream_id() -> str:
    return secrets.token_hex(STREAM_ID_BYTES)


def is_stream_id(value: str) -> bool:
    return STREAM_ID_FORMAT.fullmatch(value) is not None
