"""The chart refuses values under which Kubernetes, the ingress or the Gateway would cut live streams.

Each refusal names the values involved (in backticks) and the rule; the boundary cases render.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from .conftest import Helm, find


def test_grace_period_must_outlast_prestop_drain_and_close_grace(helm: Helm) -> None:
    # defaults: preStop 10 + drain 30 + metrics linger 15 + 2 x close grace 5 + margin 5 = 70
    message = helm.template_error(terminationGracePeriodSeconds=70)
    for name in (
        "terminationGracePeriodSeconds",
        "preStop.sleepSeconds",
        "gateway.env.DRAIN_TIMEOUT_SECONDS",
        "drainMetricsLingerSeconds",
        "gateway.env.DRAIN_CLOSE_GRACE_SECONDS",
        "shutdownMarginSeconds",
    ):
        assert f"`{name}`" in message, message
    assert "(70) must exceed" in message and "= 70" in message, message
    deployment = find(helm.template(terminationGracePeriodSeconds=71), "Deployment")
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 71


@pytest.mark.parametrize(
    "values",
    [
        {"gateway__env__DRAIN_TIMEOUT_SECONDS": 35.0},
        {"gateway__env__DRAIN_CLOSE_GRACE_SECONDS": 7.5},
        {"preStop__sleepSeconds": 15},
        {"drainMetricsLingerSeconds": 20},
        {"shutdownMarginSeconds": 10},
    ],
    ids=lambda v: next(iter(v)),
)
def test_grace_check_follows_every_term(helm: Helm, values: dict[str, Any]) -> None:
    message = helm.template_error(**values)  # each one 5 s over the default grace period's 75
    assert "`terminationGracePeriodSeconds` (75) must exceed" in message, message


def test_ingress_timeouts_must_outlast_the_stream_deadline(helm: Helm) -> None:
    message = helm.template_error(ingress__enabled=True, ingress__proxyTimeoutSeconds=120)
    assert "`ingress.proxyTimeoutSeconds` (120) must exceed `gateway.env.TOTAL_TIMEOUT_SECONDS` (120)" in message
    message = helm.template_error(ingress__enabled=True, gateway__env__TOTAL_TIMEOUT_SECONDS=900.0)
    assert "`ingress.proxyTimeoutSeconds` (300) must exceed `gateway.env.TOTAL_TIMEOUT_SECONDS` (900)" in message
    ingress = find(helm.template(ingress__enabled=True, ingress__proxyTimeoutSeconds=121), "Ingress")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "121"


@pytest.mark.parametrize(("field", "value"), [("request", "2m"), ("backendRequest", "1m59s"), ("request", "90000ms")])
def test_route_timeouts_must_outlast_the_stream_deadline(helm: Helm, field: str, value: str) -> None:
    timeout: dict[str, Any] = {f"route__main__timeouts__{field}": value}
    message = helm.template_error(route__main__enabled=True, **timeout)
    assert f"`route.main.timeouts.{field}` ({value}) must exceed `gateway.env.TOTAL_TIMEOUT_SECONDS` (120)" in message


@pytest.mark.parametrize("value", ["0s", "2m1s", "1h"])
def test_route_timeouts_that_outlast_the_deadline_render(helm: Helm, value: str) -> None:
    route = find(helm.template(route__main__enabled=True, route__main__timeouts__request=value), "HTTPRoute")
    assert route["spec"]["rules"][-1]["timeouts"]["request"] == value


def test_hpa_and_keda_are_exclusive(helm: Helm) -> None:
    message = helm.template_error(autoscaling__enabled=True, keda__enabled=True)
    assert re.search(r"`autoscaling\.enabled` and `keda\.enabled` are both true", message), message


def test_min_replicas_above_max_is_refused(helm: Helm) -> None:
    message = helm.template_error(autoscaling__enabled=True, autoscaling__minReplicas=5, autoscaling__maxReplicas=4)
    assert "`autoscaling.minReplicas` (5) must not exceed `autoscaling.maxReplicas` (4)" in message


def test_schema_refuses_bad_values_before_templates_run(helm: Helm) -> None:
    assert "maxSurge" in helm.template_error(rollingUpdate__maxSurge=0)
    assert "LOG_LEVEL" in helm.template_error(gateway__env__LOG_LEVEL="loud")
    assert "TYPO" in helm.template_error(gateway__env__TYPO=1)


def test_unknown_alert_override_is_refused(helm: Helm) -> None:
    overrides = {"NoSuchAlert": {"for": "1m"}}
    message = helm.template_error(prometheusRule__enabled=True, prometheusRule__overrides=overrides)
    assert "`prometheusRule.overrides.NoSuchAlert` names no alert" in message, message


def test_the_resume_write_delay_must_stay_under_half_the_ttl(helm: Helm) -> None:
    """The gateway refuses to start otherwise (app/settings.py): the chart says so at template time."""
    message = helm.template_error(gateway__env__RESUME_WRITE_DELAY_SECONDS=5.0, gateway__env__RESUME_TTL_SECONDS=10.0)
    assert (
        "`gateway.env.RESUME_WRITE_DELAY_SECONDS` (5) must be less than half of `gateway.env.RESUME_TTL_SECONDS` (10)"
        in message
    ), message
    assert "`gateway.env.RESUME_ENABLED`" in message, message
    deployment = find(
        helm.template(gateway__env__RESUME_WRITE_DELAY_SECONDS=4.9, gateway__env__RESUME_TTL_SECONDS=10.0),
        "Deployment",
    )
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RESUME_WRITE_DELAY_SECONDS"] == "4.9"
    # without resumption nothing is written lazily: the rule does not apply
    helm.template(
        gateway__env__RESUME_ENABLED=False,
        gateway__env__RESUME_WRITE_DELAY_SECONDS=5.0,
        gateway__env__RESUME_TTL_SECONDS=10.0,
    )
