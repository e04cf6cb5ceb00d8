import os

# Faster XLA:CPU compiles for the many small shapes the property tests draw. Set before jax starts.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")

import jax  # noqa: E402

# On a GPU, XLA's f32 dots default to TF32: the reference paths the tests compare against must
# be full f32 there.
if jax.default_backend() == "gpu":
    jax.config.update("jax_default_matmul_precision", "highest")
