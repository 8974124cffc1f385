#!/usr/bin/env bash
# Sets up everything on a fresh Debian machine (Python 3.11, root): Debian packages the tests use,
# a virtualenv in .venv, the project with its pinned dependencies, and the chart tests' tools in
# .cache/tools (.ci/chart_tools.py), so the tests themselves download nothing. Safe to re-run: it
# skips what is already there. Sourced by .ci/serve and .ci/test.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
# Debian packages the test suite starts for real (services are started by the tests, never as daemons).
APT_PACKAGES="${APT_PACKAGES:-redis-server prometheus nginx}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for pkg in $APT_PACKAGES; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=("python3-venv")
fi
# Node runs the chart tests' CRD validators (npm packages). Any Node with npm will do (e.g. NodeSource's,
# whose nodejs package conflicts with Debian's npm), so the commands are checked, not the packages.
if [ "${BOOTSTRAP_CHART_TOOLS:-1}" = 1 ] && ! { command -v node && command -v npm; } >/dev/null 2>&1; then
  missing+=("nodejs" "npm")
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# The extras the whole suite needs (pyproject.toml): the core tests, the load tools, the cluster client.
extras="${BOOTSTRAP_EXTRAS:-test,load,cluster}"
stamp="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)-${extras}"
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing the project and its pinned dependencies ([$extras])"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "${ROOT}[${extras}]"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
if [ "${BOOTSTRAP_CHART_TOOLS:-1}" = 1 ]; then
  "$VENV/bin/python" "$ROOT/.ci/chart_tools.py"
fi
