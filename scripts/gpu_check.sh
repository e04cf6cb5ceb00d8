#!/usr/bin/env bash
# The GPU check, in stages that each fit one device call (well under 10 minutes) and write their
# log to $OUT/<stage>.log, so that a session with a lent GPU can run them one by one and stop
# early:
#
#   scripts/gpu_check.sh build      build and install jax_tw with its CUDA module (sm_80, sm_90, sm_90a)
#   scripts/gpu_check.sh test       kernel tests on the GPU: the cuda and pallas backends against
#                                   float64 references (test_cuda, test_pallas, and the cuda and
#                                   pallas cases of test_ops and test_packed_model)
#   scripts/gpu_check.sh memcheck   compute-sanitizer memcheck on one small kernel test
#   scripts/gpu_check.sh hlo        does XLA transpose x in front of the custom call?
#   scripts/gpu_check.sh bench      bf16, M = 16384, BERT-base and BERT-large shapes, TW-2D
#                                   0-90%, dense jnp.dot side by side, cuda and pallas columns
#                                   (on an H100/H200 the cuda column is the Hopper wgmma kernel)
#   scripts/gpu_check.sh bench-sm80 the same, cuda only, with the sm80 kernel forced
#                                   (JAX_TW_CUDA_KERNEL=sm80): the two kernels side by side
#   scripts/gpu_check.sh all        every stage in turn (a dry run here; too long for one call)
#
# Each stage after `build` needs the installed build: on a fresh machine run `build` in the same
# call (`scripts/gpu_check.sh build test`). Stages run in the order given; the first failure
# stops the rest, or with KEEP_GOING=1 only a failed build does (the exit status is then the
# first failure's). The log of every stage goes to $OUT (default /tmp/gpu_check). Time limits:
# TEST_TIMEOUT (default 540 s), MEMCHECK_TIMEOUT (300), BENCH_TIMEOUT (540), and TEST_WORKERS
# (pytest-xdist processes for the test stage, default 1); DEADLINE (seconds from the start)
# caps every stage's limit at the time left before it, so that several stages fit one call:
#   KEEP_GOING=1 TEST_WORKERS=8 TEST_TIMEOUT=170 MEMCHECK_TIMEOUT=75 DEADLINE=555 \
#     scripts/gpu_check.sh build test memcheck hlo bench
#
# On a lent GPU machine (nothing can be fetched there), from the repository root here:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps nvidia-cutlass==4.2.0.0 -d .whl
# and carry .whl in every call. Without a GPU, `test` runs what can run here, `memcheck` and
# `hlo` say they need a GPU, and `bench` runs a small CPU benchmark (the dry run of each stage).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
# A stage's time limit: the one asked for, or the time left before DEADLINE if that is less.
limit() {
  local left=$(( ${DEADLINE:-1000000} - SECONDS ))
  [ "$left" -lt "$1" ] || { echo "$1"; return; }
  [ "$left" -gt 1 ] && echo "$left" || echo 1
}
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)

# The CUTLASS headers: the installed wheel, or the carried one unpacked into /tmp/cutlass_site.
cutlass_include() {
  if ! $PY -c "import cutlass_library" 2>/dev/null && [ ! -d /tmp/cutlass_site/cutlass_library ]; then
    local wheel
    wheel=$(ls .whl/nvidia_cutlass-*.whl 2>/dev/null | head -1)
    [ -n "$wheel" ] || { echo "no .whl/nvidia_cutlass-*.whl: see the header of this script" >&2; return 1; }
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/cutlass_site "$wheel" >&2 || return 1
  fi
  [ -d /tmp/cutlass_site/cutlass_library ] && export PYTHONPATH=/tmp/cutlass_site${PYTHONPATH:+:$PYTHONPATH}
  $PY -c "import importlib.util as u, os; print(os.path.join(list(u.find_spec('cutlass_library').submodule_search_locations)[0], 'source', 'include'))"
}

# -P: import the installed jax_tw (with its compiled modules), not the source tree.
installed() {
  $PY -P -c "import jax_tw._cuda" 2>/dev/null ||
    { echo "jax_tw with its CUDA module is not installed: run the build stage first (same call)"; return 1; }
}

stage_build() {
  local cutlass
  cutlass=$(cutlass_include) || return 1
  export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
  # An interpreter without its C headers: use the same minor version's, carried in .whl (copied
  # there from any CPython of that version: the extension ABI is the minor version's).
  local pyinc=() ver
  ver=$($PY -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
  if ! $PY -c "import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" &&
     [ -f ".whl/python$ver-include/Python.h" ]; then
    echo "no Python.h for this interpreter: using .whl/python$ver-include"
    pyinc=(-Ccmake.define.Python_INCLUDE_DIR="$PWD/.whl/python$ver-include")
  fi
  local start=$SECONDS
  # --no-build-isolation: the lent machine has no network; it has scikit-build-core, pybind11, ninja.
  $PY -m pip install --no-build-isolation --no-deps --no-index -q . \
      -Ccmake.define.JAX_TW_CUDA=ON -Ccmake.define.JAX_TW_CUTLASS_INCLUDE="$cutlass" \
      -Cbuild-dir=/tmp/jax_tw_build "${pyinc[@]}" || { echo "BUILD FAILED"; return 1; }
  echo "built and installed in $((SECONDS - start)) s"
  $PY -P -c "import jax, jax_tw._cuda as c; print('jax', jax.__version__, jax.devices(), 'cuda devices', c.device_count())"
}

stage_test() {
  installed || return 1
  # Only what runs a GPU backend (-k matches the module names too): the xla and dense cases and
  # the host-only checks (the CuTe layout check, the ISA variants) run in CI.
  # --maxfail, not -x: a first run on a new GPU should show every failure, not the first.
  local workers=()
  [ "${TEST_WORKERS:-1}" -gt 1 ] && workers=(-n "$TEST_WORKERS")
  timeout "$(limit "${TEST_TIMEOUT:-540}")" $PY -P -m pytest -q --maxfail=30 -rfE -p no:cacheprovider \
      --durations=5 "${workers[@]}" tests/test_cuda.py tests/test_pallas.py tests/test_ops.py \
      tests/test_packed_model.py -k "(cuda or pallas) and not index_assumptions and not narrower_isa"
}

stage_memcheck() {
  installed || return 1
  if [ -z "$gpu" ] || ! command -v compute-sanitizer >/dev/null; then
    echo "memcheck needs a GPU and compute-sanitizer: skipped"; return 0
  fi
  timeout "$(limit "${MEMCHECK_TIMEOUT:-300}")" compute-sanitizer --tool memcheck --error-exitcode 99 \
    $PY -P -m pytest -q -x -p no:cacheprovider tests/test_cuda.py -k "memory_safe"
  local rc=$?
  echo "memcheck exit code $rc (0: clean, 99: errors found, 124: timed out)"
  return $rc
}

stage_hlo() {
  installed || return 1
  [ -n "$gpu" ] || { echo "the HLO check needs a GPU: skipped"; return 0; }
  $PY -P scripts/gpu_hlo.py "$OUT/hlo.txt"
}

stage_bench() {
  installed || return 1
  if [ -n "$gpu" ]; then
    timeout "$(limit "${BENCH_TIMEOUT:-540}")" $PY -P -m jax_tw.bench --shapes both -m 16384 --dtype bfloat16 \
      --sparsities 0,0.25,0.5,0.75,0.9 --backend cuda,pallas --repeats 7 --json "$OUT/bench.json"
  else
    echo "no GPU: a small CPU benchmark instead (dry run)"
    $PY -P -m jax_tw.bench -m 256 --sparsities 0.5,0.75 --repeats 3 --backend cpu,pallas \
      --json "$OUT/bench.json"
  fi
}

stage_bench-sm80() {
  installed || return 1
  [ -n "$gpu" ] || { echo "bench-sm80 needs a GPU: skipped"; return 0; }
  JAX_TW_CUDA_KERNEL=sm80 timeout "$(limit "${BENCH_TIMEOUT:-540}")" $PY -P -m jax_tw.bench --shapes both -m 16384 --dtype bfloat16 \
    --sparsities 0,0.25,0.5,0.75,0.9 --backend cuda --repeats 7 --json "$OUT/bench_sm80.json"
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || { sed -n '2,33p' "$0"; exit 2; }
[ "${stages[0]}" = all ] && stages=(build test memcheck hlo bench bench-sm80)
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), GPU: ${gpu:-none}, $($PY --version)"
for stage in "${stages[@]}"; do
  case $stage in build|test|memcheck|hlo|bench|bench-sm80) ;; *) echo "unknown stage $stage"; exit 2 ;; esac
  echo; echo "=== $stage ($(date -u +%H:%M:%S))"
  start=$SECONDS
  "stage_$stage" 2>&1 | tee "$OUT/$stage.log"
  rc=${PIPESTATUS[0]}
  echo "=== $stage: exit $rc in $((SECONDS - start)) s" | tee -a "$OUT/$stage.log"
  if [ "$rc" != 0 ]; then
    [ "${KEEP_GOING:-0}" = 1 ] && [ "$stage" != build ] || exit "$rc"
    [ "${first_rc:-0}" != 0 ] || first_rc=$rc
  fi
done
exit "${first_rc:-0}"
