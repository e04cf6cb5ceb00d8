#!/usr/bin/env bash
# Installs jax_tw with its test extras into .venv (created if absent) and runs the test suite
# with pytest, in one worker process per core (pytest-xdist; at most 4: each worker's XLA and
# host kernel use every core as well). Extra arguments go to pytest, e.g. ./scripts/test.sh -k patterns
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh test
exec .venv/bin/pytest -q -n auto --maxprocesses 4 "$@"
