"""Metric labels stay bounded against the real gateway: with `MODELS` empty (any model accepted) every
model is counted as `model="other"`, and the name a client sent never becomes a label value. (With a
list, a model outside it is refused: tests/security/test_upstream_fields.py.)"""

from __future__ import annotations

import httpx

from loadtest.harness.wait import eventually
from tests.conftest import GatewayFactory
from tests.test_upstream_protection import metric


def test_unknown_models_fold_into_other(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(MODELS="", MOCK_FIRST_TOKEN_MS=5, MOCK_TOKENS_PER_SECOND=0)
    for model, tokens in (("house-model", 3), ("client-invented-9f2c", 4), ("another-made-up-name", 5)):
        response = httpx.post(
            gateway.url + "/stream", json={"prompt": "labels", "model": model, "max_tokens": tokens}, timeout=30
        )
        assert response.status_code == 200 and '"type": "done"' in response.text, response.text

    def counted(model: str, expected: float) -> bool:
        return metric(gateway, "streaming_tokens_total", route="/stream", model=model) == expected

    assert eventually(lambda: counted("other", 12), timeout=30)
    text = httpx.get(gateway.metrics_url + "/metrics").text
    assert "house-model" not in text and "client-invented-9f2c" not in text and "another-made-up-name" not in text
    ttft_models = {
        line.split('model="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("streaming_ttft_seconds_count{")
    }
    assert ttft_models == {"other"}, ttft_models
