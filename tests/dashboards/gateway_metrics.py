"""The metrics the gateway exports (from app/observability/metrics.py) and the ones a set of queries reads."""

from __future__ import annotations

import re
from collections.abc import Iterable

from prometheus_client import Counter, Histogram
from prometheus_client.metrics import MetricWrapperBase

from app.observability import metrics

# a gateway metric name, not part of a recording rule name such as namespace_job:streaming_ttft_seconds:p95_rate5m
_METRIC = re.compile(r"(?<![\w:])streaming_\w+(?![\w:])")


def exported_metrics() -> dict[str, MetricWrapperBase]:
    """Exposed name (counters with `_total`) -> metric, for every metric the gateway defines."""
    return {
        value._name + "_total" if isinstance(value, Counter) else value._name: value
        for value in vars(metrics).values()
        if isinstance(value, MetricWrapperBase)
    }


def referenced_metrics(exprs: Iterable[str]) -> set[str]:
    """The gateway metrics the queries read; histogram series (`_bucket`, `_sum`, `_count`) by their base name."""
    exported = exported_metrics()
    names = set()
    for token in _METRIC.findall("\n".join(exprs)):
        base = re.sub(r"_(bucket|sum|count)$", "", token)
        names.add(base if base != token and isinstance(exported.get(base), Histogram) else token)
    return names
