"""The Pallas backend: on a CPU its kernel runs in Pallas interpret mode (the kernel's own code,
evaluated by XLA:CPU), on a GPU compiled by Triton; against float64 references on random data.
Its CUDA lowering is checked without a GPU. Shapes are small: interpret mode is slow. The
backend-agnostic tests of test_ops.py and test_packed_model.py run it too."""

import contextlib
import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_tw import ops, packing, patterns
from jax_tw import pallas as tw_pallas
from twcheck import clamped_reference, corrupt, packed_layer, reference


def _layer(k, n, g, sparsity, dtype=np.float32, seed=0, pattern=None, empty_tiles=True, keep_dense=False):
    """twcheck.packed_layer's tiles, every third tile emptied when ``empty_tiles``."""
    return packed_layer(k, n, g, sparsity, dtype, seed, pattern, empty_every=3 if empty_tiles else 0,
                        keep_dense=keep_dense)[2]


def _reference(x, p, bias=None):
    return reference(x, packing.unpack(p), bias)


def _check(y, want, dtype):
    y = np.asarray(y, np.float64)
    assert np.isfinite(y).all()  # interpret mode starts the output as NaN: all of it was written
    if dtype == np.float32:
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4)
    else:  # bf16 operands exact, f32 accumulation, one bf16 rounding of y
        np.testing.assert_allclose(y, want, rtol=2 ** -7, atol=1e-2 * np.abs(want).max())


CASES = [  # (M, K, N, G, sparsity, dtype)
    (1, 24, 40, 12, 0.6, np.float32),  # M = 1, G = 12, N not a multiple of G
    (70, 32, 150, 64, 0.5, jnp.bfloat16),  # M not a multiple of the block (64)
    (9, 40, 260, 200, 0.4, np.float32),  # G = 200: two column chunks per tile
    (33, 70, 300, 128, 0.75, jnp.bfloat16),  # G = 128, tiles deeper than BK
]


@pytest.mark.parametrize("m,k,n,g,s,dtype", CASES)
def test_matches_float64_reference_with_bias(m, k, n, g, s, dtype):
    p = _layer(k, n, g, s, dtype, seed=m)
    assert len(p.columns) < n and (np.diff(p.row_offsets) == 0).any()  # pruned columns, empty tiles
    rng = np.random.default_rng(1)
    x = rng.normal(size=(m, k)).astype(dtype)
    bias = rng.normal(size=(n,)).astype(np.float32)
    y = jax.jit(lambda x, p, b: ops.tw_matmul(x, p, b, backend="pallas"))(x, p, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    _check(y, _reference(x, p, bias), dtype)


def test_residue_no_bias_and_every_column_pruned():
    rng = np.random.default_rng(2)
    p = _layer(24, 50, 8, 0.7, pattern=patterns.TEW(residue=0.05))
    assert len(p.residue_rows)
    x = rng.normal(size=(5, 24)).astype(np.float32)
    _check(ops.tw_matmul(x, p, backend="pallas"), _reference(x, p), np.float32)
    empty = {"columns": np.zeros(10, bool), "rows": np.zeros((2, 6), bool), "tile_size": np.zeros(8, bool)}
    q = packing.pack(rng.normal(size=(6, 10)).astype(np.float32), empty)
    bias = rng.normal(size=(10,)).astype(np.float32)
    y = ops.tw_matmul(rng.normal(size=(3, 6)).astype(np.float32), q, bias, backend="pallas")
    np.testing.assert_array_equal(np.asarray(y), np.tile(bias, (3, 1)))


def test_grads_jit_and_vmap():
    p = jax.device_put(_layer(16, 40, 8, 0.5, seed=3))
    rng = np.random.default_rng(4)
    xs = jnp.asarray(rng.normal(size=(3, 4, 16)), jnp.float32)
    f = lambda x, v: ops.tw_matmul(x, dataclasses.replace(p, values=v), backend="pallas")
    w = packing.unpack(p).astype(np.float64)
    want = np.asarray(xs, np.float64) @ w
    np.testing.assert_allclose(jax.jit(jax.vmap(f, in_axes=(0, None)))(xs, p.values), want, rtol=1e-5, atol=1e-5)
    gx, gv = jax.jit(jax.grad(lambda x, v: jnp.sum(f(x, v) ** 2), argnums=(0, 1)))(xs[0], p.values)
    np.testing.assert_allclose(gx, 2 * (np.asarray(xs[0], np.float64) @ w) @ w.T, rtol=1e-5, atol=1e-5)
    gw = 2 * np.asarray(xs[0], np.float64).T @ (np.asarray(xs[0], np.float64) @ w)  # dense dL/dW
    gpacked = packing.pack(gw.astype(np.float32), {"columns": np.isin(np.arange(40), p.columns),
                                                   "rows": _rows_mask(p), "tile_size": np.zeros(8, bool)})
    np.testing.assert_allclose(np.asarray(gv)[:, :8], gpacked.values[:, :8], rtol=1e-4, atol=1e-4)


def _rows_mask(p):
    rows = np.zeros((-(-p.n // p.tile_size), p.k), bool)
    for t in range(p.num_tiles):
        rows[t, p.rows[p.row_offsets[t]:p.row_offsets[t + 1]]] = True
    return rows


def test_memory_safe_and_clamped_on_corrupt_tiles_under_jit():
    """Under jit the tiles' data cannot be checked: the kernel masks every index and gives the
    clamped result (the one the CUDA kernel is specified to give), every output written."""
    p = _layer(24, 60, 8, 0.5, seed=5, empty_tiles=False)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(7, 24)).astype(np.float32)
    bias = rng.normal(size=(60,)).astype(np.float32)
    interpret = jax.default_backend() != "gpu"  # on a GPU: the compiled kernel
    f = jax.jit(lambda x, p, b: tw_pallas.tw_matmul(x, p, b, jnp.float32, interpret=interpret,
                                                    precision=jax.lax.Precision.HIGHEST))
    rows = np.array(p.rows)
    rows[::2] += 10 ** 6
    for bad in (corrupt(p, rows=rows), corrupt(p, columns=p.columns - 10 ** 6),
                corrupt(p, row_offsets=p.row_offsets * 1000)):
        y = np.asarray(f(x, bad, bias), np.float64)
        np.testing.assert_allclose(y, clamped_reference(x, bad, bias), rtol=1e-5, atol=1e-4)


def test_block_sizes_follow_tile_size_and_dtype():
    assert tw_pallas.block_sizes(1, 12, jnp.float32) == (16, 32, 16)
    assert tw_pallas.block_sizes(4096, 64, jnp.bfloat16) == (128, 64, 64)
    assert tw_pallas.block_sizes(4096, 200, jnp.float32) == (128, 32, 128)
    assert tw_pallas.block_sizes(70, 128, jnp.bfloat16) == (128, 64, 128)


def _lower_for_cuda(f, *args):
    """``jax.jit(f)`` traced and lowered for the "cuda" platform on a machine without a GPU. From
    jax 0.11 the Triton lowering reads the target GPU from the device, or where there is none
    from the abstract mesh in force while tracing: an H100 names the target (earlier versions
    do not look)."""
    lower = lambda: jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
    if jax.default_backend() == "gpu":
        return lower()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="cuda")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        return lower()


def test_lowers_to_a_triton_kernel_with_its_dot_for_cuda():
    """Without a GPU: the backend lowers for the "cuda" platform into XLA's Triton custom call,
    and the kernel's Triton IR (printed by pallas_call's debug mode) holds its dot."""
    p = _layer(64, 256, 128, 0.5, jnp.bfloat16)
    x = jnp.ones((256, 64), jnp.bfloat16)
    lower = lambda: _lower_for_cuda(lambda x, p: ops.tw_matmul(x, p, backend="pallas"), x, p)
    hlo = lower().as_text()
    assert "__gpu$xla.gpu.triton" in hlo and "jax_tw_tw_matmul" in hlo
    out = io.StringIO()
    with contextlib.redirect_stdout(out), tw_pallas.debug():  # a fresh trace, in debug mode
        _lower_for_cuda(lambda x, p: tw_pallas.tw_matmul(x, p, None, x.dtype, interpret=False), x, p)
    assert "tt.dot" in out.getvalue(), out.getvalue()[-2000:]


@pytest.mark.parametrize("precision,tf32", [(None, True), (jax.lax.Precision.HIGH, True),
                                            (jax.lax.Precision.HIGHEST, False)])
def test_f32_dot_precision_follows_the_call(precision, tf32):
    """float32 on a GPU: TF32 tensor cores by default, as jnp.dot; IEEE f32 under HIGHEST (the
    Triton IR's dot, lowered for "cuda" on this machine, says `inputPrecision = tf32`, or
    nothing for its default, IEEE)."""
    p = _layer(64, 256, 128, 0.5, jnp.float32)
    x = jnp.ones((256, 64), jnp.float32)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), tw_pallas.debug():
        _lower_for_cuda(lambda x, p: ops.tw_matmul(x, p, backend="pallas", precision=precision), x, p)
    dots = [line for line in out.getvalue().splitlines() if "tt.dot" in line]
    assert dots, out.getvalue()[-2000:]
    for line in dots:
        assert ("inputPrecision = tf32" in line) == tf32 and ("inputPrecision" in line) == tf32, line
