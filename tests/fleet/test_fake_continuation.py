"""The fake model server continues a partial answer exactly, as vLLM's `continue_final_message` does, and dies
like a killed pod when told to (what tests/fleet/test_continuation.py relies on)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from loadtest.fake_openai import default_tokens
from tests.conftest import FakeUpstream
from tests.fleet.fakes import fake_server

PROMPT = [{"role": "user", "content": "hi"}]


def _chat(fake: FakeUpstream, **body: Any) -> tuple[str, dict[str, Any], str | None]:
    """One streamed chat completion: its text, its usage and its finish_reason."""
    request = {"model": "fake", "stream": True, "stream_options": {"include_usage": True}, **body}
    text, finish = "", None
    usage: dict[str, Any] = {}
    with httpx.stream("POST", fake.url + "/chat/completions", json=request, timeout=10) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
                finish = choice["finish_reason"] or finish
    return text, usage, finish


def _partial(k: int) -> dict[str, Any]:
    return {"role": "assistant", "content": "".join(default_tokens(k))}


@pytest.fixture(scope="module")
def fake() -> Any:
    with fake_server(tokens_per_second=0) as server:
        yield server


def test_a_partial_answer_continues_from_its_next_token(fake: FakeUpstream) -> None:
    whole, _, _ = _chat(fake, messages=PROMPT, max_tokens=12)
    text, usage, finish = _chat(
        fake,
        messages=[*PROMPT, _partial(5)],
        max_tokens=7,
        continue_final_message=True,
        add_generation_prompt=False,
    )
    assert "".join(default_tokens(5)) + text == whole == "".join(default_tokens(12))
    assert finish == "length"
    assert usage == {"prompt_tokens": 7 + 5, "completion_tokens": 7, "total_tokens": 19}


def test_an_assistant_message_without_the_flag_is_a_new_turn(fake: FakeUpstream) -> None:
    text, usage, _ = _chat(fake, messages=[*PROMPT, _partial(5)], max_tokens=3)
    assert text == "tok0 tok1 tok2 "
    assert usage["prompt_tokens"] == 7


def test_a_partial_answer_it_did_not_give_is_refused(fake: FakeUpstream) -> None:
    body = {
        "model": "fake",
        "stream": True,
        "max_tokens": 3,
        "messages": [*PROMPT, {"role": "assistant", "content": "tok0 tok7 "}],
        "continue_final_message": True,
    }
    response = httpx.post(fake.url + "/chat/completions", json=body, timeout=10)
    assert response.status_code == 400


def test_die_after_kills_the_process_mid_stream() -> None:
    with fake_server(tokens_per_second=0) as fake:
        fake.script({"die_after": 3})
        received = ""
        body = {"model": "fake", "stream": True, "max_tokens": 10, "messages": PROMPT}
        with (
            pytest.raises(httpx.RemoteProtocolError),
            httpx.stream("POST", fake.url + "/chat/completions", json=body, timeout=10) as response,
        ):
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    received += "".join(c["delta"].get("content") or "" for c in json.loads(line[6:])["choices"])
        assert received == "tok0 tok1 tok2 "
        assert fake.proc.wait(timeout=10) == -9  # SIGKILL, as a killed pod
