"""The `helm test` pod's script, run as written against the real gateway (`python -m app`) on loopback.

The pod runs it with the curl image's /bin/sh; here it runs with this machine's /bin/sh and curl, with
GATEWAY_URL pointing at a local gateway instead of the Service.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import GatewayFactory

from .conftest import Helm, find


def _script(helm: Helm, **values: Any) -> str:
    pod = find(helm.template(**values), "Pod")
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    return str(container["args"][0])


def _run(script: str, url: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", "-c", script],
        env={"PATH": "/usr/bin:/bin", "GATEWAY_URL": url, "TMPDIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_test_pod_streams_to_done(helm: Helm, start_gateway: GatewayFactory, tmp_path: Path) -> None:
    gateway = start_gateway(API_KEYS="key-one,key-two", MOCK_TOKENS_PER_SECOND=200, MOCK_FIRST_TOKEN_MS=5)
    script = _script(helm, gateway__existingSecret="gw-secrets")
    done = _run(script, gateway.url, tmp_path, API_KEYS="key-one,key-two")  # the pod sends the first key
    assert done.returncode == 0, done.stdout + done.stderr
    events = [line for line in done.stdout.splitlines() if line.startswith("data:")]
    assert '"type": "token"' in events[1] and '"type": "done"' in events[-1], events

    refused = _run(script, gateway.url, tmp_path)  # no key: the gateway answers 401 and the test pod fails
    assert refused.returncode != 0, refused.stdout
    assert '"type": "done"' not in refused.stdout
    assert "401" in refused.stderr, refused.stderr
