"""Every scenario (defaults and chart/ci/*-values.yaml): `helm lint --strict`, `helm template`, and every
rendered object validated against the Kubernetes 1.30 and 1.35 schemas (kubernetes-validate, strict: no
unknown fields) or, for custom resources, against their CRD schemas (@kubernetes-models/*, run by Node).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from .conftest import CHART, Helm, ci_values_files

KUBE_VERSIONS = ("1.30.0", "1.35.0")  # the oldest with the native preStop sleep, and kind's node image
SCENARIOS = {"defaults": None} | {path.name.removesuffix("-values.yaml"): path for path in ci_values_files()}
# Kinds whose schema comes from a CRD, not from Kubernetes itself.
CRD_KINDS = {"HTTPRoute", "ServiceMonitor", "PrometheusRule", "ScaledObject"}
EXPECTED_SCENARIOS = {"default", "ingress-nginx", "gateway-api", "keda", "hpa", "observability", "all-features"}


def render(helm: Helm, scenario: str, kube_version: str = "1.35.0") -> list[dict[str, Any]]:
    path = SCENARIOS[scenario]
    return helm.template(*([path] if path else []), kube_version=kube_version)


def test_every_ci_scenario_is_there() -> None:
    assert EXPECTED_SCENARIOS <= set(SCENARIOS), sorted(SCENARIOS)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm_lint_strict(helm: Helm, scenario: str) -> None:
    path = SCENARIOS[scenario]
    out = helm.run("lint", "--strict", str(helm.chart), *(["-f", str(path)] if path else []))
    assert "0 chart(s) failed" in out, out


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rendered_objects_match_kubernetes_schemas(helm: Helm, scenario: str, kube_version: str) -> None:
    docs = render(helm, scenario, kube_version)
    assert {"Deployment", "Service"} <= {d["kind"] for d in docs}
    errors = []
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.message}")
    assert not errors, "\n".join(errors)


def test_custom_resources_match_their_crd_schemas(helm: Helm, crd_models: Path) -> None:
    docs = [d for scenario in sorted(SCENARIOS) for d in render(helm, scenario) if d["kind"] in CRD_KINDS]
    assert {d["kind"] for d in docs} == CRD_KINDS  # the scenarios cover every custom resource the chart has
    done = subprocess.run(
        ["node", str(Path(__file__).with_name("validate_crds.mjs")), str(crd_models)],
        input=json.dumps(docs),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    failures = [r for r in json.loads(done.stdout) if not r["ok"]]
    assert not failures, failures


def test_crd_validation_catches_a_bad_object(crd_models: Path) -> None:
    """The validators are real: a malformed HTTPRoute timeout and ScaledObject without a target fail."""
    bad = [
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "x"},
            "spec": {"rules": [{"timeouts": {"request": "five minutes"}}]},
        },
        {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"}, "spec": {"triggers": []}},
    ]
    done = subprocess.run(
        ["node", str(Path(__file__).with_name("validate_crds.mjs")), str(crd_models)],
        input=json.dumps(bad),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert [r["ok"] for r in json.loads(done.stdout)] == [False, False], done.stdout


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_selector_labels_never_include_the_chart_version(helm: Helm, scenario: str) -> None:
    selectors = []
    for doc in render(helm, scenario):
        spec = doc.get("spec", {})
        kind = doc["kind"]
        if kind == "Deployment":
            selectors.append(spec["selector"]["matchLabels"])
            selectors += [
                c["labelSelector"]["matchLabels"] for c in spec["template"]["spec"].get("topologySpreadConstraints", [])
            ]
        elif kind in ("PodDisruptionBudget", "ServiceMonitor"):
            selectors.append(spec["selector"]["matchLabels"])
        elif kind == "NetworkPolicy":
            selectors.append(spec["podSelector"]["matchLabels"])
        elif kind == "Service":
            selectors.append(spec["selector"])
    assert selectors
    for selector in selectors:
        assert set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/instance"}, selector


def test_objects_are_namespaced_to_the_release(helm: Helm) -> None:
    for doc in render(helm, "all-features"):
        if doc["kind"] == "ConfigMap" and "grafana_dashboard" in doc["metadata"].get("labels", {}):
            continue  # dashboards go to the Grafana sidecar's namespace when `dashboards.namespace` is set
        assert doc["metadata"]["namespace"] == "streaming", doc["metadata"]


def test_default_install_needs_no_custom_resources(helm: Helm) -> None:
    kinds = {d["kind"] for d in render(helm, "defaults")}
    assert kinds == {
        "Deployment",
        "Service",
        "ServiceAccount",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Pod",
    }, kinds


def test_chart_metadata() -> None:
    import yaml

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert (chart["apiVersion"], chart["name"], chart["appVersion"]) == ("v2", "streaming-gateway", "0.1.0")
