"""The load a vLLM server reports (upstream/load.py): the parser on a vLLM-style page, the score and its staleness
on a fake clock."""

from __future__ import annotations

import pytest

from app.upstream.load import KV_WEIGHT, STALE_INTERVALS, WAITING_WEIGHT, Load, LoadBoard, parse_vllm

# Shaped like vLLM's /metrics: HELP and TYPE lines, per-model labels, counters and histograms around the gauges,
# the KV-cache gauge under its old name on one engine and its current one on the other.
VLLM_PAGE = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 12345.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 4.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.25
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.625
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 98765.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 10.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="meta-llama/Llama-3.1-8B-Instruct"} 12.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 12.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.5
"""


def test_parser_sums_the_queues_and_takes_the_fullest_cache() -> None:
    assert parse_vllm(VLLM_PAGE) == Load(running=5.0, waiting=5.0, kv_cache_usage=0.625)


@pytest.mark.parametrize(
    "page",
    [
        "",  # nothing
        "# TYPE http_requests_total counter\nhttp_requests_total 3\n",  # some other server's metrics
        "<html><body>not found</body></html>",  # not Prometheus text
    ],
)
def test_a_page_without_the_queue_gauges_is_no_load(page: str) -> None:
    assert parse_vllm(page) is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_score_weighs_waiting_then_running_then_cache_plus_streams_started_since() -> None:
    clock = FakeClock()
    board = LoadBoard(2.0, clock=clock)
    board.report("a", Load(running=2, waiting=1, kv_cache_usage=0.5))
    board.report("b", Load(running=0, waiting=0, kv_cache_usage=0.0))
    assert board.scores(["a", "b"], [9, 9]) == [2 + WAITING_WEIGHT * 1 + KV_WEIGHT * 0.5, 0.0]
    board.started("b")
    board.started("b")
    assert board.scores(["a", "b"], [9, 9])[1] == 2.0  # a burst between scrapes spreads
    board.report("b", Load(running=2, waiting=0, kv_cache_usage=0.0))  # the server counts them now
    assert board.scores(["a", "b"], [9, 9])[1] == 2.0


def test_a_failed_or_stale_scrape_falls_back_to_streams_in_flight() -> None:
    clock = FakeClock()
    board = LoadBoard(2.0, clock=clock)
    board.report("a", Load(running=1, waiting=0, kv_cache_usage=0.0))
    board.report("b", Load(running=1, waiting=0, kv_cache_usage=0.0))
    board.report("b", None)  # its scrape failed
    assert board.scores(["a", "b", "never"], [5, 6, 7]) == [1.0, 6.0, 7.0]
    clock.now += STALE_INTERVALS * 2.0
    assert board.scores(["a"], [5]) == [1.0]  # three intervals old: still fresh
    clock.now += 0.001
    assert board.scores(["a"], [5]) == [5.0]


def test_departed_endpoints_are_forgotten() -> None:
    board = LoadBoard(2.0, clock=FakeClock())
    board.report("a", Load(running=1, waiting=0, kv_cache_usage=0.0))
    board.started("a")
    board.keep(["b"])
    assert board.scores(["a"], [3]) == [3.0]
