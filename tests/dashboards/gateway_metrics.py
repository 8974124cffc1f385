"""The metrics the gateway exports (app/observability/metrics.py, and the families collectors build when scraped)
and the ones a set of queries reads."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import Counter, Histogram
from prometheus_client.metrics import MetricWrapperBase

from app.observability import metrics

APP = Path(__file__).resolve().parents[2] / "app"
# a metric family a collector builds at scrape time (instance-wide state read once per scrape, such as a fleet's
# per-endpoint series): not a module-level metric, so found by its constructor call in app/
_FAMILY = re.compile(r'\b(Gauge|Counter|Histogram|Summary|Info|StateSet)MetricFamily\(\s*"(streaming_\w+)"')
# a gateway metric name, not part of a recording rule name such as namespace_job:streaming_ttft_seconds:p95_rate5m
_METRIC = re.compile(r"(?<![\w:])streaming_\w+(?![\w:])")


def exported_metrics() -> dict[str, MetricWrapperBase]:
    """Exposed name (counters with `_total`) -> metric, for every metric the gateway defines."""
    return {
        value._name + "_total" if isinstance(value, Counter) else value._name: value
        for value in vars(metrics).values()
        if isinstance(value, MetricWrapperBase)
    }


def exported_names() -> set[str]:
    """Every exposed name: the module-level metrics' and the scrape-time families' (counters with `_total`)."""
    names = set(exported_metrics())
    for path in APP.rglob("*.py"):
        for kind, name in _FAMILY.findall(path.read_text()):
            names.add(f"{name.removesuffix('_total')}_total" if kind == "Counter" else name)
    return names


def referenced_metrics(exprs: Iterable[str]) -> set[str]:
    """The gateway metrics the queries read; histogram series (`_bucket`, `_sum`, `_count`) by their base name."""
    exported = exported_metrics()
    names = set()
    for token in _METRIC.findall("\n".join(exprs)):
        base = re.sub(r"_(bucket|sum|count)$", "", token)
        names.add(base if base != token and isinstance(exported.get(base), Histogram) else token)
    return names
