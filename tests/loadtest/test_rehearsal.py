"""The rolling-restart rehearsal (`python -m loadtest.rehearsal`) in its short CI form, for real: 3 gateway
instances (gunicorn, 2 workers each), Debian's nginx with the chart's Ingress settings, Debian's Prometheus, Locust
headless; each instance taken out of nginx, SIGTERMed, drained and replaced under load.

- `full`: a drain timeout longer than the streams: no stream truncated, none ended in an error, none needed
  server_shutdown, exit code 0, a valid PNG and a report with the numbers.
- `short-drain`: a drain timeout shorter than the streams: the streams still running at the deadline ended with
  server_shutdown (graceful > 0) and none ended silently (truncated = 0).
- `models`: the gateways stay, the model servers roll (fake ones behind a fake API server's EndpointSlices):
  each replaced, marked terminating and SIGKILLed with streams in flight, which continue on another model server
  (UPSTREAM_CONTINUATION=vllm): no stream failed, truncated or refused, each text exactly the fake's.

nginx and Prometheus are required: a missing one fails the test (CI installs both, .ci/bootstrap.sh). Every
process a rehearsal starts is stopped by the rehearsal; if the rehearsal itself has to be killed, the test kills
the process groups it recorded.
"""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loadtest.harness.errors import HarnessError
from loadtest.harness.nginx import Nginx, chart_ingress
from loadtest.harness.ports import free_port
from loadtest.harness.process import Supervisor, kill_recorded, require_binary
from tests.conftest import ROOT
from tests.extras import require

GUARD_S = 100.0  # guard only: how long one short rehearsal may take before the test fails
STOP_GUARD_S = 30.0  # guard only: how long a rehearsal asked to stop (SIGTERM) may take to clean up
SHORT = [
    "--instances",
    "3",
    "--users",
    "10",
    "--duration",
    "12",
    "--prestop",
    "0.5",
    "--warmup",
    "2",
    "--cooldown",
    "2",
]


@dataclass
class Run:
    returncode: int
    output: str
    out: Path

    @property
    def results(self) -> dict[str, Any]:
        path = self.out / "rehearsal.json"
        assert path.exists(), self.output
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    @property
    def report(self) -> str:
        return (self.out / "report.md").read_text()


@pytest.fixture(autouse=True)
def required_binaries() -> None:
    for binary in ("nginx", "prometheus"):
        try:
            require_binary(binary)
        except HarnessError as exc:
            pytest.fail(str(exc))  # never a skip


def run_rehearsal(tmp_path: Path, *args: str) -> Run:
    require("load", "locust", "websocket", "matplotlib")  # it runs Locust and draws its picture
    out = tmp_path / "rehearsal"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest.rehearsal", *args, "--output-dir", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=GUARD_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the rehearsal stops everything it started
        try:
            output, _ = proc.communicate(timeout=STOP_GUARD_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"the rehearsal did not finish within {GUARD_S:g} s:\n{output}")
    finally:
        if proc.poll() is None:  # the test itself was interrupted (pytest-timeout, Ctrl-C)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_GUARD_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        leftovers = kill_recorded(out / "processes.json")  # only if the rehearsal could not clean up
    assert leftovers == [], f"processes the rehearsal left running: {leftovers}"
    return Run(proc.returncode, output, out)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, after checking its signature and every chunk's CRC up to IEND."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    offset, chunks = 8, []
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in chunk {kind!r}"
        chunks.append((kind, body))
        offset += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND" and any(k == b"IDAT" for k, _ in chunks)
    width, height = struct.unpack(">II", chunks[0][1][:8])
    return width, height


def assert_common(run: Run) -> dict[str, Any]:
    """What every mode shows: exit 0, zero truncated and errored streams, each instance drained and replaced,
    Prometheus data for each instance, a valid PNG and a report carrying the numbers."""
    assert run.returncode == 0, run.output
    results = run.results
    counts = results["summary"]
    assert results["ok"] is True, results["checks"]
    assert (counts["truncated"], counts["errors"]) == (0, 0), counts
    assert counts["completed"] > 0 and counts["in_flight"] == 0, counts
    assert counts["started"] == sum(
        counts[k] for k in ("completed", "graceful", "truncated", "refused", "errors", "aborted")
    )
    for endpoint in ("/stream", "/v1/chat/completions", "/ws"):
        assert results["by_endpoint"][endpoint]["completed"] > 0, endpoint

    terminations = results["terminations"]
    assert [t["instance"] for t in terminations] == ["gw-0", "gw-1", "gw-2"]
    reloads = {r["why"]: r for r in results["nginx_reloads"]}
    for t in terminations:
        # exited by itself after SIGTERM (one the rehearsal had to SIGKILL has no exit code 0, and fails `ok`)
        assert t["exit_code"] == 0, t
        assert t["removed_at"] < t["sigterm_at"] < t["exited_at"] <= t["ready_at"] <= t["added_at"], t
        # the preStop order: nginx had stopped routing to the instance before it got SIGTERM (0.002: rounding)
        removal = reloads[f"remove {t['instance']}"]
        assert t["removed_at"] <= removal["at"] + 0.002 and removal["at"] + removal["took_s"] <= t["sigterm_at"] + 0.002
    # nginx: out and back in for each instance, in order
    assert [r["why"] for r in results["nginx_reloads"]] == [
        f"{step} gw-{i}" for i in range(3) for step in ("remove", "add")
    ]

    active = {s["labels"]["instance"]: s["values"] for s in results["prometheus"]["active_connections"]}
    assert set(active) == {"gw-0", "gw-1", "gw-2"}
    assert all(any(v > 0 for _, v in values) for values in active.values()), active  # each carried streams
    assert any(v == v for s in results["prometheus"]["ttft_p95"] for _, v in s["values"])  # some non-NaN p95

    width, height = png_size(run.out / "rollout.png")
    assert width >= 600 and height >= 400

    report = run.report
    assert report in run.output  # printed as well
    assert "](rollout.png)" in report
    assert (
        f"| {counts['started']} | {counts['completed']} | {counts['graceful']} | {counts['truncated']} | "
        f"{counts['refused']} | {counts['errors']} | {counts['aborted']} |"
    ) in report
    for t in terminations:
        assert f"| {t['instance']} |" in report and f"**{t['drain_s']:.2f} s**" in report
    assert "- [ ]" not in report  # every check passed
    assert (run.out / "locust_stats.csv").exists() and (run.out / "logs" / "nginx.conf").exists()
    assert not (run.out / "processes.json").exists()  # removed once everything stopped
    return results


def test_nginx_config_mirrors_the_chart_ingress(tmp_path: Path) -> None:
    """The rendered config passes `nginx -t` and carries what the chart's Ingress asks ingress-nginx for."""
    nginx = Nginx(tmp_path, Supervisor(tmp_path / "processes.json").spawn)
    nginx.port = free_port()
    nginx.generation = 7
    nginx._write(["127.0.0.1:1001", "127.0.0.1:1002"])  # runs `nginx -t` on it
    conf = nginx.conf.read_text()
    ingress = chart_ingress()
    timeout = int(ingress["proxyTimeoutSeconds"])
    for directive in (
        "proxy_buffering off;",
        "proxy_request_buffering off;",
        "proxy_http_version 1.1;",
        f"proxy_read_timeout {timeout}s;",
        f"proxy_send_timeout {timeout}s;",
        f"client_max_body_size {ingress['proxyBodySize']};",
        "proxy_set_header Connection $connection_upgrade;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_next_upstream error timeout http_503 non_idempotent;",
        "keepalive 64;",
        "server 127.0.0.1:1001 max_fails=1 fail_timeout=10s;",
        "server 127.0.0.1:1002 max_fails=1 fail_timeout=10s;",
        f"listen 127.0.0.1:{nginx.port};",
        'return 200 "7\\n";',
        "daemon off;",
        f"pid {tmp_path}/nginx.pid;",
    ):
        assert directive in conf, directive
    assert "{{" not in conf
    # keep-alive upstream: plain requests send an empty Connection header, WebSocket upgrades `upgrade`
    assert "default upgrade;" in conf and "''      '';" in conf


def test_rolling_restart_under_load_truncates_nothing(tmp_path: Path) -> None:
    """Drain (10 s) longer than the streams (60 tokens at 20 tok/s: 3 s): every stream in flight finishes."""
    run = run_rehearsal(tmp_path, *SHORT, "--mode", "full", "--drain-timeout", "10", "--max-tokens", "60")
    results = assert_common(run)
    assert results["summary"]["graceful"] == 0, results["by_reason"]
    for t in results["terminations"]:
        # the drain waited for every stream and ended when the last one finished: had its deadline come first,
        # the streams still running would have been cut (app/drain.py)
        assert t["cut_by_drain"] == 0, t


def test_short_drain_ends_cut_streams_with_server_shutdown(tmp_path: Path) -> None:
    """Drain (1 s) shorter than the streams (100 tokens: 5 s): the ones still running get server_shutdown."""
    run = run_rehearsal(
        tmp_path, *SHORT, "--mode", "short-drain", "--drain-timeout", "1", "--close-grace", "1", "--max-tokens", "100"
    )
    results = assert_common(run)
    counts = results["summary"]
    assert counts["graceful"] > 0, counts
    assert counts["reconnects"] > 0  # users reconnect after a graceful end
    assert sum(t["cut_by_drain"] or 0 for t in results["terminations"]) > 0
    assert set(results["by_reason"]) <= {"graceful:server_shutdown", "refused:503:draining", "refused:1012:draining"}, (
        results["by_reason"]
    )


def test_rolling_the_model_servers_fails_no_stream(tmp_path: Path) -> None:
    """Three model servers, each replaced and SIGKILLed (1 s after it went terminating) under 20 users' streams of
    100 tokens at 20 tok/s (5 s): the streams it held continue elsewhere, to the exact text (Locust checks each
    /stream and /ws text against the fake's)."""
    run = run_rehearsal(
        tmp_path,
        "--mode",
        "models",
        "--instances",
        "1",
        "--models",
        "3",
        "--users",
        "20",
        "--duration",
        "12",  # a floor: the three rolls and the cooldown take longer, and set the end
        "--warmup",
        "3",
        "--cooldown",
        "3",
        "--max-tokens",
        "100",
    )
    results = run.results
    counts, models = results["summary"], results["models"]
    rolls = results["model_rolls"]
    assert [r["server"].split(".")[0] for r in rolls] == ["model-0", "model-1", "model-2"]
    assert all(r["added_at"] <= r["terminating_at"] < r["killed_at"] <= r["deleted_at"] for r in rolls), rolls
    assert models["killed_in_flight"] > 0, rolls  # the kills cut streams mid-stream: there was something to continue
    # the target: every stream a killed server held continued on another one
    assert (counts["errors"], counts["truncated"], counts["refused"]) == (0, 0, 0), results["by_reason"]
    # (not compared with killed_in_flight: a stream may end between the fakes' count and the kill)
    assert models["continued"] > 0 and models["continuation_failed"] == 0, models
    assert counts["completed"] > 0 and counts["in_flight"] == 0, counts
    for endpoint in ("/stream", "/v1/chat/completions", "/ws"):
        assert results["by_endpoint"][endpoint]["completed"] > 0, endpoint
    assert results["ok"] is True and run.returncode == 0, results["checks"]
    report = run.report
    assert (
        f"started {counts['started']}, completed {counts['completed']}, failed 0, truncated 0, "
        f"continued {models['continued']}"
    ) in report
    assert "- [ ]" not in report
