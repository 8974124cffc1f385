"""`SSEDecoder`: upstream bytes in arbitrary pieces decode to exactly the `data` payloads that were sent."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.upstream.sse_decoder import MAX_LINE_BYTES, SSEDecodeError, SSEDecoder

no_deadline = settings(deadline=None)  # run time depends on the machine's load; no test here asserts time

EOLS = ("\n", "\r\n", "\r")

# One data line: any text (including non-BMP and lone surrogates, which UTF-8 cannot carry and are
# left out) except the two line terminators.
line_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"))
# One event's data: one or more lines, which the decoder joins with "\n".
event_lines = st.lists(line_text, min_size=1, max_size=4)
# Lines a decoder must skip: comments and the fields a relay has no use for.
noise_line = st.one_of(
    line_text.map(lambda t: ":" + t),
    line_text.map(lambda t: "event: " + t),
    line_text.map(lambda t: "id: " + t),
    st.integers(0, 10**6).map(lambda n: f"retry: {n}"),
)


@st.composite
def sse_stream(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    """A serialized event stream with one line ending throughout, and the payloads it carries."""
    eol = draw(st.sampled_from(EOLS))
    events = draw(st.lists(event_lines, max_size=8))
    lines: list[str] = []
    for data in events:
        # "data:x" and "data: x" are the same field; a value that itself starts with a space needs "data: ".
        block = [("data:" if draw(st.booleans()) and not line.startswith(" ") else "data: ") + line for line in data]
        for _ in range(draw(st.integers(0, 2))):
            block.insert(draw(st.integers(0, len(block))), draw(noise_line))
        lines.extend(block)
        lines.append("")  # the blank line that dispatches the event
        if draw(st.booleans()):
            lines.extend([draw(noise_line), ""])  # a comment-only block dispatches nothing
    raw = "".join(line + eol for line in lines).encode()
    return raw, ["\n".join(data) for data in events]


@st.composite
def split(draw: st.DrawFn, raw: bytes) -> list[bytes]:
    """`raw` cut into non-empty pieces at arbitrary byte offsets (mid-character, between CR and LF)."""
    if len(raw) < 2:
        return [raw] if raw else []
    cuts = sorted(draw(st.sets(st.integers(1, len(raw) - 1), max_size=min(len(raw) - 1, 40))))
    bounds = [0, *cuts, len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


def decode(pieces: list[bytes]) -> list[str]:
    decoder = SSEDecoder()
    events: list[str] = []
    for piece in pieces:
        events += decoder.feed(piece)
    return events + decoder.close()


@no_deadline
@given(st.data())
def test_any_split_decodes_to_the_payloads_sent(data: st.DataObject) -> None:
    raw, payloads = data.draw(sse_stream())
    pieces = data.draw(split(raw))
    assert decode(pieces) == payloads


@no_deadline
@given(sse_stream())
def test_byte_at_a_time(stream: tuple[bytes, list[str]]) -> None:
    raw, payloads = stream
    assert decode([raw[i : i + 1] for i in range(len(raw))]) == payloads


@no_deadline
@given(event_lines, st.sampled_from(EOLS))
def test_unterminated_last_event_is_dispatched_on_close(lines: list[str], eol: str) -> None:
    raw = eol.join("data: " + line for line in lines).encode()
    assert decode([raw]) == ["\n".join(lines)]


@pytest.mark.parametrize("eol", EOLS)
def test_multibyte_characters_split_at_every_byte(eol: str) -> None:
    payload = "héllo 日本語 🚀"
    raw = f"data: {payload}{eol}{eol}".encode()
    for cut in range(1, len(raw)):
        assert decode([raw[:cut], raw[cut:]]) == [payload], cut


def test_crlf_split_between_cr_and_lf_is_one_line_ending() -> None:
    assert decode([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]) == ["a\nb"]


def test_empty_piece_between_cr_and_lf_is_ignored() -> None:
    # feed(b"") must not forget that the previous piece ended in CR: the LF that follows is its other half.
    assert decode([b"data: a\r", b"", b"\ndata: b\r\n\r\n"]) == ["a\nb"]


def test_only_one_leading_space_is_stripped() -> None:
    assert decode([b"data:  two\n\ndata:none\n\n"]) == [" two", "none"]


def test_empty_data_line_dispatches_an_empty_payload() -> None:
    assert decode([b"data:\n\n"]) == [""]


def test_fields_and_comments_carry_no_payload() -> None:
    raw = b": keep-alive\nevent: message\nid: 7\nretry: 1000\n\n: ping\n\ndata: [DONE]\n\n"
    assert decode([raw]) == ["[DONE]"]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert decode([b"data: \xff\xfe ok\n\n"]) == ["\ufffd\ufffd ok"]


def test_overlong_line_is_an_error() -> None:
    decoder = SSEDecoder()
    with pytest.raises(SSEDecodeError):
        decoder.feed(b"data: " + b"x" * MAX_LINE_BYTES)


# Arbitrary bytes, not only well-formed streams: a broken or hostile upstream sends anything.
any_bytes = st.binary(max_size=512) | st.lists(
    st.sampled_from([b"data:", b"data: ", b"data", b"\r", b"\n", b"\r\n", b":", b"\xef\xbb\xbf", b"\xff", b"x"]),
    max_size=40,
).map(b"".join)


@no_deadline
@given(st.data())
def test_arbitrary_bytes_decode_the_same_however_split(data: st.DataObject) -> None:
    """No exception but the documented SSEDecodeError (never raised under MAX_LINE_BYTES), and the same events
    whatever the read boundaries, byte order marks included."""
    raw = data.draw(any_bytes)
    whole = decode([raw])
    assert all(isinstance(event, str) for event in whole)
    assert decode(data.draw(split(raw))) == whole
    assert decode([raw[i : i + 1] for i in range(len(raw))]) == whole


def test_byte_order_mark_split_across_reads_is_still_dropped() -> None:
    raw = b"\xef\xbb\xbfdata: a\n\n"
    for cut in range(1, 4):
        assert decode([raw[:cut], raw[cut:]]) == ["a"], cut
