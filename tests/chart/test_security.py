"""Security scan of the rendered manifests and the Dockerfile with checkov (offline: --skip-download).

Every finding must be explained below, and every explanation must still match a finding, so the list
neither hides new problems nor keeps stale excuses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

from .conftest import ROOT, Helm
from .test_render import SCENARIOS

SCANNED = ("defaults", "all-features", "keda", "kind")
GATEWAY, TEST_POD = "Deployment.streaming.gw-streaming-gateway", "Pod.streaming.gw-streaming-gateway-test-stream"
# check id -> (resources it may flag, why we accept it)
EXPLAINED: dict[str, tuple[set[str], str]] = {
    "CKV_K8S_11": (
        {GATEWAY},
        "no CPU limit on purpose: CFS throttling shows up as TTFT and inter-token latency; "
        "requests reserve the CPU (values.yaml `resources`)",
    ),
    "CKV_K8S_43": (
        {GATEWAY, TEST_POD},
        "images are referenced by tag unless `image.digest` is set (the all-features "
        "scenario pins one); users build the gateway image themselves",
    ),
    "CKV_K8S_15": (
        {GATEWAY, TEST_POD},
        "IfNotPresent with immutable tags or digests; Always would add a registry "
        "round trip to every pod start during rollouts (the kind run uses Never)",
    ),
    "CKV_K8S_8": ({TEST_POD}, "the helm test pod runs one stream to completion: a liveness probe means nothing"),
    "CKV_K8S_9": ({TEST_POD}, "the helm test pod serves no traffic: a readiness probe means nothing"),
    "CKV2_K8S_6": (
        {TEST_POD},
        "the helm test pod is kept outside the gateway's selectors (issue 13: a Service "
        "must not route to it, a PDB must not count it); it only opens one outbound stream",
    ),
    "CKV_K8S_35": (
        {GATEWAY, TEST_POD},
        "the gateway reads every setting from its environment (pydantic-settings); "
        "API_KEYS / UPSTREAM_API_KEY / REDIS_URL come from a Secret reference, "
        "never from values",
    ),
}


def test_checkov_finds_nothing_unexplained(helm: Helm, checkov: Path, tmp_path: Path) -> None:
    for scenario in SCANNED:
        path = SCENARIOS[scenario]
        args = ["template", "gw", str(helm.chart), "--namespace", "streaming", "--kube-version", "1.35.0"]
        (tmp_path / f"{scenario}.yaml").write_text(helm.run(*args, *(["-f", str(path)] if path else [])))
    shutil.copy(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    done = subprocess.run(
        [
            str(checkov),
            "-d",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "dockerfile",
            "--skip-download",
            "--output",
            "json",
            "--quiet",
            "--compact",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert done.stdout.strip(), done.stderr
    reports = json.loads(done.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}
    for report in reports:
        assert report["summary"]["parsing_errors"] == 0, report["summary"]
        assert report["summary"]["passed"] > 0, report["summary"]
    found: dict[str, set[str]] = defaultdict(set)
    for report in reports:
        for check in report["results"]["failed_checks"]:
            found[check["check_id"]].add(check["resource"])
    unexplained = {
        check: sorted(resources - EXPLAINED.get(check, (set(), ""))[0]) for check, resources in found.items()
    }
    assert not {k: v for k, v in unexplained.items() if v}, unexplained
    stale = set(EXPLAINED) - set(found)
    assert not stale, f"explanations that no longer match a finding: {sorted(stale)}"
