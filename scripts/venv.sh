#!/usr/bin/env bash
# Creates .venv (if absent, with $PYTHON or python3) and installs jax_tw into it with the given
# extras, e.g. scripts/venv.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet ".[$1]"
