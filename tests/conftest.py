import os

# Faster XLA:CPU compiles for the many small shapes the property tests draw. Set before jax starts.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
