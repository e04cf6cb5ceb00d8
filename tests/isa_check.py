"""Checks the host kernel of the instruction-set variant named by JAX_TW_ISA (set by
test_ops.py before this process starts) against a float64 reference: few rows and blocks of
rows, tiles with no kept rows, N not a multiple of G, a residue, a bias, f32 and bf16, each
activation. Prints the variant that ran."""
import jax
import jax.numpy as jnp
import numpy as np

import jax_tw._cpu
from jax_tw import ops, packing, patterns
from twcheck import activate64, packed_layer, reference

ACTS = (None, "relu", "gelu")


rng = np.random.default_rng(0)
case = 0
for pattern in (patterns.TW2D(), patterns.TEW(residue=0.05), patterns.EW()):
    for m in (1, 3, 7, 33, 200):
        for dtype in (np.float32, jnp.bfloat16):
            for k, n, g in ((40, 70, 16), (29, 33, 8), (64, 150, 128)):
                _, _, p = packed_layer(k, n, g, 0.6, dtype, seed=m + k, pattern=pattern, empty_every=2)
                x = rng.normal(size=(m, k)).astype(dtype)
                bias = rng.normal(size=n).astype(np.float32)
                act = ACTS[(case + case // 3) % 3]  # every activation meets every shape
                case += 1
                y = np.asarray(ops.tw_matmul(x, p, bias, backend="cpu", activation=act), np.float64)
                want = activate64(reference(x, packing.unpack(p), bias), act)
                tol = 1e-5 if dtype == np.float32 else 3e-2 * np.abs(want).max()
                np.testing.assert_allclose(y, want, rtol=1e-5, atol=tol,
                                           err_msg=f"{pattern} m={m} {np.dtype(dtype).name} {k}x{n} G={g} {act}")
# An f32 output of 4 MB or more: written with non-temporal stores, rows at varying offsets.
_, _, p = packed_layer(24, 1000, 16, 0.7, np.float32, seed=1, pattern=patterns.TW2D(), empty_every=2)
x = rng.normal(size=(1100, 24)).astype(np.float32)
bias = rng.normal(size=1000).astype(np.float32)
for act in ACTS:
    y = np.asarray(ops.tw_matmul(x, p, bias, backend="cpu", activation=act), np.float64)
    want = activate64(reference(x, packing.unpack(p), bias), act)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5, err_msg=f"streamed output, {act}")
print(jax_tw._cpu.isa())
