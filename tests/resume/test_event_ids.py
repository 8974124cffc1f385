"""Event ids (`Last-Event-ID` / `?after=`): parsing never raises, and what the relay sends parses back."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.errors import InvalidRequestError
from app.resume.store import EVENT_ID, parse_event_id
from app.routes.stream import resume_position

no_deadline = settings(deadline=None)  # run time depends on the machine's load; no test here asserts time

event_ids = st.from_regex(EVENT_ID, fullmatch=True)
anything = st.text() | event_ids.map(lambda s: s + "\x00") | event_ids.map(lambda s: " " + s + "\r\n")


@no_deadline
@given(event_ids)
def test_an_event_id_round_trips(value: str) -> None:
    parsed = parse_event_id(value)
    assert parsed is not None
    stream_id, seq = parsed
    assert seq >= 0
    assert parse_event_id(f"{stream_id}-{seq}") == (stream_id, seq)  # what SeedEncoder writes in `id:` lines


@no_deadline
@given(anything)
def test_any_text_parses_or_is_refused_without_an_exception(value: str) -> None:
    parsed = parse_event_id(value)
    assert parsed is None or (isinstance(parsed[0], str) and isinstance(parsed[1], int))


@no_deadline
@given(st.text(max_size=80), anything)
def test_resume_position_is_a_seq_or_the_documented_422(stream_id: str, last_event_id: str) -> None:
    try:
        position = resume_position(stream_id, last_event_id)
    except InvalidRequestError as exc:
        assert exc.status == 422
        return
    assert position == -1 or (last_event_id.strip().startswith(f"{stream_id}-") and position >= 0)


@no_deadline
@given(event_ids)
def test_resume_position_of_the_streams_own_id_is_its_seq(value: str) -> None:
    parsed = parse_event_id(value)
    assert parsed is not None
    assert resume_position(parsed[0], value) == parsed[1]


@pytest.mark.parametrize("value", ["", "-1", "abc-", "abc--1", "abc-1x", "ABC-1", "abc-1234567890", "a" * 65 + "-1"])
def test_malformed_ids_do_not_parse(value: str) -> None:
    assert parse_event_id(value) is None
