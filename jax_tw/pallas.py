"""A Pallas tile-wise kernel: ``x @ W + bias`` over packed tiles as one ``pallas_call``.

On a GPU it is compiled by the Triton compiler inside jaxlib (nothing else to install); on a CPU
it runs in Pallas interpret mode, the same kernel code evaluated with XLA ops (slow: for tests).
:func:`jax_tw.ops.tw_matmul` runs it as ``backend='pallas'`` (or ``JAX_TW_BACKEND=pallas``).

The grid is (tiles x column chunks) x (M blocks), tiles deepest first and varying fastest, so the
programs in flight share the rows of x they read. The tile order and each tile's span of pruned
columns are the packed format's schedule (:func:`jax_tw.packing.schedule`, computed once by
``pack``), as the CUDA kernel reads them too. A program

1. walks its tile's kept K rows in blocks of ``BK``: it gathers those rows of the feature-major
   ``x^T`` (each kept K index a contiguous M-vector, so the gather is a coalesced load) and the
   tile's weight rows straight from HBM inside the kernel, and accumulates ``x_t @ W_t`` in f32;
2. writes its chunk of the tile's kept output columns (bias added, x's dtype), and the program
   of chunk 0 writes the bias (or zero) into the pruned output columns of the tile's span (those
   between the previous tile's last kept column and this tile's last): every output element is
   written exactly once, by one program, and no fill pass runs.

Indices are range-checked in the kernel (masked loads and stores), so corrupt tiles handed over
under jit never touch memory out of bounds; when their schedule matches their indices
(:func:`jax_tw.packing.with_schedule`) they give the clamped result the CUDA kernel gives (row
offsets clamped into [0, len(rows)], out-of-range rows read as zero, out-of-range columns not
written, every other column the bias).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jax_tw import _ffi, packing

__all__ = ["tw_matmul", "block_sizes", "debug"]

_DEBUG = False


@contextlib.contextmanager
def debug():
    """Within it, kernels lowered for a GPU print their jaxpr and Triton IR (``pallas_call``'s
    debug mode)."""
    global _DEBUG
    before, _DEBUG = _DEBUG, True
    try:
        yield
    finally:
        _DEBUG = before


def _pow2(v: int) -> int:
    return 1 << max(int(v) - 1, 0).bit_length()


def block_sizes(m: int, tile_size: int, dtype) -> tuple[int, int, int]:
    """(BM, BK, BN): rows of x, kept K rows and output columns per step of one program.

    Triton's dot needs power-of-two blocks of at least 16. BN covers the tile (G padded to a
    power of two) up to 128 columns, so wider tiles run as several column chunks; BK is 64
    for bfloat16 and 32 for float32 (the same bytes per step); BM is 128, or M rounded up to a
    power of two when M is smaller (M = 1 computes 16 rows, not 128).
    """
    bn = min(max(16, _pow2(tile_size)), 128)
    bk = 64 if jnp.dtype(dtype) == jnp.bfloat16 else 32
    bm = min(128, max(16, _pow2(m)))
    return bm, bk, bn


def _kernel(order_ref, offsets_ref, rows_ref, values_ref, columns_ref, pruned_ref, pruned_offsets_ref,
            bias_ref, xt_ref, y_ref, *, k, m, n, g, c, r, p, bm, bk, bn, chunks, precision):
    """One program: tile ``order[j // chunks]``, column chunk ``j % chunks``, rows block i.

    ``xt_ref`` is x^T padded to whole row blocks and ``values_ref`` padded to whole column
    chunks (zeros), so the loads along M and along G need no clamps: Triton vectorises a load
    only along indices it can prove contiguous, which a clamp hides.
    """
    j, i = pl.program_id(0), pl.program_id(1)  # tiles vary fastest: programs in flight share x
    tile = order_ref[j // chunks]
    chunk = j % chunks
    begin = jnp.clip(offsets_ref[tile], 0, r)
    end = jnp.clip(offsets_ref[tile + 1], begin, r)
    mrow = i * bm + jnp.arange(bm)  # rows of x / y
    m_ok = mrow < m
    lane = chunk * bn + jnp.arange(bn)  # position in the tile's G columns (padded)
    lane_ok = lane < g

    def step(kb, acc):
        q = begin + kb * bk + jnp.arange(bk)  # positions in rows / values
        q_ok = q < end
        q_in = jnp.minimum(q, r - 1)
        krow = plt.load(rows_ref.at[q_in], mask=q_ok, other=0)
        k_ok = q_ok & (krow >= 0) & (krow < k)
        xg = plt.load(xt_ref.at[jnp.clip(krow, 0, k - 1)[:, None], mrow[None, :]],
                      mask=k_ok[:, None], other=0)  # (BK, BM)
        w = plt.load(values_ref.at[q_in[:, None], lane[None, :]], mask=k_ok[:, None], other=0)  # (BK, BN)
        return acc + jax.lax.dot_general(xg, w, (((0,), (0,)), ((), ())), precision=precision,
                                         preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, (end - begin + bk - 1) // bk, step, jnp.zeros((bm, bn), jnp.float32))

    # The tile's kept columns of this chunk.
    pos = tile * g + lane  # index into columns
    c_ok = lane_ok & (pos < c)
    col = plt.load(columns_ref.at[jnp.minimum(pos, c - 1)], mask=c_ok, other=n)
    c_ok = c_ok & (col >= 0) & (col < n)
    b = plt.load(bias_ref.at[jnp.clip(col, 0, n - 1)], mask=c_ok, other=0)
    plt.store(y_ref.at[mrow[:, None], jnp.where(c_ok, col, n)[None, :]],
              (acc + b[None, :]).astype(y_ref.dtype), mask=m_ok[:, None] & c_ok[None, :])

    # The pruned columns of the tile's span: bias (zero without one), by chunk 0 only.
    p_begin = jnp.clip(pruned_offsets_ref[tile], 0, p)
    p_end = jnp.where(chunk == 0, jnp.clip(pruned_offsets_ref[tile + 1], p_begin, p), p_begin)

    def fill(pb, carry):
        q = p_begin + pb * bn + jnp.arange(bn)
        q_ok = q < p_end
        col = plt.load(pruned_ref.at[jnp.minimum(q, p - 1)], mask=q_ok, other=n)
        ok = q_ok & (col >= 0) & (col < n)
        b = plt.load(bias_ref.at[jnp.clip(col, 0, n - 1)], mask=ok, other=0)
        plt.store(y_ref.at[mrow[:, None], jnp.where(ok, col, n)[None, :]],
                  jnp.broadcast_to(b[None, :], (bm, bn)).astype(y_ref.dtype),
                  mask=m_ok[:, None] & ok[None, :])
        return carry

    jax.lax.fori_loop(0, (p_end - p_begin + bn - 1) // bn, fill, 0)


def _call(x2, bias, columns, row_offsets, rows, values, order, pruned, pruned_offsets, *, n, g,
          out_dtype, interpret, precision):
    """The pallas_call for (M, K) x and packed tiles with at least one kept column; the tile
    order and the pruned columns' spans come from the packed format's schedule."""
    m, k = x2.shape
    c, t = columns.shape[0], row_offsets.shape[0] - 1
    bm, bk, bn = block_sizes(m, g, x2.dtype)
    chunks = -(-g // bn)
    if rows.shape[0] == 0:  # no kept rows at all: one dummy row, never read (depth 0)
        rows, values = jnp.zeros((1,), jnp.int32), jnp.zeros((1, g), values.dtype)
    if pruned.shape[0] == 0:  # no pruned columns: one dummy, never read (empty spans)
        pruned = jnp.full((1,), n, jnp.int32)
    if chunks * bn != g:  # whole column chunks (zeros past G)
        values = jnp.pad(values, ((0, 0), (0, chunks * bn - g)))
    # f32: TF32 by default, as jnp.dot on a GPU; IEEE f32 under Precision.HIGHEST.
    precision = precision if x2.dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, k=k, m=m, n=n, g=g, c=c, r=rows.shape[0], p=pruned.shape[0],
                               bm=bm, bk=bk, bn=bn, chunks=chunks, precision=precision)
    m_blocks = pl.cdiv(m, bm)
    call = pl.pallas_call(
        kernel, out_shape=_ffi.result_type(x2, (m, n), out_dtype), grid=(t * chunks, m_blocks),
        interpret=interpret, name="jax_tw_tw_matmul", debug=_DEBUG and not interpret,
        compiler_params=plt.CompilerParams(num_warps=8 if bm * bn >= 128 * 128 else 4, num_stages=3))
    # x feature-major (every kept K index of a tile one contiguous M-vector), padded to whole
    # row blocks: XLA fuses the padding into the transpose.
    xt = jnp.pad(x2.T, ((0, 0), (0, m_blocks * bm - m)))
    return call(order, row_offsets, rows, values, columns, pruned, pruned_offsets, bias, xt)


def tw_matmul(x2: jax.Array, p, bias: jax.Array | None, out_dtype, interpret: bool,
              precision=None) -> jax.Array:
    """(M, K) x packed tiles + bias (f32 (N,) or None) -> (M, N) in ``out_dtype``, without the
    element-wise residue. ``interpret``: run in Pallas interpret mode (on a CPU). ``precision``
    of the float32 dot: None (TF32 on a GPU, as jnp.dot) or ``Precision.HIGHEST`` (IEEE f32)."""
    b = jnp.zeros((p.n,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    if np.shape(p.columns)[0] == 0 or x2.shape[0] == 0:  # no tiles (the output is the bias), or no rows
        return jnp.broadcast_to(b, (x2.shape[0], p.n)).astype(out_dtype)
    call = functools.partial(_call, n=p.n, g=p.tile_size, out_dtype=out_dtype, interpret=interpret,
                             precision=precision)
    operands = [jnp.asarray(a, jnp.int32) for a in (p.columns, p.row_offsets, p.rows)] + [
        jnp.asarray(p.values)] + [jnp.asarray(getattr(p, f), jnp.int32) for f in packing.SCHEDULE_FIELDS]
    return _ffi.fold_batch(call)(x2, b, *operands)
