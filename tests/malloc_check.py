"""Run by test_host.py in a fresh process (glibc's settings are fixed once threads allocate):
``malloc_check.py keep|default`` prints the median page faults per call of a jitted computation
with a 64 MiB output, with or without jax_tw.host.keep_freed_memory() called first."""

import resource
import sys
import warnings

from jax_tw import host

mode = sys.argv[1]
if mode == "keep":
    assert host.keep_freed_memory() is True, "mallopt refused a setting"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

x = jnp.asarray(jax.random.normal(jax.random.key(0), (4096, 4096)))  # 64 MiB
f = jax.jit(lambda x: jnp.sin(x) * 2 + x.T)
for _ in range(10):  # the heap grows over the first few calls (frees lag the next call)
    f(x).block_until_ready()
faults = []  # per call: the heap can still grow on a call (more so on a busy machine)
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
if mode == "keep":  # too late now: it says so
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        host.keep_freed_memory()
    assert any("already running" in str(w.message) for w in caught), [str(w.message) for w in caught]
print(f"malloc_check {mode} median faults {sorted(faults)[len(faults) // 2]} pages {x.nbytes // 4096}")
