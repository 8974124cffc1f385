"""What the rendered objects say: the Deployment's lifecycle and settings, exposure, autoscaling, monitoring."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.settings import Settings

from .conftest import FIXTURES, NAMESPACE, RELEASE, Helm, find

FULLNAME = f"{RELEASE}-streaming-gateway"
RUNBOOK = "https://runbooks.example.test/streaming-gateway/RUNBOOK.md"


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["gateway"]
    return dict(containers[0])


def plain_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(docs)["env"] if "value" in e}


# --- Deployment ---------------------------------------------------------------------------------------


def test_rollout_never_drops_capacity(helm: Helm) -> None:
    spec = find(helm.template(), "Deployment")["spec"]
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    assert spec["replicas"] == 2
    autoscalers: tuple[dict[str, Any], ...] = ({"autoscaling__enabled": True}, {"keda__enabled": True})
    for values in autoscalers:
        assert "replicas" not in find(helm.template(**values), "Deployment")["spec"]  # the autoscaler owns it


def test_probes_hit_health_and_ready(helm: Helm) -> None:
    c = container(helm.template())
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["ports"] == [
        {"name": "http", "containerPort": 8000, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 9464, "protocol": "TCP"},
    ]
    assert container(helm.template(gateway__env__PORT=9000))["ports"][0]["containerPort"] == 9000
    assert container(helm.template(gateway__env__METRICS_PORT=9100))["ports"][1]["containerPort"] == 9100


def test_prestop_sleeps_natively_or_by_exec(helm: Helm) -> None:
    native = container(helm.template())["lifecycle"]["preStop"]
    assert native == {"sleep": {"seconds": 10}}
    assert container(helm.template(preStop__useExecFallback=True))["lifecycle"]["preStop"] == {
        "exec": {"command": ["sleep", "10"]}
    }
    old_cluster = container(helm.template(kube_version="1.29.0"))["lifecycle"]["preStop"]
    assert old_cluster == {"exec": {"command": ["sleep", "10"]}}  # no sleep action before 1.30
    assert "lifecycle" not in container(helm.template(preStop__sleepSeconds=0))


def test_pod_is_locked_down(helm: Helm) -> None:
    docs = helm.template()
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "1010Mi"}}]  # sized from the settings
    env = plain_env(docs)
    assert env["TMPDIR"] == "/tmp" and env["PROMETHEUS_MULTIPROC_DIR"].startswith("/tmp/")
    assert pod["terminationGracePeriodSeconds"] == 75


def test_every_setting_reaches_the_container_and_parses_back(helm: Helm) -> None:
    env = plain_env(helm.template())
    values_env = yaml.safe_load((helm.chart / "values.yaml").read_text())["gateway"]["env"]
    for key, value in values_env.items():
        assert (key in env) == (value is not None), key  # null: left unset, so the app's default applies
    assert env["MAX_BODY_BYTES"] == "1048576"  # never "1.048576e+06" (Helm reads YAML numbers as floats)
    assert env["DEADLINE_CHECK_INTERVAL_SECONDS"] == "0.25"
    assert env["READY_REQUIRES_CLOSED_CIRCUIT"] == "false"
    settings: dict[str, Any] = {k.lower(): v for k, v in env.items() if k in values_env}
    assert Settings(**settings) == Settings()


def test_overridden_settings_render_exactly(helm: Helm) -> None:
    env = plain_env(
        helm.template(
            gateway__env__MAX_CONNECTIONS=20000000,
            gateway__env__UPSTREAM_URL="http://vllm:8000/v1",
            gateway__env__RATE_LIMIT_PER_MINUTE=0.5,
        )
    )
    assert env["MAX_CONNECTIONS"] == "20000000"
    assert env["UPSTREAM_URL"] == "http://vllm:8000/v1"
    assert env["RATE_LIMIT_PER_MINUTE"] == "0.5"


def test_secret_settings_come_only_from_the_existing_secret(helm: Helm) -> None:
    assert not [e for e in container(helm.template())["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container(helm.template(gateway__existingSecret="gw-secrets"))["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs == {
        "API_KEYS": {"name": "gw-secrets", "key": "api-keys", "optional": True},
        "REDIS_URL": {"name": "gw-secrets", "key": "redis-url", "optional": True},
        "UPSTREAM_API_KEY": {"name": "gw-secrets", "key": "upstream-api-key", "optional": True},
    }


def test_otel_settings(helm: Helm) -> None:
    assert not any(k.startswith("OTEL_") for k in plain_env(helm.template()))
    env = plain_env(helm.template(otel__endpoint="http://collector:4318", otel__resourceAttributes={"team": "ml"}))
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4318"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert env["OTEL_SERVICE_NAME"] == FULLNAME
    attributes = env["OTEL_RESOURCE_ATTRIBUTES"].split(",")
    assert "k8s.pod.name=$(POD_NAME)" in attributes and "team=ml" in attributes


def test_topology_spread_selects_this_release(helm: Helm) -> None:
    constraints = find(helm.template(), "Deployment")["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in constraints] == ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
    for constraint in constraints:
        assert constraint["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE


def test_image_reference(helm: Helm) -> None:
    assert container(helm.template())["image"] == "streaming-gateway:0.1.0"
    digest = "sha256:" + "a" * 64
    assert container(helm.template(image__tag="1.2.3", image__digest=digest))["image"] == (
        f"streaming-gateway:1.2.3@{digest}"
    )


def test_disruption_budget_and_network_policy(helm: Helm) -> None:
    docs = helm.template()
    pdb = find(docs, "PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == 1 and pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    policy = find(docs, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    assert policy["ingress"] == [
        {"ports": [{"port": "http", "protocol": "TCP"}]},  # any peer, each port
        {"ports": [{"port": "metrics", "protocol": "TCP"}]},
    ]
    monitoring = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    restricted = find(helm.template(networkPolicy__metricsFrom=monitoring), "NetworkPolicy")["spec"]
    assert restricted["ingress"][1] == {"ports": [{"port": "metrics", "protocol": "TCP"}], "from": monitoring}


# --- exposure -----------------------------------------------------------------------------------------


def test_ingress_carries_the_sse_settings(helm: Helm) -> None:
    ingress = find(helm.template(ingress__enabled=True), "Ingress")
    annotations = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert annotations[prefix + "proxy-buffering"] == "off"
    assert annotations[prefix + "proxy-request-buffering"] == "off"
    assert annotations[prefix + "proxy-read-timeout"] == annotations[prefix + "proxy-send-timeout"] == "300"
    assert annotations[prefix + "proxy-http-version"] == "1.1"
    assert prefix + "affinity" not in annotations
    assert ingress["spec"]["ingressClassName"] == "nginx"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]
    assert backend == {"service": {"name": FULLNAME, "port": {"name": "http"}}}
    sticky = find(helm.template(ingress__enabled=True, ingress__cookieAffinity__enabled=True), "Ingress")
    assert sticky["metadata"]["annotations"][prefix + "affinity"] == "cookie"
    assert "upstream-hash-by" not in json.dumps(sticky)  # never ip_hash stickiness


def test_http_routes_follow_the_route_map(helm: Helm) -> None:
    from .test_render import SCENARIOS

    gateway_api = SCENARIOS["gateway-api"]
    assert gateway_api is not None
    docs = helm.template(gateway_api)
    routes = {d["metadata"]["name"]: d for d in docs if d["kind"] == "HTTPRoute"}
    assert set(routes) == {f"{FULLNAME}-main", f"{FULLNAME}-api"}
    api = routes[f"{FULLNAME}-api"]["spec"]
    assert api["hostnames"] == [f"api.{NAMESPACE}.example.test"]  # hostnames are templated
    rule = api["rules"][-1]
    assert rule["backendRefs"] == [{"name": FULLNAME, "port": 80}]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/v1"}}]
    assert rule["timeouts"] == {"request": "10m", "backendRequest": "10m"}
    assert not [d for d in helm.template() if d["kind"] == "HTTPRoute"]


# --- autoscaling --------------------------------------------------------------------------------------


def test_hpa_targets_a_fraction_of_the_per_pod_limit(helm: Helm) -> None:
    hpa = find(helm.template(autoscaling__enabled=True), "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert hpa["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "streaming_active_connections"},
                "target": {"type": "AverageValue", "averageValue": "300"},
            },
        }
    ]  # 0.6 x MAX_CONNECTIONS 500
    hpa = find(
        helm.template(
            autoscaling__enabled=True, gateway__env__MAX_CONNECTIONS=1000, autoscaling__targetUtilization=0.25
        ),
        "HorizontalPodAutoscaler",
    )["spec"]
    assert hpa["metrics"][0]["pods"]["target"]["averageValue"] == "250"


def test_keda_queries_streams_in_flight(helm: Helm) -> None:
    scaled = find(helm.template(keda__enabled=True), "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == FULLNAME
    trigger = scaled["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["threshold"] == "300"
    assert trigger["metadata"]["query"] == (
        f'sum(streaming_active_connections{{namespace="{NAMESPACE}",service="{FULLNAME}"}})'
    )
    assert not [d for d in helm.template(keda__enabled=True) if d["kind"] == "HorizontalPodAutoscaler"]


# --- monitoring ---------------------------------------------------------------------------------------


def test_service_monitor_is_selected_by_kube_prometheus_stack(helm: Helm) -> None:
    monitor = find(helm.template(serviceMonitor__enabled=True), "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "honorLabels": False, "interval": "15s", "scrapeTimeout": "10s"}
    ]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_metrics_port_is_scraped_and_never_routed(helm: Helm) -> None:
    """Issue 12: /metrics has a port of its own; the Service carries it for the ServiceMonitor, while the
    ingress and the HTTPRoute send clients to the `http` port only (the gateway's public port has no /metrics)."""
    from .test_render import SCENARIOS

    docs = helm.template(ingress__enabled=True, serviceMonitor__enabled=True)
    ports = {p["name"]: p for p in find(docs, "Service")["spec"]["ports"]}
    assert ports["metrics"] == {"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"}
    assert ports["http"]["port"] == 80 and ports["http"]["targetPort"] == "http"
    assert find(docs, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "metrics"
    for path in find(docs, "Ingress")["spec"]["rules"][0]["http"]["paths"]:
        assert path["backend"]["service"]["port"] == {"name": "http"}
    gateway_api = SCENARIOS["gateway-api"]
    assert gateway_api is not None
    routes = [d for d in helm.template(gateway_api) if d["kind"] == "HTTPRoute"]
    assert routes
    for rule in (rule for route in routes for rule in route["spec"]["rules"]):
        assert [ref["port"] for ref in rule["backendRefs"]] == [ports["http"]["port"]]


def _rules(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    rule = find(docs, "PrometheusRule")
    return {r.get("alert") or r["record"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def _with_fixture_rules(chart: Path) -> Path:
    shutil.copy(FIXTURES / "files" / "prometheus-rules.yaml", chart / "files" / "prometheus-rules.yaml")
    return chart


def test_alert_templates_survive_helm(helm: Helm, scratch_chart: Path) -> None:
    chart = _with_fixture_rules(scratch_chart)
    rules = _rules(helm.template(chart=chart, prometheusRule__enabled=True, prometheusRule__runbookBaseUrl=RUNBOOK))
    ttft = rules["StreamingTTFTP99OverSLO"]["annotations"]
    assert ttft["summary"] == "TTFT p99 of {{ $labels.job }} is {{ $value | humanizeDuration }}"
    assert ttft["description"] == (
        'Pod {{ $labels.namespace }}/{{ $labels.pod }} answers slowly: {{ printf "%.2f" $value }} s.'
    )


def test_alert_overrides(helm: Helm, scratch_chart: Path) -> None:
    chart = _with_fixture_rules(scratch_chart)
    overrides = {
        "StreamingTTFTP99OverSLO": {"for": "30m", "severity": "critical", "expr": "vector(1) > 0"},
        "StreamingDrainSlow": {"disabled": True},
    }
    docs = helm.template(
        chart=chart,
        prometheusRule__enabled=True,
        prometheusRule__overrides=overrides,
        prometheusRule__runbookBaseUrl=RUNBOOK,
    )
    rules = _rules(docs)
    ttft = rules["StreamingTTFTP99OverSLO"]
    assert (ttft["for"], ttft["labels"]["severity"], ttft["expr"]) == ("30m", "critical", "vector(1) > 0")
    assert "{{ $labels.pod }}" in ttft["annotations"]["description"]
    assert "StreamingDrainSlow" not in rules
    groups = [g["name"] for g in find(docs, "PrometheusRule")["spec"]["groups"]]
    assert groups == [FULLNAME]  # named after the release; a group left empty by `disabled` is dropped
    assert rules["StreamingCircuitBreakerOpen"]["labels"]["severity"] == "critical"  # untouched


def test_rules_file_reaches_prometheus_unchanged(helm: Helm) -> None:
    """With the chart's own rules file and no overrides, every rule is rendered as written but for the release's
    scope (its selector, its group names) and the runbook base URL."""
    source = yaml.safe_load((helm.chart / "files" / "prometheus-rules.yaml").read_text())
    rendered = find(
        helm.template(prometheusRule__enabled=True, prometheusRule__runbookBaseUrl=RUNBOOK), "PrometheusRule"
    )["spec"]["groups"]
    scope = f'namespace="{NAMESPACE}", job="{FULLNAME}"'
    for group in source["groups"]:
        group["name"] = group["name"].replace("streaming-gateway", FULLNAME, 1)
        for rule in group["rules"]:
            rule["expr"] = rule["expr"].replace('job="streaming-gateway"', scope)
            if "runbook_url" in rule.get("annotations", {}):
                anchor = rule["annotations"]["runbook_url"].split("#")[1]
                rule["annotations"]["runbook_url"] = f"{RUNBOOK}#{anchor}"
    assert rendered == source["groups"]


def test_dashboards_are_configmaps_for_the_grafana_sidecar(helm: Helm) -> None:
    files = sorted((helm.chart / "files" / "dashboards").glob("*.json"))
    assert files
    docs = helm.template(dashboards__enabled=True, dashboards__namespace="monitoring")
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    assert len(maps) == len(files)
    for path in files:
        cm = maps[f"{FULLNAME}-dashboard-{path.stem}"]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["namespace"] == "monitoring"
        assert cm["data"][path.name] == path.read_text().rstrip("\n")  # verbatim, legend templates included
        json.loads(cm["data"][path.name])


# --- NOTES and the helm test pod ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, "port-forward service/gw-streaming-gateway 8000:80"),
        ({"ingress.enabled": "true"}, "http://streaming-gateway.local"),
        ({"route.main.enabled": "true", "route.main.hostnames[0]": "gw.example.test"}, "http://gw.example.test"),
        ({"service.type": "LoadBalancer"}, "status.loadBalancer.ingress"),
    ],
    ids=["cluster-ip", "ingress", "route", "load-balancer"],
)
def test_notes_branch_on_exposure_and_end_with_a_streaming_curl(
    helm: Helm, values: dict[str, str], expected: str
) -> None:
    args = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
    out = helm.run("install", RELEASE, str(helm.chart), "--dry-run=client", "--namespace", NAMESPACE, *args)
    notes = out.split("NOTES:", 1)[1]
    assert expected in notes, notes
    last = notes.strip().splitlines()
    assert last[-2].lstrip().startswith("curl -N -X POST ") and "/stream" in last[-2], last[-2:]


def test_helm_test_pod_opens_a_stream(helm: Helm) -> None:
    pod = find(helm.template(), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    spec = pod["spec"]["containers"][0]
    assert {"name": "GATEWAY_URL", "value": f"http://{FULLNAME}.{NAMESPACE}.svc:80"} in spec["env"]
    assert "curl -N" in spec["args"][0] and '"type": *"done"' in spec["args"][0]
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    assert not [d for d in helm.template(tests__enabled=False) if d["kind"] == "Pod"]
