#!/usr/bin/env bash
# Installs jax_tw with its test extras into .venv (created if absent) and runs the test suite.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k patterns
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet '.[test]'
exec .venv/bin/pytest -q "$@"
