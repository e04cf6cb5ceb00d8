#!/usr/bin/env bash
# The GPU check: build jax_tw with its CUDA module, run the kernel tests on the GPU (the CUDA and
# the Pallas backends), run compute-sanitizer memcheck on a small kernel test, report whether XLA
# transposes x in front of the custom call, and print the benchmark table (BERT-base and
# BERT-large shapes, M = 16384, bf16, TW-2D 0-90%, dense jnp.dot side by side, a column per GPU
# backend: cuda and pallas).
#
# On a lent GPU machine (nothing can be fetched there), from the repository root here:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps nvidia-cutlass==4.2.0.0 -d .whl
# then run `scripts/gpu_check.sh` there with .whl carried. Logs, the bench JSON and the
# optimized HLO go to $OUT (or /tmp/gpu_check). On a machine without a GPU the same script
# builds, runs the tests that can run and a small CPU benchmark (a dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), GPU: ${gpu:-none}, $($PY --version)"

step "install the CUTLASS headers (nvidia-cutlass wheel, no dependencies)"
if ! $PY -c "import cutlass_library" 2>/dev/null; then
  wheel=$(ls .whl/nvidia_cutlass-*.whl 2>/dev/null | head -1)
  [ -n "$wheel" ] || { echo "no .whl/nvidia_cutlass-*.whl: see the header of this script"; exit 1; }
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/cutlass_site "$wheel" || exit 1
  export PYTHONPATH=/tmp/cutlass_site${PYTHONPATH:+:$PYTHONPATH}
fi
cutlass=$($PY -c "import importlib.util as u, os; print(os.path.join(list(u.find_spec('cutlass_library').submodule_search_locations)[0], 'source', 'include'))")

step "build and install jax_tw (CUDA on, sm_80 + sm_90)"
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
if ! $PY -m pip install --no-build-isolation --no-deps --no-index -q . \
    -Ccmake.define.JAX_TW_CUDA=ON -Ccmake.define.JAX_TW_CUTLASS_INCLUDE="$cutlass" \
    -Cbuild-dir=/tmp/jax_tw_build >"$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
# -P: import the installed jax_tw (with its compiled modules), not the source tree.
$PY -P -c "import jax, jax_tw._cuda as c; print('jax', jax.__version__, jax.devices(), 'cuda devices', c.device_count())" || exit 1

step "kernel tests (the cuda and pallas backends where a GPU is present)"
$PY -P -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_pallas.py tests/test_ops.py tests/test_packed_model.py \
  2>&1 | tee "$OUT/tests.log" | tail -25
[ "${PIPESTATUS[0]}" = 0 ] || { echo "TESTS FAILED"; status=1; }

if [ -n "$gpu" ] && command -v compute-sanitizer >/dev/null; then
  step "compute-sanitizer memcheck: small kernel tests"
  timeout 180 compute-sanitizer --tool memcheck --error-exitcode 99 \
    $PY -P -m pytest -q -x -p no:cacheprovider tests/test_cuda.py -k "memory_safe or float64_reference" \
    >"$OUT/memcheck.log" 2>&1
  rc=$?
  tail -15 "$OUT/memcheck.log"
  echo "memcheck exit code $rc (0: clean, 99: errors found, 124: timed out)"
  [ $rc = 0 ] || status=1
fi

if [ -n "$gpu" ]; then
  step "does XLA transpose x in front of the custom call?"
  $PY -P scripts/gpu_hlo.py "$OUT/hlo.txt" || status=1

  step "benchmark: bf16, M = 16384, BERT-base and BERT-large shapes, TW-2D, G = 128"
  $PY -P -m jax_tw.bench --shapes both -m 16384 --dtype bfloat16 --sparsities 0,0.25,0.5,0.75,0.9 \
    --backend cuda,pallas --repeats 7 --json "$OUT/bench.json" || status=1
else
  step "no GPU: a small CPU benchmark instead (dry run)"
  $PY -P -m jax_tw.bench -m 256 --sparsities 0.5,0.75 --repeats 3 --backend cpu,pallas \
    --json "$OUT/bench.json" || status=1
fi
echo; echo "gpu_check finished with status $status"
exit $status
