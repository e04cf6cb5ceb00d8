"""The cost of one eager tw_matmul call (and of the same call under jit) on a small layer.

    python -P scripts/eager_overhead.py        # M = 1, 768 x 3072, 75% TW-2D, f32, G = 128

Prints the medians of 200 calls each, automatic backend. The eager call's overhead is what an
op-by-op user pays per layer; the jitted call is the floor.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_tw import ops, packing, patterns

w = np.random.default_rng(0).normal(size=(768, 3072)).astype(np.float32)
[mask] = patterns.TW2D()([np.abs(w)], 0.75, tile_size=128)
p = jax.device_put(packing.pack(w, jax.tree.map(np.asarray, mask), 128))
x = jnp.ones((1, 768), jnp.float32)
jitted = jax.jit(lambda x: ops.tw_matmul(x, p))
for name, call in (("eager", lambda: ops.tw_matmul(x, p)), ("jit", lambda: jitted(x))):
    call().block_until_ready()
    times = []
    for _ in range(200):
        t = time.perf_counter()
        call().block_until_ready()
        times.append(time.perf_counter() - t)
    print(f"{name}: {1e3 * np.median(times):.3f} ms")
