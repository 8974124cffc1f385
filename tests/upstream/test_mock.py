"""The built-in mock's output, pinned: known answers written out here, so a change to its text (or to the
copy of its word function the load test checks against) shows up, instead of moving the oracle that the
relay and resume tests compare with (`mock_tokens`). Pacing changes how tokens are batched, never what they
are: the same answers come from a paced gateway and an unpaced one, over every protocol."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from websockets.sync.client import connect

from app.upstream.mock import mock_tokens
from loadtest.stream_check import mock_text
from tests.conftest import Gateway, launch_gateway, sse_data

HELLO_12 = ["This ", "is ", "a ", "streaming ", "response ", "for: ", "hello ", "budget ", "of ", "never ", "their ",
            "café "]
UTF8_9 = ["This ", "is ", "a ", "streaming ", "response ", "for: ", "日本語のプロンプト ", "while ", "and "]
LONG_10 = ["This ", "is ", "a ", "streaming ", "response ", "for: ", "x" * 40 + " ", "🚀 ", "in ", "through "]


def test_known_answers() -> None:
    assert mock_tokens("hello", 0, 12) == HELLO_12
    assert mock_tokens("日本語のプロンプト", 0, 9) == UTF8_9
    assert mock_tokens("x" * 100, 0, 10) == LONG_10  # the prompt is quoted up to 40 characters
    assert mock_tokens("hello", 9, 14) == ["never ", "their ", "café ", "réseau ", "the "]  # any position, alone


def test_the_load_tests_copy_agrees() -> None:
    assert mock_text("hello", 12) == "".join(HELLO_12)
    assert mock_text("日本語のプロンプト", 9) == "".join(UTF8_9)


@pytest.fixture(scope="module", params=[0, 200], ids=["unpaced", "paced"])
def gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = launch_gateway({"MOCK_TOKENS_PER_SECOND": request.param, "MOCK_FIRST_TOKEN_MS": 5},
                             tmp_path_factory.mktemp("gateway") / "gateway.log")
    yield gateway
    gateway.stop()


def test_stream_answers(gateway: Gateway) -> None:
    response = httpx.post(gateway.url + "/stream", json={"prompt": "hello", "max_tokens": 12}, timeout=30)
    events = [json.loads(data) for data in sse_data(response.text)]
    assert [e["content"] for e in events if e["type"] == "token"] == HELLO_12
    assert events[-1] == {"type": "done", "tokens": 12}


def test_chat_answers(gateway: Gateway) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "日本語のプロンプト"}], "max_tokens": 9}
    answer = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30).json()
    assert answer["choices"][0]["message"]["content"] == "".join(UTF8_9)
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 9


def test_websocket_answers(gateway: Gateway) -> None:
    with connect(gateway.url.replace("http://", "ws://") + "/ws") as ws:
        ws.send(json.dumps({"prompt": "x" * 100, "max_tokens": 10}))
        frames = []
        while not frames or frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(ws.recv(timeout=30)))
    assert [f["content"] for f in frames if f["type"] == "token"] == LONG_10
    assert frames[-1] == {"type": "done", "tokens": 10}
