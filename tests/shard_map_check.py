"""Run by test_ops.py in a subprocess with 4 CPU devices: tw_matmul inside jax.shard_map."""
import dataclasses
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"  # also on a machine with a GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jax_tw import ops, packing, patterns  # noqa: E402

backend = sys.argv[1]
assert len(jax.devices()) == 4
rng = np.random.default_rng(0)
w = rng.normal(size=(16, 24)).astype(np.float32)
[mask] = patterns.TEW(residue=0.05)([np.abs(w)], 0.5, tile_size=8)
p = jax.device_put(packing.pack(w, jax.tree.map(np.asarray, mask), 8))
dense = packing.unpack(p)
mesh = jax.make_mesh((4,), ("b",))
x = jax.device_put(jnp.asarray(rng.normal(size=(8, 16)), jnp.float32), jax.NamedSharding(mesh, P("b")))

f = lambda x, p: ops.tw_matmul(x, p, backend=backend)
y = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("b"), P()), out_specs=P("b")))(x, p)
np.testing.assert_allclose(np.asarray(y), np.asarray(x) @ dense, rtol=1e-5, atol=1e-5)

# A wrong out_specs (claiming a replicated result) must be refused, not return one shard.
try:
    jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("b"), P()), out_specs=P()))(x, p)
except ValueError as e:
    assert "out_specs" in str(e), e
else:
    raise AssertionError("shard_map accepted out_specs=P() for a batch-sharded result")

# Gradients through shard_map: d(values) summed over the shards equals the dense gradient.
# (Without the dense cache: a forward that reads it could not train values, and is refused.)
def loss(x, values):
    q = dataclasses.replace(p, values=values, dense=None)
    y = jax.shard_map(f, mesh=mesh, in_specs=(P("b"), P()), out_specs=P("b"))(x, q)
    return jnp.sum(jnp.sin(y))

gx, gv = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, p.values)
gx_ref, gw_ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w)), argnums=(0, 1))(np.asarray(x), dense)
np.testing.assert_allclose(np.asarray(gx), gx_ref, rtol=1e-5, atol=1e-5)
gpacked = packing.pack(np.asarray(gw_ref), jax.tree.map(np.asarray, mask), 8)
widths = [min(8, len(p.columns) - 8 * t) for t in range(p.num_tiles)]
for t, wd in enumerate(widths):
    sl = slice(int(p.row_offsets[t]), int(p.row_offsets[t + 1]))
    np.testing.assert_allclose(np.asarray(gv)[sl, :wd], gpacked.values[sl, :wd], rtol=1e-5, atol=1e-5)
# The same x under jit alone, on the mesh's explicit sharding (jax.make_mesh's default): the
# result keeps x's row sharding, and gradients (on the XLA path) work as well.
g = lambda x, values: jnp.sum(jnp.sin(ops.tw_matmul(x, dataclasses.replace(p, values=values, dense=None),
                                                    backend=backend)))
y = jax.jit(f)(x, p)
assert jax.typeof(y).sharding.spec == P("b", None), jax.typeof(y)
np.testing.assert_allclose(np.asarray(y), np.asarray(x) @ dense, rtol=1e-5, atol=1e-5)
gx, gv = jax.jit(jax.grad(g, argnums=(0, 1)))(x, p.values)
np.testing.assert_allclose(np.asarray(gx), gx_ref, rtol=1e-5, atol=1e-5)
for t, wd in enumerate(widths):
    sl = slice(int(p.row_offsets[t]), int(p.row_offsets[t + 1]))
    np.testing.assert_allclose(np.asarray(gv)[sl, :wd], gpacked.values[sl, :wd], rtol=1e-5, atol=1e-5)
print("shard_map ok", backend)
