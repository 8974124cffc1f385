"""UPSTREAM_DISCOVERY=kubernetes in the chart: a Role and RoleBinding that allow listing and watching the
EndpointSlices of the watched Service's namespace, and the ServiceAccount's token, only in that mode."""

from __future__ import annotations

from typing import Any

import kubernetes_validate

from .conftest import NAMESPACE, Helm

WATCHING: dict[str, Any] = {
    "gateway__env__UPSTREAM_DISCOVERY": "kubernetes",
    "gateway__env__UPSTREAM_K8S_SERVICE": "models/llm",
    "gateway__env__UPSTREAM_URL": "http://llm.models.svc:8000/v1",
}


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, [doc["kind"] for doc in docs]
    return found[0]


def test_no_api_access_by_default(helm: Helm) -> None:
    docs = helm.template()
    assert not {"Role", "RoleBinding"} & {doc["kind"] for doc in docs}
    assert _one(docs, "Deployment")["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert _one(docs, "ServiceAccount")["automountServiceAccountToken"] is False


def test_kubernetes_discovery_may_list_and_watch_endpointslices_only(helm: Helm) -> None:
    docs = helm.template(**WATCHING)
    role, binding = _one(docs, "Role"), _one(docs, "RoleBinding")
    for doc in (role, binding):
        kubernetes_validate.validate(doc, "1.35.0", strict=True)
        assert doc["metadata"]["namespace"] == "models"  # where the watched Service is
    assert role["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}
    ]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": NAMESPACE}
    ]
    assert pod["automountServiceAccountToken"] is True  # the client authenticates with the pod's token


def test_kubernetes_discovery_needs_a_service(helm: Helm) -> None:
    error = helm.template_error(gateway__env__UPSTREAM_DISCOVERY="kubernetes")
    assert "UPSTREAM_K8S_SERVICE" in error and "namespace/name" in error
