"""The kind end-to-end kit (kind-config.yaml, k8s/): it cannot run here (no Docker engine), so its pieces are
checked for what would break it: pins, the Job's contract, file references, and the watcher's judgement."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import tomllib
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.extras import require

from .conftest import CHART, ROOT

E2E = (ROOT / "k8s" / "e2e.sh").read_text()
JOB = yaml.safe_load((ROOT / "k8s" / "locust-job.yaml").read_text())


def _watcher() -> ModuleType:
    spec = importlib.util.spec_from_file_location("watch_rollout", ROOT / "k8s" / "watch_rollout.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


WATCHER = _watcher()


def test_kind_cluster_config() -> None:
    config = yaml.safe_load((ROOT / "kind-config.yaml").read_text())
    assert config["kind"] == "Cluster" and config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    roles = [node["role"] for node in config["nodes"]]
    assert roles == ["control-plane", "worker", "worker"]
    for node in config["nodes"]:
        assert re.fullmatch(r"kindest/node:v1\.35\.\d+(@sha256:[0-9a-f]{64})?", node["image"]), node["image"]
    control = config["nodes"][0]
    assert 'node-labels: "ingress-ready=true"' in control["kubeadmConfigPatches"][0]
    assert {(m["containerPort"], m["hostPort"]) for m in control["extraPortMappings"]} == {(80, 80), (443, 443)}
    ingress = yaml.safe_load((ROOT / "k8s" / "ingress-nginx-values.yaml").read_text())["controller"]
    assert ingress["nodeSelector"] == {"ingress-ready": "true"} and ingress["hostPort"]["enabled"] is True


@pytest.mark.parametrize("version", ["1.30.0", "1.35.0"])
def test_locust_job_is_a_valid_job(version: str) -> None:
    kubernetes_validate.validate(JOB, version, strict=True)


def _pinned_locust() -> str:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = [req.split("==")[1] for reqs in extras.values() for req in reqs if req.startswith("locust==")]
    return pins[0] if pins else "2.47.0"


def test_locust_job_contract() -> None:
    spec = JOB["spec"]
    assert spec["backoffLimit"] == 0 and spec["template"]["spec"]["restartPolicy"] == "Never"
    (container,) = spec["template"]["spec"]["containers"]
    assert container["image"] == f"locustio/locust:{_pinned_locust()}"  # the repository's Locust
    script = container["args"][0]
    for flag in ("--headless", "--csv=", "--exit-code-on-error=1", "--locustfile=/mnt/locust/locustfile.py"):
        assert flag in script, flag
    assert 'exit "$rc"' in script  # Locust's verdict is the Job's
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert mounts["locustfile"] == "/mnt/locust" and volumes["locustfile"]["configMap"]["name"] == "locustfile"


def test_configmap_ships_the_locustfile_and_its_local_imports() -> None:
    shipped = set(re.findall(r"--from-file=(loadtest/[\w.]+)", E2E))
    assert "loadtest/locustfile.py" in shipped
    for path in shipped:
        assert (ROOT / path).is_file(), path
    tree = ast.parse((ROOT / "loadtest" / "locustfile.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    local = {name for name in imported if (ROOT / "loadtest" / f"{name}.py").is_file()}
    assert {f"loadtest/{name}.py" for name in local} <= shipped, local


def test_e2e_script_wiring() -> None:
    for reference in (
        "kind-config.yaml",
        "chart/ci/kind-values.yaml",
        "k8s/locust-job.yaml",
        "k8s/watch_rollout.py",
        "k8s/ingress-nginx-values.yaml",
        "k8s/kube-prometheus-stack-values.yaml",
    ):
        assert reference in E2E and (ROOT / reference).is_file(), reference
    for pin in ("INGRESS_NGINX_VERSION", "KUBE_PROMETHEUS_STACK_VERSION", "GATEWAY_API_VERSION"):
        assert re.search(rf'^{pin}="v?\d+\.\d+\.\d+"$', E2E, re.MULTILINE), pin
    assert "rollout restart" in E2E and "rollout status" in E2E and "helm test" in E2E
    kind_values = yaml.safe_load((CHART / "ci" / "kind-values.yaml").read_text())
    image = f"{kind_values['image']['repository']}:{kind_values['image']['tag']}"
    assert f'IMAGE="{image}"' in E2E and kind_values["image"]["pullPolicy"] == "Never"
    assert kind_values["ingress"]["enabled"] is True


def _log(summary: dict[str, Any], failures: int = 0) -> str:
    stats = "Type,Name,Request Count,Failure Count\n,Aggregated,120," + str(failures)
    return "\n".join(
        [
            "[2026-11-28 12:00:00] locust/INFO: Starting Locust 2.47.0",
            '{"type": "stream_summary", ' + ", ".join(f'"{k}": {v}' for k, v in summary.items()) + "}",
            "=== locust csv: run_stats.csv",
            stats,
            "=== locust csv: run_failures.csv",
            "Method,Name,Error,Occurrences",
            "=== locust exit code: 0",
        ]
    )


def test_watcher_passes_a_clean_rollout() -> None:
    observed = WATCHER.Observed(
        pods_seen={"a", "b", "c", "d"}, pods_terminated={"a"}, min_ready_endpoints=2, job_state="succeeded"
    )
    log = WATCHER.parse_job_log(_log({"completed": 100, "graceful": 3, "truncated": 0, "errors": 0}))
    assert WATCHER.locust_failures(log["tables"]) == 0
    assert WATCHER.verdict(observed, log) == []


@pytest.mark.parametrize(
    ("summary", "failures", "state", "terminated", "expected"),
    [
        ({"completed": 10, "truncated": 1, "errors": 0}, 0, "succeeded", {"a"}, "truncated = 1"),
        ({"completed": 10, "truncated": 0, "errors": 2}, 0, "succeeded", {"a"}, "errors = 2"),
        ({"completed": 10, "truncated": 0, "errors": 0}, 3, "succeeded", {"a"}, "Locust failures = 3"),
        ({"completed": 10, "truncated": 0, "errors": 0}, 0, "failed", {"a"}, "the Locust Job failed"),
        ({"completed": 10, "truncated": 0, "errors": 0}, 0, "succeeded", set(), "no gateway pod terminated"),
        ({"completed": 0, "truncated": 0, "errors": 0}, 0, "succeeded", {"a"}, "no stream completed"),
    ],
)
def test_watcher_fails_a_bad_rollout(
    summary: dict[str, Any], failures: int, state: str, terminated: set[str], expected: str
) -> None:
    observed = WATCHER.Observed(pods_terminated=terminated, min_ready_endpoints=1, job_state=state)
    problems = WATCHER.verdict(observed, WATCHER.parse_job_log(_log(summary, failures)))
    assert any(problem.startswith(expected) for problem in problems), problems


def test_watcher_fails_when_endpoints_ran_out_or_the_log_is_empty() -> None:
    observed = WATCHER.Observed(pods_terminated={"a"}, min_ready_endpoints=0, job_state="succeeded")
    problems = WATCHER.verdict(observed, WATCHER.parse_job_log(""))
    assert "the Service had no ready endpoint at some point" in problems
    assert "no stream_summary line in the Job's log" in problems


def test_watcher_calls_exist_in_the_pinned_kubernetes_client() -> None:
    require("cluster", "kubernetes")
    from kubernetes import client, config

    source = (ROOT / "k8s" / "watch_rollout.py").read_text()
    calls = {
        client.CoreV1Api: ("list_namespaced_pod", "read_namespaced_pod_log"),
        client.BatchV1Api: ("read_namespaced_job_status",),
        client.DiscoveryV1Api: ("list_namespaced_endpoint_slice",),
    }
    for api, methods in calls.items():
        for method in methods:
            assert f".{method}(" in source and callable(getattr(api, method)), method
    assert callable(config.load_kube_config)
