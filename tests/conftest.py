import gc
import os

# Faster XLA:CPU compiles for the many small shapes the property tests draw. Set before jax starts.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")

import jax  # noqa: E402
import pytest  # noqa: E402

# On a GPU, XLA's f32 dots default to TF32: the reference paths the tests compare against must
# be full f32 there.
if jax.default_backend() == "gpu":
    jax.config.update("jax_default_matmul_precision", "highest")


def _read_int(path):
    try:
        with open(path, "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


# Every executable XLA:CPU compiles holds a few memory mappings until its cache entry goes, and a
# test worker compiles tens of thousands (each shape a property test draws, each eager op): a
# worker reached 65,271 of the kernel's 65,530 (vm.max_map_count) by the end of the suite, and
# crossing it crashes the next compile (mmap fails inside LLVM: a segfault or abort in
# backend_compile_and_load). So after any test that leaves more than a quarter of the limit
# mapped, the caches go (the next tests compile again).
_MAP_LIMIT = _read_int("/proc/sys/vm/max_map_count")


def _map_count():
    try:
        with open("/proc/self/maps", "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


@pytest.fixture(autouse=True)
def _bounded_memory_maps():
    yield
    if _MAP_LIMIT and _map_count() > _MAP_LIMIT // 4:
        jax.clear_caches()
        gc.collect()
