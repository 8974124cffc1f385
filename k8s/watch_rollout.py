"""Watch a rollout under load on the kind cluster and judge the Locust Job (used by k8s/e2e.sh).

    python k8s/watch_rollout.py --namespace streaming --release gw --job locust

While the Job runs, polls once a second: the gateway's pods (which ones terminate, which start), the
Service's ready endpoints (they must never reach zero) and the Job's status. When the Job ends, reads its
log: the locustfile's `stream_summary` JSON line and Locust's CSV (printed by the Job). Prints one JSON
report and exits 0 only if the Job succeeded with streams completed, zero truncated, zero errors, zero
Locust failures, and pods were replaced while the endpoints never went empty.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

POLL_S = 1.0
CSV_MARKER = "=== locust csv: "


@dataclass
class Observed:
    pods_seen: set[str] = field(default_factory=set)
    pods_terminated: set[str] = field(default_factory=set)
    min_ready_endpoints: int | None = None
    job_state: str = "running"


def parse_job_log(text: str) -> dict[str, Any]:
    """The last stream summary and the CSV tables (by file name) from the Locust Job's log."""
    summary: dict[str, Any] = {}
    tables: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith(CSV_MARKER):
            current = tables[line[len(CSV_MARKER) :].strip()] = []
            continue
        if line.startswith("=== "):
            current = None
            continue
        if current is not None:
            current.append(line)
            continue
        if line.startswith("{") and '"stream_summary"' in line:
            summary = json.loads(line)
    parsed = {name: list(csv.DictReader(io.StringIO("\n".join(rows)))) for name, rows in tables.items()}
    return {"summary": summary, "tables": parsed}


def locust_failures(tables: dict[str, list[dict[str, str]]]) -> int | None:
    for row in tables.get("run_stats.csv", []):
        if row.get("Name") == "Aggregated":
            return int(row["Failure Count"])
    return None


def verdict(observed: Observed, log: dict[str, Any]) -> list[str]:
    """Why the run failed; empty when it passed."""
    problems = []
    summary = log["summary"]
    if observed.job_state != "succeeded":
        problems.append(f"the Locust Job {observed.job_state}")
    if not summary:
        problems.append("no stream_summary line in the Job's log")
    else:
        for key in ("truncated", "errors"):
            if summary.get(key) != 0:
                problems.append(f"{key} = {summary.get(key)}")
        if not summary.get("completed"):
            problems.append("no stream completed")
    failures = locust_failures(log["tables"])
    if failures != 0:
        problems.append(f"Locust failures = {failures}")
    if not observed.pods_terminated:
        problems.append("no gateway pod terminated: the rollout did not happen under load")
    if observed.min_ready_endpoints is not None and observed.min_ready_endpoints < 1:
        problems.append("the Service had no ready endpoint at some point")
    return problems


def watch(namespace: str, release: str, job: str, timeout_s: float) -> tuple[Observed, str]:
    from kubernetes import client, config

    config.load_kube_config()
    core, batch, discovery = client.CoreV1Api(), client.BatchV1Api(), client.DiscoveryV1Api()
    pods_selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/name=streaming-gateway"
    service = f"{release}-streaming-gateway"
    observed = Observed()
    deadline = time.monotonic() + timeout_s
    while observed.job_state == "running":
        if time.monotonic() > deadline:
            observed.job_state = f"did not finish within {timeout_s:.0f}s"
            break
        for pod in core.list_namespaced_pod(namespace, label_selector=pods_selector).items:
            observed.pods_seen.add(pod.metadata.name)
            if pod.metadata.deletion_timestamp is not None:
                observed.pods_terminated.add(pod.metadata.name)
        slices = discovery.list_namespaced_endpoint_slice(
            namespace, label_selector=f"kubernetes.io/service-name={service}"
        ).items
        ready = sum(1 for s in slices for e in (s.endpoints or []) if e.conditions and e.conditions.ready)
        observed.min_ready_endpoints = (
            ready if observed.min_ready_endpoints is None else min(observed.min_ready_endpoints, ready)
        )
        status = batch.read_namespaced_job_status(job, namespace).status
        if status.succeeded:
            observed.job_state = "succeeded"
        elif status.failed:
            observed.job_state = "failed"
        else:
            time.sleep(POLL_S)  # poll interval
    pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
    text = core.read_namespaced_pod_log(pods[0].metadata.name, namespace) if pods else ""
    return observed, text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--namespace", default="streaming")
    parser.add_argument("--release", default="gw")
    parser.add_argument("--job", default="locust")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the Job")
    args = parser.parse_args(argv)
    observed, text = watch(args.namespace, args.release, args.job, args.timeout)
    log = parse_job_log(text)
    problems = verdict(observed, log)
    report = {
        **asdict(observed),
        "summary": log["summary"],
        "locust_failures": locust_failures(log["tables"]),
        "problems": problems,
        "ok": not problems,
    }
    print(json.dumps(report, default=sorted, indent=2))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
