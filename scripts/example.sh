#!/usr/bin/env bash
# Installs jax_tw with its example extras into .venv (created if absent) and runs the main
# example on its defaults. Extra arguments go to the example, e.g. ./scripts/example.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh examples
exec .venv/bin/python examples/train_bert_flax.py "$@"
