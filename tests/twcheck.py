"""Independent numpy references for the tests: mask expansion and pattern properties."""

import dataclasses
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jax_tw import _ffi, packing, patterns


# (input shape, output features, tile_size, layer kwargs): the configurations on which an unpruned
# tile-wise layer must equal Flax's dense layer (linen nn.Dense and nnx.Linear take the same kwargs).
DENSE_LAYER_CONFIGS = [
    ((4, 10), 12, 4, {}),
    ((1, 7), 5, 3, {}),  # M = 1, N not a multiple of G
    ((2, 3, 16), 9, 128, {"use_bias": False}),  # leading batch dims, G > N
    ((6, 8), 8, 2, {"dtype": jnp.bfloat16}),
    ((6, 8), 8, 2, {"param_dtype": jnp.bfloat16}),
    ((5, 12), 7, 4, {"precision": jax.lax.Precision.HIGHEST}),
]


def subprocess_env(**extra) -> dict:
    """The environment for a test's fresh Python process: it imports the jax_tw this process
    imported (a checkout's, not an older copy installed in the same environment) and twcheck."""
    path = [str(pathlib.Path(__file__).parent), str(pathlib.Path(packing.__file__).parents[1])]
    if os.environ.get("PYTHONPATH"):
        path.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), **extra}


def run_script_stages(name, stages, *args, timeout=600):
    """Runs ``tests/<name> <stage> <args...>`` for each stage in a fresh process; each must exit
    0 and print '<script stem> <stage> ok'."""
    script = pathlib.Path(__file__).with_name(name)
    for stage in stages:
        done = subprocess.run([sys.executable, str(script), stage, *map(str, args)],
                              capture_output=True, text=True, timeout=timeout, env=subprocess_env())
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{script.stem} {stage} ok" in done.stdout, done.stdout


def runnable_backends(base=("xla", "dense", "pallas")):
    """The tw_matmul backends the tests can run here: the host custom call on a CPU platform,
    the CUDA custom call on a GPU platform (where each was built); the Pallas kernel everywhere
    (compiled on a GPU, in interpret mode on a CPU)."""
    on_gpu = jax.default_backend() == "gpu"
    out = list(base)
    if not on_gpu and _ffi.cpu_available():
        out.append("cpu")
    if on_gpu and _ffi.cuda_available():
        out.append("cuda")
    return out


def expand_reference(columns, rows, tile_size):
    """Dense (K, N) tile mask by explicit loops over kept columns."""
    columns, rows = np.asarray(columns), np.asarray(rows)
    k, n = rows.shape[1], columns.shape[0]
    out = np.zeros((k, n), bool)
    rank = 0
    for j in range(n):
        if columns[j]:
            out[:, j] = rows[rank // tile_size]
            rank += 1
    return out


def dense_reference(mask, tile_size):
    tiles = expand_reference(mask["columns"], mask["rows"], tile_size)
    return tiles | np.asarray(mask["elements"]) if "elements" in mask else tiles


def tiles_of(columns, tile_size):
    """Lists of kept column indices, one list per tile, left to right."""
    kept = np.flatnonzero(np.asarray(columns))
    return [kept[i:i + tile_size] for i in range(0, len(kept), tile_size)]


def assert_tile_structure(mask, tile_size):
    """The TW invariant: pruned columns are empty; within a tile, every K row is kept for all of
    the tile's columns or for none; no elements outside the tiles."""
    dense = dense_reference(mask, tile_size)
    columns = np.asarray(mask["columns"])
    assert "elements" not in mask, "a tile-wise mask carries an element mask"
    assert np.shape(mask["tile_size"]) == (tile_size,), "the mask carries a wrong tile size"
    assert not dense[:, ~columns].any(), "a pruned column has kept weights"
    for cols in tiles_of(columns, tile_size):
        block = dense[:, cols]
        assert (block.all(axis=1) | ~block.any(axis=1)).all(), f"tile {cols} is ragged"


def pruned_count(masks, tile_size):
    return sum(int((~dense_reference(m, tile_size)).sum()) for m in masks)


def normalised(scores):
    """Per-layer scores divided by their mean (the fresh-mask normalisation)."""
    s = np.asarray(scores, np.float64)
    mean = s.mean()
    return s / mean if mean > 0 else s


def corrupt(p, **fields):
    """Tiles with some index arrays replaced (by corrupt ones) and a schedule to match, as
    hand-edited tiles under jit would have (packing.with_schedule, which any arrays go through)."""
    return packing.with_schedule(dataclasses.replace(p, **fields))


def clamped_reference(x, p, bias):
    """What the GPU kernels (CUDA and Pallas) are specified to compute from corrupt tiles whose
    schedule matches their indices (see corrupt): row offsets clamped into [0, len(rows)],
    out-of-range rows read as zeros, out-of-range columns never written, every column no tile
    writes set to the bias."""
    x = np.asarray(x, np.float64)
    y = np.tile(np.asarray(bias, np.float64), (x.shape[0], 1))
    r, g = len(p.rows), p.tile_size
    for i in range(p.num_tiles):
        b = min(max(int(p.row_offsets[i]), 0), r)
        e = min(max(int(p.row_offsets[i + 1]), b), r)
        rows = p.rows[b:e]
        ok = (rows >= 0) & (rows < p.k)
        cols = p.columns[i * g:(i + 1) * g]
        acc = x[:, rows[ok]] @ np.asarray(p.values[b:e][ok, :len(cols)], np.float64)
        for j, c in enumerate(cols):
            if 0 <= c < p.n:
                y[:, c] = acc[:, j] + bias[c]
    return y


def packed_layer(k, n, g, sparsity, dtype=np.float32, seed=0, pattern=None, empty_every=0,
                 keep_dense=None):
    """A random kernel, its mask and its packed tiles (values random, never zero);
    ``empty_every`` = j > 0 empties every j-th tile's rows (tiles with no kept rows)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(k, n)).astype(dtype)
    pattern = pattern or patterns.TW2D()
    [mask] = pattern([rng.random((k, n)).astype(np.float32)], sparsity, tile_size=g, min_keep=0.0)
    mask = jax.tree.map(np.asarray, mask)
    if empty_every:
        mask["rows"] = mask["rows"].copy()
        mask["rows"][::empty_every] = False
    return w, mask, packing.pack(w, mask, g, keep_dense=keep_dense)


def rounding_dot_general(lhs, rhs, dims, precision=None, **kwargs):
    """A custom product, as quantization libraries plug one into Dense / Linear layers: both
    operands rounded first."""
    return jax.lax.dot_general(jnp.round(lhs), jnp.round(rhs), dims, precision=precision)


def reference(x, w_masked, bias=None):
    """x @ w_masked (+ bias) in float64, x of shape (..., K)."""
    y = np.asarray(x, np.float64).reshape(-1, w_masked.shape[0]) @ np.asarray(w_masked, np.float64)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y.reshape(*np.shape(x)[:-1], w_masked.shape[1])


def activate64(y, activation):
    """The float64 reference of jax_tw.ops.activate: None, 'relu' or 'gelu' (exact, erfc)."""
    if activation == "relu":
        return np.maximum(y, 0.0)
    if activation == "gelu":
        return 0.5 * y * np.vectorize(math.erfc, otypes=[np.float64])(-y / math.sqrt(2.0))
    return y
