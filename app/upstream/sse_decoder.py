"""Incremental Server-Sent Events decoder for upstream streams (WHATWG HTML §9.2.6).

Bytes arrive in arbitrary pieces: a line may be split across reads, a CRLF may be split between
its CR and LF, and a multi-byte UTF-8 character may be split anywhere. We split on bytes and
decode only complete lines, so none of those splits can corrupt text.
"""

from __future__ import annotations

MAX_LINE_BYTES = 4 * 1024 * 1024  # an upstream line longer than this is a broken upstream, not a token
UTF8_BOM = b"\xef\xbb\xbf"


class SSEDecodeError(ValueError):
    """The upstream sent something that is not a sane event stream."""


class SSEDecoder:
    """Feed bytes, get the `data` payloads of every event completed by them."""

    __slots__ = ("_tail", "_data", "_skip_lf", "_started")

    def __init__(self) -> None:
        self._tail = b""
        self._data: list[str] = []
        self._skip_lf = False  # the previous piece ended in CR: a leading LF is its other half
        self._started = False

    def feed(self, piece: bytes) -> list[str]:
        if not piece:
            return []
        if not self._started:  # the spec lets a stream begin with a byte order mark, maybe split across reads
            piece = self._tail + piece
            self._tail = b""
            if len(piece) < len(UTF8_BOM) and UTF8_BOM.startswith(piece):
                self._tail = piece  # too short to tell yet
                return []
            self._started = True
            if piece.startswith(UTF8_BOM):
                piece = piece[len(UTF8_BOM) :]
            if not piece:
                return []
        if self._skip_lf and piece[:1] == b"\n":
            piece = piece[1:]
        self._skip_lf = piece[-1:] == b"\r"
        if b"\r" in piece:
            piece = piece.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self._tail:
            piece = self._tail + piece
        *lines, self._tail = piece.split(b"\n")
        if len(self._tail) > MAX_LINE_BYTES:
            raise SSEDecodeError(f"upstream line longer than {MAX_LINE_BYTES} bytes")
        events: list[str] = []
        for line in lines:
            if not line:  # blank line: dispatch
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
                continue
            if line.startswith(b"data:"):
                value = line[5:]
                if value[:1] == b" ":
                    value = value[1:]
                self._data.append(value.decode("utf-8", errors="replace"))
            elif line == b"data":  # a field name alone means an empty value
                self._data.append("")
            # comments (":"), event, id and retry fields carry nothing the relay needs
        return events

    def close(self) -> list[str]:
        """End of input: an unterminated final event is dispatched, per the spec's leniency."""
        events = self.feed(b"\n\n") if (self._tail or self._data) else []
        return events
