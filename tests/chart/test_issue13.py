"""Issue 13: what a real cluster would show about the chart (each test fails on the chart before the fix).

The helm test pod outside every workload selector, rules scoped to their release (promtool over the series of
two releases), ServiceMonitor `honorLabels`, Redis wiring and the /tmp sizing, subchart use, KEDA's floor and
fallback, the extension points, the metrics linger in the grace arithmetic, runbook URLs, NOTES.txt.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from app.settings import Settings
from loadtest.harness.process import require_binary

from .conftest import CHART, NAMESPACE, RELEASE, Helm, HelmError, find
from .test_render import SCENARIOS, render

FULLNAME = f"{RELEASE}-streaming-gateway"
RUNBOOK = "https://runbooks.example.test/streaming-gateway/RUNBOOK.md"
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


def _pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(find(docs, "Deployment")["spec"]["template"]["spec"])


def _gateway(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(next(c for c in _pod_spec(docs)["containers"] if c["name"] == "gateway"))


def _env(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(_gateway(docs)["env"])


def _plain_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in _env(docs) if "value" in e}


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in override.items()}}
    return override


# --- 1. the helm test pod -----------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["defaults", "all-features"])
def test_helm_test_pod_is_outside_every_workload_selector(helm: Helm, scenario: str) -> None:
    docs = render(helm, scenario)
    test_pod = find(docs, "Pod")["metadata"]["labels"]
    workload_pods = find(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    selectors: list[tuple[str, dict[str, str]]] = []
    for doc in docs:
        spec, name = doc.get("spec", {}), f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in ("Deployment", "PodDisruptionBudget", "ServiceMonitor"):
            selectors.append((name, spec["selector"]["matchLabels"]))
        if doc["kind"] == "Deployment":
            selectors += [
                (f"{name} topology", c["labelSelector"]["matchLabels"])
                for c in spec["template"]["spec"].get("topologySpreadConstraints", [])
            ]
        if doc["kind"] == "Service":
            selectors.append((name, spec["selector"]))
        if doc["kind"] == "NetworkPolicy":
            selectors.append((name, spec["podSelector"]["matchLabels"]))
    assert {kind.split("/")[0] for kind, _ in selectors} >= {"Deployment", "Service", "PodDisruptionBudget"}
    for where, selector in selectors:
        assert _matches(selector, workload_pods), where  # the selectors are real: they pick the gateway pods
        assert not _matches(selector, test_pod), f"{where} selects the helm test pod: {selector}"


def test_network_policy_lets_the_test_pod_in_when_peers_are_restricted(helm: Helm) -> None:
    docs = render(helm, "all-features")
    test_pod = find(docs, "Pod")["metadata"]["labels"]
    peers = find(docs, "NetworkPolicy")["spec"]["ingress"][0]["from"]
    assert any(_matches(p.get("podSelector", {}).get("matchLabels", {"x": "none"}), test_pod) for p in peers), peers
    assert len(peers) == 3  # the two namespaces of the values, and the test pod
    without_tests = find(render_with(helm, "all-features", tests__enabled=False), "NetworkPolicy")
    assert len(without_tests["spec"]["ingress"][0]["from"]) == 2


def render_with(helm: Helm, scenario: str, **sets: Any) -> list[dict[str, Any]]:
    path = SCENARIOS[scenario]
    return helm.template(*([path] if path else []), **sets)


# --- 2. rules scoped to their release -----------------------------------------------------------------

RELEASES = ("staging", "prod")  # two releases of the chart in one namespace, one Prometheus


def _series(release: str, name: str, values: str, **labels: str) -> dict[str, str]:
    base = {"namespace": "llm", "job": f"{release}-streaming-gateway", "pod": f"{release}-gateway-0"}
    rendered = ", ".join(f'{k}="{v}"' for k, v in {**base, **labels}.items())
    return {"series": f"{name}{{{rendered}}}", "values": values}


def _two_release_inputs() -> tuple[list[dict[str, str]], list[tuple[str, str, dict[str, str]]]]:
    """Series of two releases, each breaking different rules, and the (alert, release, labels) that must fire."""
    series: list[dict[str, str]] = []
    for release in RELEASES:
        series.append(_series(release, "streaming_max_connections", "500x30"))
        series.append(
            _series(
                release, "streaming_circuit_breaker_state", "1x30" if release == "prod" else "0x30", upstream="openai"
            )
        )
        series.append(
            _series(release, "streaming_redis_up", "0x30" if release == "staging" else "1x30", store="ratelimit")
        )
        series.append(
            _series(
                release, "streaming_active_connections", "450x30" if release == "staging" else "100x30", route="/stream"
            )
        )
        series.append(_series(release, "streaming_connections_total", "0+100x30", route="/stream", status="success"))
        series.append(
            _series(
                release,
                "streaming_connections_total",
                "0+10x30" if release == "prod" else "0x30",
                route="/stream",
                status="error",
            )
        )
        series.append(
            _series(release, "streaming_resume_store_errors_total", "0+5x30" if release == "staging" else "0x30")
        )
        series.append(_series(release, "streaming_drain_cut_streams_total", "0+2x30" if release == "prod" else "0x30"))
        # model servers (issue 16): staging finds 1 of 4 healthy, prod has every one not ready
        healthy, unhealthy, not_ready = ("1x30", "3x30", "0x30") if release == "staging" else ("0x30", "0x30", "2x30")
        for state, values in (("healthy", healthy), ("unhealthy", unhealthy), ("not_ready", not_ready)):
            series.append(_series(release, "streaming_upstream_endpoints", values, state=state))
    service = {"namespace": "llm"}
    firing = [
        ("StreamingConnectionSaturation", "staging", {**service, "pod": "staging-gateway-0", "severity": "critical"}),
        (
            "StreamingRedisFallback",
            "staging",
            {**service, "pod": "staging-gateway-0", "store": "ratelimit", "severity": "warning"},
        ),
        ("StreamingResumeStoreErrors", "staging", {**service, "severity": "warning"}),
        ("StreamingCircuitBreakerOpen", "prod", {**service, "upstream": "openai", "severity": "critical"}),
        ("StreamingErrorRatioHigh", "prod", {**service, "severity": "warning"}),
        ("StreamingErrorBudgetBurnFast", "prod", {**service, "severity": "critical"}),
        ("StreamingErrorBudgetBurnSlow", "prod", {**service, "severity": "warning"}),
        ("StreamingDrainCutStreams", "prod", {**service, "severity": "warning"}),
        (
            "StreamingUpstreamEndpointsUnhealthy",
            "staging",
            {**service, "pod": "staging-gateway-0", "severity": "warning"},
        ),
        ("StreamingUpstreamNoHealthyEndpoint", "prod", {**service, "pod": "prod-gateway-0", "severity": "critical"}),
    ]
    return series, firing


def _label_set(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def test_each_release_alerts_only_for_itself(helm: Helm, tmp_path: Path) -> None:
    """promtool `test rules` over both releases' rule files and series: every alert fires once, for its release.

    Each rule is marked with the release whose PrometheusRule it came from (`rule_release`, added here), so a
    rule of one release that fires on, or records from, the other release's series shows as an extra sample.
    """
    rule_files = []
    for release in RELEASES:
        docs = helm.run(
            "template",
            release,
            str(helm.chart),
            "--namespace",
            "llm",
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            f"prometheusRule.runbookBaseUrl={RUNBOOK}",
        )
        rule = find([d for d in yaml.safe_load_all(docs) if d], "PrometheusRule")
        assert [g["name"] for g in rule["spec"]["groups"]] == [f"{release}-streaming-gateway"]
        for group in rule["spec"]["groups"]:
            for r in group["rules"]:
                r["labels"] = {**r.get("labels", {}), "rule_release": release}
        path = tmp_path / f"{release}.rules.yaml"
        path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
        rule_files.append(path.name)
    series, firing = _two_release_inputs()
    alerts = [
        _label_set(
            "ALERTS",
            {
                "alertname": alert,
                "alertstate": "firing",
                "job": f"{release}-streaming-gateway",
                "rule_release": release,
                **labels,
            },
        )
        for alert, release, labels in firing
    ]
    saturation = "namespace_job_pod:streaming_active_connections:saturation"
    tests = {
        "rule_files": rule_files,
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": 'ALERTS{alertstate="firing"}',
                        "eval_time": "25m",
                        "exp_samples": [{"labels": labels, "value": 1} for labels in alerts],
                    },
                    {
                        "expr": saturation,
                        "eval_time": "25m",
                        "exp_samples": [
                            {
                                "labels": _label_set(
                                    saturation,
                                    {
                                        "namespace": "llm",
                                        "job": "staging-streaming-gateway",
                                        "pod": "staging-gateway-0",
                                        "rule_release": "staging",
                                    },
                                ),
                                "value": 0.9,
                            },
                            {
                                "labels": _label_set(
                                    saturation,
                                    {
                                        "namespace": "llm",
                                        "job": "prod-streaming-gateway",
                                        "pod": "prod-gateway-0",
                                        "rule_release": "prod",
                                    },
                                ),
                                "value": 0.2,
                            },
                        ],
                    },
                ],
            }
        ],
    }
    (tmp_path / "releases.test.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    done = subprocess.run(
        [require_binary("promtool"), "test", "rules", "releases.test.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_selector_of_every_rule_carries_the_release_scope(helm: Helm) -> None:
    rule = find(helm.template(prometheusRule__enabled=True, prometheusRule__runbookBaseUrl=RUNBOOK), "PrometheusRule")
    scope = f'{{namespace="{NAMESPACE}", job="{FULLNAME}"'
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            expr = r["expr"]
            assert "vector(" not in expr, expr  # no constants standing in for a setting
            for match in re.finditer(r"(?<![\w:])((?:namespace_\w+:)?streaming_\w+(?::\w+)?)(?![\w(])", expr):
                assert expr[match.end() :].startswith(scope), f"{r.get('alert') or r['record']}: {match[1]}"
    custom = find(
        helm.template(
            prometheusRule__enabled=True,
            prometheusRule__runbookBaseUrl=RUNBOOK,
            prometheusRule__releaseSelector='cluster="eu1", service="gw"',
        ),
        "PrometheusRule",
    )
    assert all('{cluster="eu1", service="gw"' in r["expr"] for g in custom["spec"]["groups"] for r in g["rules"])


# --- 3. honorLabels -----------------------------------------------------------------------------------


def test_service_monitor_honor_labels_is_a_value_default_false(helm: Helm) -> None:
    endpoint = find(helm.template(serviceMonitor__enabled=True), "ServiceMonitor")["spec"]["endpoints"][0]
    assert endpoint["honorLabels"] is False
    endpoint = find(helm.template(serviceMonitor__enabled=True, serviceMonitor__honorLabels=True), "ServiceMonitor")[
        "spec"
    ]["endpoints"][0]
    assert endpoint["honorLabels"] is True


# --- 4. Redis, the /tmp emptyDir and the resume store alert ------------------------------------------


def test_default_install_keeps_the_local_store_and_no_redis(helm: Helm) -> None:
    docs = helm.template()
    env = _plain_env(docs)
    assert env["RESUME_STORE"] == "local" and "REDIS_URL" not in {e["name"] for e in _env(docs)}


def test_redis_url_turns_on_the_shared_resume_store_and_limits(helm: Helm) -> None:
    docs = helm.template(gateway__redis__url="redis://valkey.cache.svc:6379/0")
    names = [e["name"] for e in _env(docs)]
    assert names.count("RESUME_STORE") == 1 and names.count("REDIS_URL") == 1
    env = _plain_env(docs)
    assert env["RESUME_STORE"] == "redis" and env["REDIS_URL"] == "redis://valkey.cache.svc:6379/0"
    settings = Settings.model_validate({k.lower(): v for k, v in env.items() if k.lower() in Settings.model_fields})
    assert settings.resume_store == "redis" and settings.redis_url == "redis://valkey.cache.svc:6379/0"


def test_redis_from_an_existing_secret_wins_over_the_generic_secret_key(helm: Helm) -> None:
    docs = helm.template(
        gateway__redis__existingSecret="valkey-auth",
        gateway__redis__existingSecretKey="url",
        gateway__existingSecret="gw-secrets",
    )
    redis = [e for e in _env(docs) if e["name"] == "REDIS_URL"]
    assert redis == [{"name": "REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "valkey-auth", "key": "url"}}}]
    assert _plain_env(docs)["RESUME_STORE"] == "redis"
    refs = {e["name"] for e in _env(docs) if "valueFrom" in e}
    assert {"API_KEYS", "UPSTREAM_API_KEY"} <= refs  # the other secret settings still come from gw-secrets


def _mi(quantity: str) -> float:
    units = {"Mi": 1.0, "Gi": 1024.0}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_tmp_volume_holds_the_local_store_history(helm: Helm) -> None:
    """300 s of history at the benchmarked 27,500 tokens/s is ~0.5-0.75 GB: the old 512Mi limit got pods evicted."""
    docs = helm.template()
    volume = next(v for v in _pod_spec(docs)["volumes"] if v["name"] == "tmp")["emptyDir"]
    expected = 128 + 27500 * (300 + 120) * 80 / 2**20
    assert _mi(volume["sizeLimit"]) == pytest.approx(expected, abs=1)
    assert _mi(volume["sizeLimit"]) > 750
    resources = _gateway(docs)["resources"]
    for kind in ("requests", "limits"):
        assert _mi(resources[kind]["ephemeral-storage"]) == _mi(volume["sizeLimit"]) + 256, kind
    assert resources["requests"]["memory"] == "512Mi"  # the values' own resources are kept

    longer = next(
        v for v in _pod_spec(helm.template(gateway__env__RESUME_TTL_SECONDS=600))["volumes"] if v["name"] == "tmp"
    )["emptyDir"]
    assert _mi(longer["sizeLimit"]) > _mi(volume["sizeLimit"])
    for values in ({"gateway__redis__url": "redis://r:6379/0"}, {"gateway__env__RESUME_ENABLED": False}):
        no_history = next(v for v in _pod_spec(helm.template(**values))["volumes"] if v["name"] == "tmp")
        assert no_history["emptyDir"]["sizeLimit"] == "128Mi", values

    fixed = helm.template(tmpVolume__sizeLimit="2Gi", resources={"limits": {"ephemeral-storage": "5Gi"}})
    assert next(v for v in _pod_spec(fixed)["volumes"] if v["name"] == "tmp")["emptyDir"]["sizeLimit"] == "2Gi"
    assert _gateway(fixed)["resources"]["limits"]["ephemeral-storage"] == "5Gi"  # set by the user: kept
    assert _gateway(fixed)["resources"]["requests"]["ephemeral-storage"] == f"{2048 + 256}Mi"
    in_memory = _gateway(helm.template(tmpVolume__medium="Memory"))["resources"]
    assert "ephemeral-storage" not in json.dumps(in_memory)  # a Memory emptyDir counts against memory instead


def test_resume_store_errors_have_an_alert_with_a_runbook() -> None:
    rules = yaml.safe_load((CHART.parent / "dashboards" / "prometheus-rules.yaml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    alert = alerts["StreamingResumeStoreErrors"]
    assert "streaming_resume_store_errors_total" in alert["expr"]
    anchor = alert["annotations"]["runbook_url"].split("#")[1]
    assert anchor == "streamingresumestoreerrors"
    assert "## StreamingResumeStoreErrors" in (CHART.parent / "dashboards" / "RUNBOOK.md").read_text()


# --- 5. subchart use ----------------------------------------------------------------------------------


def test_global_and_enabled_are_accepted(helm: Helm) -> None:
    validator = jsonschema.Draft7Validator(SCHEMA)
    assert validator.is_valid(_merge(VALUES, {"global": {"imageRegistry": "r.example.test"}, "enabled": False}))
    assert not validator.is_valid(_merge(VALUES, {"enabled": "yes"}))
    values: dict[str, Any] = {"global": {"imageRegistry": "r.example.test"}, "enabled": True}  # `global`: a keyword
    assert find(helm.template(**values), "Deployment")


# --- 6. KEDA ------------------------------------------------------------------------------------------


def test_keda_never_scales_to_zero(helm: Helm) -> None:
    assert not jsonschema.Draft7Validator(SCHEMA).is_valid(_merge(VALUES, {"keda": {"minReplicaCount": 0}}))
    with pytest.raises(HelmError, match="minReplicaCount"):
        helm.template(keda__enabled=True, keda__minReplicaCount=0)


def test_keda_holds_fallback_replicas_while_prometheus_is_unreachable(helm: Helm) -> None:
    scaled = find(helm.template(keda__enabled=True), "ScaledObject")["spec"]
    assert scaled["fallback"] == {"failureThreshold": 3, "replicas": 10}  # default: keda.maxReplicaCount
    scaled = find(
        helm.template(keda__enabled=True, keda__fallback__replicas=4, keda__fallback__failureThreshold=5),
        "ScaledObject",
    )["spec"]
    assert scaled["fallback"] == {"failureThreshold": 5, "replicas": 4}
    assert (
        "fallback" not in find(helm.template(keda__enabled=True, keda__fallback__enabled=False), "ScaledObject")["spec"]
    )


# --- 7. extension points ------------------------------------------------------------------------------


def test_extra_volumes_mounts_sidecars_and_objects(helm: Helm) -> None:
    docs = render(helm, "all-features")
    spec = _pod_spec(docs)
    assert {"name": "upstream-ca", "configMap": {"name": "upstream-ca"}} in spec["volumes"]
    assert {"name": "upstream-ca", "mountPath": "/etc/ssl/upstream", "readOnly": True} in _gateway(docs)["volumeMounts"]
    assert [c["name"] for c in spec["containers"]] == ["gateway", "log-shipper"]
    extra = find(docs, "ConfigMap", "upstream-ca")
    assert extra["metadata"]["namespace"] == NAMESPACE  # templated
    manifest = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: '{{ .Release.Name }}-x'"
    as_text = helm.template(extraObjects=[manifest])
    assert find(as_text, "ConfigMap", f"{RELEASE}-x")


def test_common_labels_reach_every_object_but_no_selector(helm: Helm) -> None:
    docs = render(helm, "all-features")
    for doc in docs:
        if doc["metadata"]["name"] == "upstream-ca":
            continue  # an extraObjects manifest: the user's labels, as written
        assert doc["metadata"]["labels"]["team"] == "ml-platform", f"{doc['kind']}/{doc['metadata']['name']}"
    deployment = find(docs, "Deployment")
    assert "team" not in deployment["spec"]["selector"]["matchLabels"]
    assert "team" not in find(docs, "Service")["spec"]["selector"]


def test_lifecycle_sits_beside_the_prestop_sleep_or_overrides_it(helm: Helm) -> None:
    sleep = {"preStop": {"sleep": {"seconds": 10}}}
    assert _gateway(helm.template())["lifecycle"] == sleep
    post_start = {"postStart": {"exec": {"command": ["/bin/sh", "-c", "warm-up"]}}}
    assert _gateway(helm.template(lifecycle=post_start))["lifecycle"] == {**post_start, **sleep}
    hook = {"preStop": {"exec": {"command": ["/bin/sh", "-c", "deregister && sleep 10"]}}}
    assert _gateway(helm.template(lifecycle=hook))["lifecycle"] == hook
    old_cluster = _gateway(helm.template(lifecycle=post_start, kube_version="1.29.0"))["lifecycle"]
    assert old_cluster == {**post_start, "preStop": {"exec": {"command": ["sleep", "10"]}}}


# --- 8. /metrics after a drain that cut streams -------------------------------------------------------


def test_metrics_linger_is_a_value_counted_in_the_grace_period(helm: Helm) -> None:
    assert _plain_env(helm.template())["DRAIN_METRICS_LINGER_SECONDS"] == "15"
    assert (
        _plain_env(helm.template(drainMetricsLingerSeconds=30, terminationGracePeriodSeconds=90))[
            "DRAIN_METRICS_LINGER_SECONDS"
        ]
        == "30"
    )
    # 10 + 30 + 15 + 2 x 5 + 5 = 70: a grace period of 65 was enough without the linger, and is not with it
    error = helm.template_error(terminationGracePeriodSeconds=65)
    assert "`drainMetricsLingerSeconds` (15)" in error and "= 70" in error
    assert find(helm.template(terminationGracePeriodSeconds=65, drainMetricsLingerSeconds=0), "Deployment")
    settings = Settings(drain_timeout_seconds=30, drain_close_grace_seconds=5, drain_metrics_linger_seconds=15)
    assert settings.graceful_timeout_seconds == 30 + 15 + 10 + 1  # gunicorn waits for the linger too


# --- 12. runbooks -------------------------------------------------------------------------------------


def test_runbook_urls_point_at_the_configured_base(helm: Helm) -> None:
    error = helm.template_error(prometheusRule__enabled=True)
    assert "`prometheusRule.runbookBaseUrl`" in error
    rule = find(helm.template(prometheusRule__enabled=True, prometheusRule__runbookBaseUrl=RUNBOOK), "PrometheusRule")
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert alerts and "your-org" not in json.dumps(rule)
    for alert in alerts:
        assert alert["annotations"]["runbook_url"] == f"{RUNBOOK}#{alert['alert'].lower()}"


# --- NOTES --------------------------------------------------------------------------------------------


def _notes(helm: Helm, *args: str) -> str:
    out = helm.run("install", RELEASE, str(helm.chart), "--dry-run=client", "--namespace", NAMESPACE, *args)
    return " ".join(out.split("NOTES:", 1)[1].split())


def test_notes_say_plainly_where_resumption_works(helm: Helm) -> None:
    local = _notes(helm)
    assert "Resumption: ONLY ON THE SAME POD" in local and "not_resumable" in local
    assert "gateway.redis.url" in local and "most reconnects" in local
    shared = _notes(helm, "--set", "gateway.redis.url=redis://r:6379/0")
    assert "Resumption: on any replica" in shared and "not_resumable" not in shared
    off = _notes(helm, "--set", "gateway.env.RESUME_ENABLED=false")
    assert "Resumption: off" in off


# --- 10. the all-features example ---------------------------------------------------------------------


def test_all_features_egress_reaches_otlp_and_redis() -> None:
    path = SCENARIOS["all-features"]
    assert path is not None
    values = yaml.safe_load(path.read_text())
    ports = {p["port"] for rule in values["networkPolicy"]["egress"] for p in rule.get("ports", [])}
    assert values["otel"]["endpoint"].endswith(":4318") and 4318 in ports
    assert values["gateway"]["redis"]["existingSecret"] and 6379 in ports


# --- 10. k8s/e2e.sh, run with every tool it drives replaced by a recorder -----------------------------

RECORDER = """#!/bin/sh
echo "$(basename "$0") $*" >> "$E2E_LOG"
if [ "$(basename "$0") $1 $2" = "kind get clusters" ]; then printf '%s\\n' $E2E_EXISTING_CLUSTERS; fi
exit 0
"""


def _run_e2e(tmp_path: Path, existing: str) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("docker", "kind", "kubectl", "helm", "python"):
        (bin_dir / tool).write_text(RECORDER)
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "E2E_LOG": str(log),
        "E2E_EXISTING_CLUSTERS": existing,
        "PYTHON": str(bin_dir / "python"),
        "RAMP_SECONDS": "0",
        "HOME": str(tmp_path),
    }
    done = subprocess.run(
        ["bash", str(CHART.parent / "k8s" / "e2e.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return log.read_text().splitlines()


def test_e2e_never_deletes_a_cluster_it_reused(tmp_path: Path) -> None:
    calls = _run_e2e(tmp_path, existing="other streaming-gateway")
    assert not [c for c in calls if c.startswith("kind create")]
    assert not [c for c in calls if c.startswith("kind delete")], calls


def test_e2e_deletes_the_cluster_it_created(tmp_path: Path) -> None:
    calls = _run_e2e(tmp_path, existing="other")
    assert [c for c in calls if c.startswith("kind create cluster --name streaming-gateway")]
    assert calls[-1] == "kind delete cluster --name streaming-gateway"


def test_e2e_waits_for_the_job_pod_to_exist_before_its_condition(tmp_path: Path) -> None:
    calls = _run_e2e(tmp_path, existing="streaming-gateway")
    waits = [c for c in calls if c.startswith("kubectl") and " wait pod --selector job-name=locust" in c]
    assert len(waits) == 2, waits
    assert "--for=create" in waits[0] and "--for=condition=Ready" in waits[1]
    job = next(i for i, c in enumerate(calls) if "apply --filename k8s/locust-job.yaml" in c)
    assert job < calls.index(waits[0])
