#!/usr/bin/env bash
# The project's test command (README, CI). Installs and starts what it needs:
# Python test deps, a docker engine if none answers, the offline test images.
#   scripts/test.sh            lint + type check + the whole suite
#   scripts/test.sh -k NAME    extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
export DOCKERREPL_REQUIRE_DOCKER=1

echo "== python deps"
# $PYTHON when given (installed into as is), else the project's .venv: a system
# python3 under PEP 668 refuses pip install, and an interpreter shared with other
# checkouts could import another checkout's dockerrepl
# shellcheck source=scripts/python-env.sh
. scripts/python-env.sh
# the integrations' hosts, pinned to the lines tested: dspy 3.4 here, 3.3 in a second
# small venv below (tests/interop/test_dspy.py only), smolagents
DEPS=(-e '.[test,dev,smolagents]' rlms 'dspy>=3.4,<3.5')
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
  "$PY" -m pip install -q "${DEPS[@]}" >/dev/null
else
  dr_venv "${DEPS[@]}"
fi
"$PY" -c 'import sys; print("python", sys.version.split()[0], sys.executable)'
"$PY" -c 'import dspy, smolagents; print("dspy", dspy.__version__, "smolagents", smolagents.__version__)'
# dspy 3.3 (no extra arguments: the whole run): dockerrepl from this checkout, on PYTHONPATH
PY33=""
if [ "$#" = 0 ]; then
  V33="${DOCKERREPL_VENV:-$ROOT/.venv}-dspy33"
  if ! "$V33/bin/python" -c 'import sys' >/dev/null 2>&1; then
    "$PY" -m venv "$V33"
  fi
  "$V33/bin/python" -m pip install -q --disable-pip-version-check \
    'dspy>=3.3,<3.4' dill pytest pytest-timeout >&2
  PY33="$V33/bin/python"
  "$PY33" -c 'import dspy; print("dspy", dspy.__version__, "(second venv)")'
fi

echo "== docker engine"
if ! timeout 20 docker info >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
  fi
  if ! timeout 20 docker info >/dev/null 2>&1; then
    (dockerd >/tmp/dockerd.log 2>&1 &)
    for _ in $(seq 1 60); do timeout 5 docker info >/dev/null 2>&1 && break; sleep 1; done
  fi
fi
timeout 20 docker info --format 'engine {{.ServerVersion}} ({{.Driver}})'

echo "== podman"
# rootful Podman for tests/docker/test_engines.py (the tests point CONTAINERS_CONF at a
# file without default_ulimits themselves; the image is loaded from docker there)
if ! command -v podman >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman) >/dev/null 2>&1 \
    || echo "podman could not be installed: the Podman tests will fail" >&2
fi
command -v podman >/dev/null 2>&1 && podman --version

echo "== rootless engines"
# a user for rootless Docker and rootless Podman (tests/docker/test_rootless.py)
scripts/rootless-setup.sh

echo "== images"
scripts/build-image.sh
scripts/build-image.sh --tag dockerrepl/rlm-python:bookworm --packages python3-dill,python3-requests,python-is-python3

echo "== ruff"
"$PY" -m ruff check dockerrepl tests scripts examples
echo "== mypy"
"$PY" -m mypy
"$PY" -m mypy --config-file scripts/mypy-bootstrap.ini  # the in-container bootstrap

echo "== pytest"
set +e
"$PY" -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ -n "$PY33" ]; then
  echo "== pytest: tests/interop/test_dspy.py on dspy 3.3"
  PYTHONPATH="$ROOT" "$PY33" -m pytest -q -p no:cacheprovider tests/interop/test_dspy.py || rc=1
fi
set -e
left=$(docker ps -aq --filter label=dockerrepl.version | wc -l)
if [ "$left" != 0 ]; then
  echo "containers left behind by the tests:" >&2
  docker ps -a --filter label=dockerrepl.version >&2
  rc=1
fi
if command -v podman >/dev/null 2>&1 \
  && [ "$(podman ps -aq --filter label=dockerrepl.version 2>/dev/null | wc -l)" != 0 ]; then
  echo "podman containers left behind by the tests:" >&2
  podman ps -a --filter label=dockerrepl.version >&2
  rc=1
fi
exit $rc
