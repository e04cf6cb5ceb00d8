"""Sparsity patterns: pure functions from importance scores to masks.

A *layer mask* is the ``tw_mask`` collection entry of one :class:`jax_tw.nn.TWDense`
layer with kernel ``(K, N)`` and tile size ``G``::

    {'columns':   bool (N,),      # output columns kept by column pruning
     'rows':      bool (T, K),    # T = ceil(N / G): K rows kept by each tile
     'tile_size': bool (G,),      # all False: carries G in its static shape, see mask_tile_size
     'elements':  bool (K, N)}    # weights kept outside the tiles (TEW residue, baselines);
                                  # absent where a pattern has none (TW-2D, TW-1D)

Tiles are formed from the kept columns, left to right: the i-th kept column (0-based)
belongs to tile ``i // G``, so every tile but the last has exactly ``G`` kept columns.
Weight ``(k, j)`` is kept when ``columns[j] and rows[tile(j), k]`` (the tile mask, see
:func:`expand`) or when ``elements[k, j]`` (see :func:`dense_mask`).

Patterns (all take a list of per-layer score matrices, one global ranking across them
unless ``per_layer=True``):

* :class:`TW2D`  global column pruning, then in-tile row pruning (the main pattern).
* :class:`TW1D`  fixed ``G``-wide tiles in original column order, in-tile row pruning only.
* :class:`TEW`   TW-2D at ``s + residue``, then the ``residue`` fraction of the most important
  weights TW removed given back element-wise (in ``elements``, apart from the tiles).
* :class:`EW`, :class:`VW`, :class:`BW`  unstructured, vector-wise and block-wise baselines;
  their masks live in ``elements`` with an empty tile mask.

Ranking rules, shared by all patterns:

* Scores are non-negative importances (``|w|``, ``(g w)^2``...). Each layer's scores are divided
  by their mean over the layer's currently kept weights, so layers of different scales compare
  fairly; a vector (column, row segment, block) scores the mean of its elements, so vectors of
  different lengths compare fairly.
* Vectors are pruned lowest score first until the pruned weight count is nearest to
  ``round(sparsity * total)`` (ties in the count: fewer pruned). The requested sparsity is hit
  exactly up to rounding to whole vectors.
* Ties between equal scores: the vector that comes first (layer order, then tile, then index) is
  pruned first. ``jnp.argsort(stable=True)`` makes this deterministic.
* ``previous`` masks only shrink: a weight pruned before stays pruned (even if the requested
  sparsity is then exceeded).
* ``min_keep`` is a per-layer floor: the top ``ceil(min_keep ** share * n)`` vectors of each
  stage stay, so a layer keeps at least about ``min_keep`` of its weights. Floors win over the
  target.

TW-2D splits the total sparsity ``s`` between columns and rows by ``column_share`` ``c``:
``1 - s_columns = (1 - s_final) ** c``. Columns are pruned first (``s_columns = min(s,
s_columns_final)``) and rows only once the columns reached their final share. This order keeps
tiles fixed while rows are pruned, which is what lets gradual pruning keep the tile structure
*and* only grow masks *and* hit the requested sparsity at every step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array
LayerMask = dict  # {'columns': (N,) bool, 'rows': (T, K) bool, 'elements': (K, N) bool}

__all__ = [
    "LayerMask", "Pattern", "TW2D", "TW1D", "TEW", "EW", "VW", "BW", "get",
    "num_tiles", "keep_all", "expand", "dense_mask", "check_positive_int", "check_fraction",
    "check_tile_size",
    "check_sparsity", "layer_masks", "plain_dict",
    "check_layer_mask", "mask_tile_size", "tile_marker", "kernel_matrix", "mask_matrix_shape",
]

TILE_KEY = "tile_size"  # the mask entry that carries G


# ----------------------------------------------------------------------------- validation

def check_positive_int(value: Any, name: str) -> int:
    """Returns ``value`` as an int, or raises ValueError naming ``name`` unless it is a positive
    integer (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_fraction(value: Any, name: str, closed: bool = False) -> float:
    """Returns ``value`` (a real number or 0-d array) as a float, or raises ValueError naming
    ``name`` unless it lies in [0, 1) ([0, 1] when ``closed``)."""
    interval = "[0, 1]" if closed else "[0, 1)"
    a = np.asarray(value) if _is_concrete(value) else None
    if a is None or a.shape != () or a.dtype == bool or not (
            np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    if not (0.0 <= float(a) <= 1.0 if closed else 0.0 <= float(a) < 1.0):
        raise ValueError(f"{name} must be in {interval}, got {float(a)!r}")
    return float(a)


def check_tile_size(tile_size: Any) -> int:
    """Returns ``tile_size`` as an int, or raises ValueError unless it is a positive integer."""
    return check_positive_int(tile_size, "tile_size")


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_sparsity(sparsity: Any, name: str = "sparsity") -> None:
    """Raises ValueError unless ``sparsity`` lies in [0, 1). Traced values are not checked."""
    if not _is_concrete(sparsity):
        return
    value = check_fraction(sparsity, name)
    if np.float32(value) >= 1.0:  # sparsities are computed in float32
        raise ValueError(f"{name} must be in [0, 1), got {float(value)!r}, which is 1.0 in float32")


def num_tiles(n: int, tile_size: int) -> int:
    """Number of tiles ``T = ceil(n / tile_size)`` a layer with ``n`` output columns can hold."""
    return -(-n // check_tile_size(tile_size))


def tile_marker(tile_size: int) -> np.ndarray:
    """The ``tile_size`` entry of a layer mask: an all-False ``(G,)`` array whose static shape
    carries G (known under jit; G bytes, not an empty array, which Orbax refuses to save)."""
    return np.zeros((check_tile_size(tile_size),), bool)


def keep_all(k: int, n: int, tile_size: int, elements: bool = False) -> LayerMask:
    """The layer mask that keeps every weight of a ``(k, n)`` kernel (TWDense's initial mask).

    ``elements=True`` adds an (empty) element mask, as patterns with a residue need.

    >>> m = keep_all(4, 6, tile_size=4)
    >>> m['columns'].shape, m['rows'].shape, mask_tile_size(m), 'elements' in m
    ((6,), (2, 4), 4, False)
    """
    t = num_tiles(n, tile_size)
    mask = {"columns": jnp.ones((n,), bool), "rows": jnp.ones((t, k), bool),
            TILE_KEY: jnp.asarray(tile_marker(tile_size))}
    if elements:
        mask["elements"] = jnp.zeros((k, n), bool)
    return mask


def mask_tile_size(mask: Any, tile_size: Any = None, where: str = "layer") -> int:
    """The tile size G of a layer mask: the one it carries (its ``tile_size`` entry), which
    ``tile_size``, if given, must equal. A mask built by hand without the entry needs
    ``tile_size``.

    >>> mask_tile_size(keep_all(4, 6, tile_size=4))
    4
    >>> mask_tile_size(keep_all(4, 6, tile_size=4), tile_size=2)
    Traceback (most recent call last):
    ...
    ValueError: layer: the mask was made for tile_size=4, got tile_size=2
    """
    carried = None
    if hasattr(mask, "keys") and TILE_KEY in mask:
        shape = tuple(jnp.shape(mask[TILE_KEY]))
        if len(shape) != 1 or shape[0] <= 0:
            raise ValueError(f"{where}: tw_mask '{TILE_KEY}' must be a (G,) array "
                             f"carrying the tile size, got shape {shape}")
        carried = shape[0]
    if tile_size is not None:
        tile_size = check_tile_size(tile_size)
        if carried is not None and carried != tile_size:
            raise ValueError(f"{where}: the mask was made for tile_size={carried}, "
                             f"got tile_size={tile_size}")
        return tile_size
    if carried is None:
        raise ValueError(f"{where}: the mask carries no tile size (no '{TILE_KEY}' entry, see "
                         "jax_tw.patterns.tile_marker): pass tile_size")
    return carried


def check_layer_mask(mask: Any, k: int, n: int, tile_size: Any = None, where: str = "layer") -> int:
    """Raises ValueError unless ``mask`` is a layer mask for a ``(k, n)`` kernel (and
    ``tile_size``, if given); returns its tile size."""
    required, optional = {"columns", "rows"}, {TILE_KEY, "elements"}
    if not hasattr(mask, "keys") or not required <= set(mask.keys()) <= required | optional:
        got = sorted(mask.keys()) if hasattr(mask, "keys") else type(mask).__name__
        raise ValueError(f"{where}: tw_mask entry must have keys {sorted(required)} (and "
                         f"optionally {sorted(optional)}), got {got}")
    tile_size = mask_tile_size(mask, tile_size, where)
    expected = {"columns": (n,), "rows": (num_tiles(n, tile_size), k), "elements": (k, n)}
    for key, shape in expected.items():
        if key not in mask:
            continue
        got = tuple(jnp.shape(mask[key]))
        if got != shape:
            raise ValueError(
                f"{where}: tw_mask '{key}' has shape {got}, expected {shape} for a kernel of "
                f"shape {(k, n)} with tile_size={tile_size}")
    for key in mask.keys():
        if jnp.result_type(mask[key]) != jnp.bool_:
            raise ValueError(f"{where}: tw_mask '{key}' must be boolean, got dtype "
                             f"{jnp.result_type(mask[key])}")
    return tile_size


def layer_masks(tw_mask: Any) -> dict[tuple, LayerMask]:
    """{layer path (tuple of str): layer mask} for every layer mask in a ``tw_mask`` tree.

    >>> layer_masks({'enc': {'q': keep_all(2, 3, 2)}}).keys()
    dict_keys([('enc', 'q')])
    """
    from flax import traverse_util

    layers: dict[tuple, LayerMask] = {}
    for path, leaf in traverse_util.flatten_dict(plain_dict(tw_mask)).items():
        layers.setdefault(path[:-1], {})[path[-1]] = leaf
    return layers


def plain_dict(tree: Any) -> Any:
    """Nested mappings (FrozenDict and ``nnx.State`` included) as nested plain dicts with str
    keys (an NNX list's integer keys become '0', '1'...); ``nnx.Variable`` leaves as their
    values; other leaves (boxed linen params such as ``nn.with_partitioning``'s included) as
    they are."""
    if isinstance(tree, nnx.Variable):
        return tree.get_value()
    return {str(k): plain_dict(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def stack_axes(mask: Any) -> tuple[int, ...]:
    """The leading axes over which ``nn.scan`` or ``nnx.vmap`` stacked copies of a layer (its
    ``columns`` are then (..., N)); () for a single layer."""
    if not hasattr(mask, "keys") or "columns" not in mask:
        return ()
    return tuple(int(d) for d in jnp.shape(mask["columns"]))[:-1]


def check_stack(mask: Any, where: str = "layer") -> tuple[int, ...]:
    """:func:`stack_axes` of a layer mask, checked: no axis of length 0, and every entry leads
    with the axes, then has its own dims ((N,) columns and marker, (T, K) rows, (K, N)
    elements)."""
    stack = stack_axes(mask)
    if 0 in stack:
        raise ValueError(f"{where} stacks the layer over leading axes {stack}: no copy to prune")
    for key in (mask.keys() if stack else ()):
        shape, dims = tuple(jnp.shape(mask[key])), 1 if key in ("columns", TILE_KEY) else 2
        if shape[:len(stack)] != stack or len(shape) != len(stack) + dims:
            raise ValueError(
                f"{where} '{key}' has shape {shape}, but its 'columns' stack the layer over "
                f"leading axes {stack} (as nn.scan or nnx.vmap do): every entry of the layer's "
                f"mask must lead with them, then have its own {'one dim' if dims == 1 else 'two dims'}")
    return stack


def check_not_stacked(stack: tuple, where: str) -> None:
    """Raises ValueError for a layer stacked over ``stack`` (non-empty): packed tiles differ in
    size from copy to copy, so they cannot be stacked for ``nn.scan`` or ``nnx.scan``."""
    if stack:
        raise ValueError(
            f"{where}: the layer is stacked over leading axes {tuple(stack)} (nn.scan, nnx.vmap); "
            "each copy packs to tiles of its own size, which cannot be stacked to run under a "
            "scan: for packed inference, build the model with its layers unrolled and give each "
            "layer its copy (jax.tree.map(lambda a: a[i], ...) of the stacked params and masks)")


def mask_matrix_shape(mask: Any) -> tuple[int, int]:
    """(K, N) of the kernel matrix a layer mask is for, read from its ``rows`` and ``columns``."""
    if not hasattr(mask, "keys") or not {"columns", "rows"} <= set(mask.keys()):
        got = sorted(mask.keys()) if hasattr(mask, "keys") else type(mask).__name__
        raise ValueError(f"a tw_mask layer entry must have keys 'columns' and 'rows', got {got}")
    return int(jnp.shape(mask["rows"])[-1]), int(jnp.shape(mask["columns"])[0])


def kernel_matrix(kernel: Any, mask: Any, tile_size: Any = None, where: str = "layer") -> Any:
    """``kernel`` as the (K, N) matrix ``mask`` is for: a kernel with more dims (``DenseGeneral``)
    whose leading (contracted) dims multiply to K and the rest to N is reshaped; a (K, N) kernel
    is checked with :func:`check_layer_mask`. Raises ValueError, naming both shapes, otherwise.
    A (K, N) mask is ``mask.reshape(kernel.shape)`` for the kernel."""
    shape = tuple(int(d) for d in jnp.shape(kernel))
    if len(shape) == 2:  # name the mask entry that does not fit
        check_layer_mask(mask, *shape, tile_size, where=where)
        return kernel
    k, n = mask_matrix_shape(mask)
    if not any(math.prod(shape[:i]) == k and math.prod(shape[i:]) == n
               for i in range(1, len(shape))):
        raise ValueError(f"{where}: the kernel has shape {shape}, which does not multiply as the "
                         f"({k}, {n}) matrix its tw_mask was made for (leading dims giving K={k}, "
                         f"the rest N={n})")
    return kernel.reshape(k, n)


# ----------------------------------------------------------------------------- expansion

def _tile_of_columns(columns: Array, tile_size: int) -> Array:
    """Tile index of every column: ``(rank among kept columns) // G``; T for pruned columns."""
    t = num_tiles(columns.shape[0], tile_size)
    tile = (jnp.cumsum(columns.astype(jnp.int32)) - 1) // tile_size
    return jnp.where(columns, tile, t)


def expand(columns: Array, rows: Array, tile_size: int) -> Array:
    """Expands a compact tile mask to the dense ``(K, N)`` element mask.

    >>> cols = jnp.array([True, False, True, True])
    >>> rows = jnp.array([[True, False, True], [False, True, True]])  # (T=2, K=3)
    >>> expand(cols, rows, tile_size=2).astype(int)
    Array([[1, 0, 1, 0],
           [0, 0, 0, 1],
           [1, 0, 1, 1]], dtype=int32)
    """
    columns, rows = jnp.asarray(columns), jnp.asarray(rows)
    tile = _tile_of_columns(columns, tile_size)
    t = rows.shape[0]
    per_column = rows[jnp.minimum(tile, t - 1)]  # (N, K)
    return (per_column & columns[:, None]).T


def dense_mask(mask: LayerMask, tile_size: int | None = None) -> Array:
    """The dense ``(K, N)`` mask of a layer: its tile mask or its element mask (``tile_size``
    defaults to the mask's own, see :func:`mask_tile_size`)."""
    tiles = expand(mask["columns"], mask["rows"], mask_tile_size(mask, tile_size))
    return tiles | jnp.asarray(mask["elements"]) if "elements" in mask else tiles


# ----------------------------------------------------------------------------- selection core

class _Count(NamedTuple):
    """A non-negative count of weights that may pass 2**31 (JAX has no int64 unless x64 is on).

    ``low`` is the count modulo 2**32 (uint32, exact) and ``approx`` a float32 estimate; as
    long as the estimate is off by less than 2**31 the two fix the count exactly. Prefix sums
    use a pairwise scan, which keeps the estimate within about ``2 log2(n) 2**-24`` of the
    total: exact beyond 2**40 weights.
    """

    low: Array
    approx: Array

    def __add__(self, other):
        other = _count(other)
        return _Count(self.low + other.low, self.approx + other.approx)

    __radd__ = __add__

    def __sub__(self, other):
        other = _count(other)
        return _Count(self.low - other.low, self.approx - other.approx)

    def __rsub__(self, other):
        return _count(other) - self

    def __mul__(self, factor: int):
        return _Count(self.low * jnp.uint32(factor % 2 ** 32), self.approx * np.float32(factor))


def _count(value: Any) -> _Count:
    """A :class:`_Count` from a non-negative Python int or integer array (or a _Count)."""
    if isinstance(value, _Count):
        return value
    if isinstance(value, (int, np.integer)):
        return _Count(jnp.uint32(int(value) % 2 ** 32), jnp.float32(value))
    value = jnp.asarray(value)
    return _Count(value.astype(jnp.uint32), value.astype(jnp.float32))


def _prefix_counts(lengths: Array) -> _Count:
    """Inclusive prefix sums of non-negative int32 lengths, as a :class:`_Count`."""
    return _Count(jnp.cumsum(lengths.astype(jnp.uint32)),
                  jax.lax.associative_scan(jnp.add, lengths.astype(jnp.float32)))


def _distance(a: _Count, b: _Count) -> Array:
    """``|a - b|`` as int32 where it is below 2**30, else int32 max (a far distance)."""
    diff = jax.lax.bitcast_convert_type(a.low - b.low, jnp.int32)  # exact while |a - b| < 2**31
    near = jnp.abs(a.approx - b.approx) < 2.0 ** 30
    return jnp.where(near, jnp.abs(jnp.where(near, diff, 0)), jnp.iinfo(jnp.int32).max)


def _small(count: _Count) -> Array:
    """A count known to be below 2**31 as int32."""
    return jax.lax.bitcast_convert_type(count.low, jnp.int32)


def _where(cond: Array, a: Any, b: Any) -> _Count:
    a, b = _count(a), _count(b)
    return _Count(jnp.where(cond, a.low, b.low), jnp.where(cond, a.approx, b.approx))


def _target(sparsity: Array, total: int) -> _Count:
    """``round(sparsity * total)`` weights (float32 precision), as a :class:`_Count`."""
    t = jnp.round(jnp.asarray(sparsity, jnp.float32) * np.float32(total))
    high = jnp.floor(t / 2.0 ** 32)  # exact: both are float32 integers
    return _Count((t - high * 2.0 ** 32).astype(jnp.uint32), t)


def _prune_lowest(scores: Array, lengths: Array, forced: Array, protected: Array,
                  target: _Count) -> Array:
    """Prunes the lowest-scoring vectors until their total length is nearest ``target``.

    All arguments are 1-D over vectors (``target`` is a weight count; ``lengths`` None: every
    vector is one weight, as when ranking single weights). ``forced`` vectors
    are always pruned, ``protected`` ones never (forced wins). Equal scores: lower index first.
    Returns the boolean pruned vector.
    """
    n = scores.shape[0]
    protected = protected & ~forced
    key = jnp.where(forced, -jnp.inf, jnp.where(protected, jnp.inf, scores.astype(jnp.float32)))
    if lengths is None:  # single weights: the nearest count is the target itself, no sort needed
        p = jnp.clip(jnp.minimum(_small(_count(target)), n), jnp.sum(forced), n - jnp.sum(protected))
        return _first_in_order(key, p)
    order = jnp.argsort(key, stable=True)
    cum = _prefix_counts(jnp.concatenate([jnp.zeros((1,), jnp.int32), lengths[order].astype(jnp.int32)]))
    p = jnp.argmin(_distance(cum, _count(target)))  # the scalar target broadcasts
    p = jnp.clip(p, jnp.sum(forced), n - jnp.sum(protected))
    return jnp.zeros((n,), bool).at[order].set(jnp.arange(n) < p)


def _select(groups: Sequence[tuple], targets: Sequence[Array], total_target: Array,
            per_layer: bool) -> list[Array]:
    """Runs :func:`_prune_lowest` per layer, or once over all layers' vectors concatenated.

    ``groups[i]`` = (scores, lengths, forced, protected) of layer i, arrays of any shape (flattened
    in C order, which fixes the tie order); ``lengths`` None where the vectors are single weights
    (then in every group).
    """
    shapes = [g[0].shape for g in groups]
    flat = [tuple(None if a is None else a.reshape(-1) for a in g) for g in groups]
    if per_layer:
        out = [_prune_lowest(*g, t) for g, t in zip(flat, targets)]
    else:
        cat = [None if parts[0] is None else jnp.concatenate(parts) for parts in zip(*flat)]
        pruned = _prune_lowest(*cat, total_target)
        sizes = np.cumsum([g[0].shape[0] for g in flat])[:-1]
        out = jnp.split(pruned, sizes)
    return [p.reshape(s) for p, s in zip(out, shapes)]


def _top(scores: Array, excluded: Array, count: int, axis: int = -1) -> Array:
    """Marks the ``count`` highest scores along ``axis`` (excluded entries never count)."""
    n = scores.shape[axis]
    count = min(count, n)
    if count <= 0:
        return jnp.zeros(scores.shape, bool)
    key = jnp.moveaxis(jnp.where(excluded, jnp.inf, -scores.astype(jnp.float32)), axis, -1)
    first = jax.vmap(_first_in_order, (0, None))(key.reshape(-1, n), jnp.int32(count))
    return jnp.moveaxis(first.reshape(key.shape), -1, axis) & ~excluded


def _first_in_order(key: Array, count: Array) -> Array:
    """Marks the first ``count`` entries of the 1-D ``key`` in stable ascending order, the
    entries ``jnp.argsort(key, stable=True)[:count]``, without sorting.

    A bitwise search finds the ``count``-th smallest key (32 passes that each count the keys
    below a bound); the keys below it are taken, and of the keys equal to it the first ones in
    index order. ``-0.0`` ties with ``0.0``, as in the sort. On a 2-core CPU, TEW's masks for
    MiniLM-L6's 10.6M weights took 0.3 s this way and 3.7 s with the sort.
    """
    key = jnp.where(key == 0, 0.0, key.astype(jnp.float32))
    bits = jax.lax.bitcast_convert_type(key, jnp.uint32)
    # Flip the sign bit of non-negative keys and every bit of negative ones: unsigned order.
    u = bits ^ jnp.where(bits >> 31 == 1, jnp.uint32(0xFFFFFFFF), jnp.uint32(0x80000000))
    count = jnp.asarray(count, jnp.int32)

    def step(i, bound):  # the largest bound with fewer than count keys below it
        wider = bound | jax.lax.shift_left(jnp.uint32(1), jnp.asarray(31 - i, jnp.uint32))
        return jnp.where(jnp.sum(u < wider, dtype=jnp.int32) < count, wider, bound)

    kth = jax.lax.fori_loop(0, 32, step, jnp.uint32(0))
    below, ties = u < kth, u == kth
    return below | (ties & (jnp.cumsum(ties, dtype=jnp.int32) <= count - jnp.sum(below, dtype=jnp.int32)))


def _normalise(scores: Array, kept: Array) -> Array:
    """Divides a layer's scores by their mean over its kept weights (1 if that mean is 0).

    Scores that are not finite (NaN or +-inf: a diverged weight or gradient) count as 0, so
    such weights are pruned first and the rest of their layer ranks as before.
    """
    scores = jnp.asarray(scores, jnp.float32)
    scores = jnp.where(jnp.isfinite(scores), scores, 0.0)
    mean = jnp.sum(jnp.where(kept, scores, 0.0)) / jnp.maximum(jnp.sum(kept), 1)
    return scores / jnp.where(mean > 0, mean, 1.0)


# ----------------------------------------------------------------------------- patterns

@dataclasses.dataclass(frozen=True)
class Pattern:
    """Base of all patterns: validates inputs and calls the pattern's ``_masks``.

    Call a pattern with a list of per-layer score matrices ``(K_i, N_i)`` and a total sparsity:

    >>> import jax
    >>> scores = [jnp.abs(jax.random.normal(jax.random.key(0), (64, 96)))]
    >>> [m] = TW2D()(scores, 0.75, tile_size=32)
    >>> float(1 - dense_mask(m, 32).mean())
    0.75

    Args (of ``__call__``):
      scores: non-negative importance per weight, one ``(K, N)`` array per layer.
      sparsity: total fraction of weights to prune, in [0, 1); may be traced.
      tile_size: G, the tile width of the layers (sets the mask representation); by default
        the one the ``previous`` masks carry, else 128. Given, it must equal theirs.
      previous: the layers' current masks; the new masks are subsets of them.
      final_sparsity: the sparsity the schedule ends at (sets TW-2D's column/row split;
        defaults to ``sparsity``).
      per_layer: rank each layer alone (each layer at ``sparsity``) instead of globally.
      min_keep: per-layer floor on the kept fraction (see the module docstring).
    Returns:
      One layer mask per layer, carrying its tile size; with an ``elements`` entry only for
      patterns that have one (``has_elements``).
    """

    name: ClassVar[str] = ""
    has_elements: ClassVar[bool] = True  # whether the masks have an element mask
    ranks_weights: ClassVar[bool] = False  # whether it ranks single weights (int32 indices)

    def __call__(self, scores: Sequence[Array], sparsity: Any, *, tile_size: int | None = None,
                 previous: Sequence[LayerMask] | None = None, final_sparsity: Any = None,
                 per_layer: bool = False, min_keep: float = 0.05) -> list[LayerMask]:
        if tile_size is not None:
            tile_size = check_tile_size(tile_size)
        check_sparsity(sparsity)
        if final_sparsity is None:
            final_sparsity = sparsity
        check_sparsity(final_sparsity, "final_sparsity")
        # Compared as float32, the precision every schedule and mask update computes in: a
        # Python 0.8 is below float32(0.8).
        if (_is_concrete(sparsity) and _is_concrete(final_sparsity)
                and np.float32(final_sparsity) < np.float32(sparsity)):
            raise ValueError(
                f"final_sparsity must be >= sparsity, got final_sparsity={float(final_sparsity)!r} "
                f"< sparsity={float(sparsity)!r}")
        min_keep = check_fraction(min_keep, "min_keep")
        scores = list(scores)
        if not scores:
            raise ValueError("scores must hold at least one (K, N) score matrix, got an empty list")
        for i, s in enumerate(scores):
            if jnp.ndim(s) != 2:
                raise ValueError(f"scores[{i}] must be a (K, N) matrix, got shape {jnp.shape(s)}")
        if previous is None:
            previous = [keep_all(*jnp.shape(s), tile_size or 128) for s in scores]
        previous = list(previous)
        if len(previous) != len(scores):
            raise ValueError(f"previous has {len(previous)} masks for {len(scores)} score matrices")
        sizes = {check_layer_mask(m, *jnp.shape(s), tile_size, where=f"previous[{i}]")
                 for i, (s, m) in enumerate(zip(scores, previous))}
        if len(sizes) > 1:
            raise ValueError(f"the previous masks were made for different tile sizes {sorted(sizes)}; "
                             "one call ranks layers of one tile size")
        [tile_size] = sizes
        ctx = _Context(tile_size, per_layer, float(min_keep))
        self._check(scores, final_sparsity, ctx)
        return _compute_masks(self, ctx, scores, previous, sparsity, final_sparsity)

    def check_target(self, sparsity: Any) -> None:
        """Raises ValueError unless this pattern can prune to ``sparsity`` (a final one): in
        [0, 1), and below 1 with what the pattern gives back (TEW's residue). Traced values
        are not checked."""
        check_sparsity(sparsity)

    def _check(self, scores, final_sparsity, ctx) -> None:
        """Checks of the inputs a pattern needs beyond the common ones (before tracing)."""
        if self.ranks_weights:
            _check_element_count(self, scores, ctx)

    def _masks(self, scores, previous, kept, sparsity, final_sparsity, ctx) -> list[LayerMask]:
        raise NotImplementedError


@functools.partial(jax.jit, static_argnums=(0, 1))
def _compute_masks(pattern, ctx, scores, previous, sparsity, final_sparsity) -> list[LayerMask]:
    """The masks as one compiled computation per pattern, tile size and shapes (the sparsities are
    traced, so a schedule does not recompile). Run op by op, its hundreds of small ops each
    compiled on their first call for every new layer shape: 4.5-12.5 s per shape on a 2-core
    CPU (BUILD_NOTES.md, "Pruning speed")."""
    kept = [dense_mask(m, ctx.tile_size) for m in previous]
    normed = [_normalise(s, k) for s, k in zip(scores, kept)]
    sparsity = jnp.asarray(sparsity, jnp.float32)
    final_sparsity = jnp.maximum(jnp.asarray(final_sparsity, jnp.float32), sparsity)
    return pattern._masks(normed, previous, kept, sparsity, final_sparsity, ctx)


@dataclasses.dataclass(frozen=True)
class _Context:
    tile_size: int
    per_layer: bool
    min_keep: float


def _tile_wise(scores, previous, sparsity, final_sparsity, column_share, ctx) -> list[LayerMask]:
    """TW-2D (and TW-1D with ``column_share=0``): column stage, then row stage."""
    g = ctx.tile_size
    sizes = [s.size for s in scores]
    total = sum(sizes)
    col_final = 1.0 - (1.0 - final_sparsity) ** column_share
    col_sparsity = jnp.minimum(sparsity, col_final)
    col_floor = ctx.min_keep ** column_share
    row_floor = ctx.min_keep ** (1.0 - column_share)

    # Column stage: vectors are whole columns (length K).
    groups = []
    for s, m in zip(scores, previous):
        k, n = s.shape
        col_score = s.mean(axis=0)
        forced = ~m["columns"]
        protected = _top(col_score, forced, math.ceil(col_floor * n))
        groups.append((col_score, jnp.full((n,), k, jnp.int32), forced, protected))
    col_pruned = _select(groups, [_target(col_sparsity, z) for z in sizes],
                         _target(col_sparsity, total), ctx.per_layer)
    if not ctx.per_layer:
        # Once rows are pruned (in a kept column of any layer) and the pruned columns are within
        # half a column of their count, the columns stay as they are: a column pruned then would
        # move the kept columns after it into other tiles, under rows pruned for the tiles they
        # were in. (New scores could pick columns of another K that come nearer the count.)
        # Columns still follow a count that grew (final_sparsity raised, or each call's own
        # sparsity as its final one: tiles then re-form). Ranked per layer, the columns of a
        # layer are of one length, and the ones pruned already stay the nearest count.
        rows_started = functools.reduce(jnp.logical_or, [
            jnp.any(~expand(m["columns"], m["rows"], g) & m["columns"][None, :]) for m in previous])
        before = sum(jnp.float32(s.shape[0]) * jnp.sum(~m["columns"], dtype=jnp.float32)
                     for s, m in zip(scores, previous))  # weights in pruned columns
        settled = _target(col_sparsity, total).approx - before <= max(s.shape[0] for s in scores) / 2
        col_pruned = [jnp.where(rows_started & settled, ~m["columns"], p)
                      for m, p in zip(previous, col_pruned)]
    columns = [~p for p in col_pruned]

    # Row stage: vectors are (tile, K row) segments, of length = the tile's kept columns.
    groups, pruned_by_columns = [], []
    for s, m, c in zip(scores, previous, columns):
        k, n = s.shape
        t = num_tiles(n, g)
        tile = _tile_of_columns(c, g)  # (N,), T for pruned columns (dropped below)
        width = jax.ops.segment_sum(jnp.ones((n,), jnp.int32), tile, num_segments=t)  # (T,)
        seg_score = jax.ops.segment_sum(s.T, tile, num_segments=t) / jnp.maximum(width, 1)[:, None]
        was_pruned = ~expand(m["columns"], m["rows"], g)  # (K, N)
        forced = jax.ops.segment_sum(was_pruned.T.astype(jnp.int32), tile, num_segments=t) > 0
        empty = jnp.broadcast_to((width == 0)[:, None], (t, k))
        protected = _top(seg_score, forced | empty, math.ceil(row_floor * k), axis=1) | empty
        lengths = jnp.broadcast_to(width[:, None], (t, k))
        groups.append((seg_score, lengths, forced & ~empty, protected))
        pruned_by_columns.append(_count(n - jnp.sum(c)) * k)
    # Rows are pruned only once the columns reached their final share, so tiles never change
    # under pruned rows; until then the count is right up to whole columns.
    rows_on = sparsity >= col_final
    row_targets = [_where(rows_on, _target(sparsity, z) - p, 0)
                   for z, p in zip(sizes, pruned_by_columns)]
    row_total = _where(rows_on, _target(sparsity, total) - sum(pruned_by_columns), 0)
    row_pruned = _select(groups, row_targets, row_total, ctx.per_layer)
    out = []
    for s, c, p, (_, lengths, _, _) in zip(scores, columns, row_pruned, groups):
        out.append({"columns": c, "rows": ~p & (lengths > 0), TILE_KEY: jnp.asarray(tile_marker(g))})
    return out


def _element_masks(elements: Sequence[Array], tile_size: int) -> list[LayerMask]:
    """Layer masks holding only an element mask (empty tile mask)."""
    out = []
    for e in elements:
        k, n = e.shape
        out.append({"columns": jnp.zeros((n,), bool),
                    "rows": jnp.zeros((num_tiles(n, tile_size), k), bool),
                    TILE_KEY: jnp.asarray(tile_marker(tile_size)), "elements": e})
    return out


@dataclasses.dataclass(frozen=True)
class TW2D(Pattern):
    """Tile-wise 2-D: global column pruning, tiles of G kept columns, in-tile row pruning.

    ``column_share`` in [0, 1] is the share of the (log-)density removed by column pruning:
    ``1 - s_columns = (1 - s) ** column_share``; 0.5 splits it evenly between the two stages.
    """

    column_share: float = 0.5
    name: ClassVar[str] = "tw2d"
    has_elements: ClassVar[bool] = False

    def __post_init__(self):  # stored as a float: the pattern is a static (hashed) jit argument
        object.__setattr__(self, "column_share", check_fraction(self.column_share, "column_share", closed=True))

    def _masks(self, scores, previous, kept, sparsity, final_sparsity, ctx):
        return _tile_wise(scores, previous, sparsity, final_sparsity, self.column_share, ctx)


@dataclasses.dataclass(frozen=True)
class TW1D(Pattern):
    """Tile-wise 1-D: fixed G-wide tiles in original column order, in-tile row pruning only."""

    name: ClassVar[str] = "tw1d"
    has_elements: ClassVar[bool] = False

    def _masks(self, scores, previous, kept, sparsity, final_sparsity, ctx):
        return _tile_wise(scores, previous, sparsity, final_sparsity, 0.0, ctx)


@dataclasses.dataclass(frozen=True)
class TEW(Pattern):
    """Tile + element-wise: TW-2D at ``s + residue``, then the ``residue`` fraction (of all
    weights) of the most important weights TW removed given back in ``elements``."""

    residue: float = 0.05
    column_share: float = 0.5
    name: ClassVar[str] = "tew"
    ranks_weights: ClassVar[bool] = True  # the residue ranks single weights

    def __post_init__(self):  # stored as floats: the pattern is a static (hashed) jit argument
        object.__setattr__(self, "residue", check_fraction(self.residue, "residue"))
        object.__setattr__(self, "column_share", check_fraction(self.column_share, "column_share", closed=True))

    def check_target(self, sparsity: Any) -> None:
        super().check_target(sparsity)
        # In float32, as the masks compute it: 0.9 + 0.1 passes (0.9 is below 0.9 in float32).
        if _is_concrete(sparsity) and float(np.float32(sparsity)) + self.residue >= 1.0:
            raise ValueError(f"sparsity {float(sparsity)!r} + residue {self.residue!r} must be below 1 "
                             "(TEW needs sparsity + residue < 1)")

    def _check(self, scores, final_sparsity, ctx):
        super()._check(scores, final_sparsity, ctx)
        self.check_target(final_sparsity)

    def _masks(self, scores, previous, kept, sparsity, final_sparsity, ctx):
        tiles = _tile_wise(scores, previous, jnp.minimum(sparsity + self.residue, 0.999),
                           jnp.minimum(final_sparsity + self.residue, 0.999), self.column_share, ctx)
        sizes = [s.size for s in scores]
        groups = []
        for s, m, k in zip(scores, tiles, kept):
            candidate = ~expand(m["columns"], m["rows"], ctx.tile_size) & k
            # Give back the best candidates = prune all but them; non-candidates count as pruned.
            groups.append((s, None, ~candidate, jnp.zeros(s.shape, bool)))
        give_back = [_target(self.residue, z) for z in sizes]
        not_given = _select(groups, [z - r for z, r in zip(sizes, give_back)],
                            sum(sizes) - _target(self.residue, sum(sizes)), ctx.per_layer)
        for m, p in zip(tiles, not_given):
            m["elements"] = ~p
        return tiles


def _check_element_count(pattern: Pattern, scores, ctx) -> None:
    """Patterns that rank single weights index them in int32: at most 2**31 - 1 per ranking."""
    sizes = [s.size for s in scores]
    biggest = max(sizes) if ctx.per_layer else sum(sizes)
    if biggest >= 2 ** 31:
        raise ValueError(f"{type(pattern).__name__} ranks every weight: {biggest} weights in one "
                         "ranking is more than it can index (2**31 - 1)"
                         + ("" if ctx.per_layer else "; try per_layer=True"))


@dataclasses.dataclass(frozen=True)
class EW(Pattern):
    """Element-wise (unstructured) pruning with one global threshold."""

    name: ClassVar[str] = "ew"
    ranks_weights: ClassVar[bool] = True

    def _masks(self, scores, previous, kept, sparsity, final_sparsity, ctx):
        groups = []
        for s, k in zip(scores, kept):
            protected = _top(s.reshape(-1), ~k.reshape(-1), math.ceil(ctx.min_keep * s.size))
            groups.append((s, None, ~k, protected.reshape(s.shape)))
        sizes = [s.size for s in scores]
        pruned = _select(groups, [_target(sparsity, z) for z in sizes],
                         _target(sparsity, sum(sizes)), ctx.per_layer)
        return _element_masks([~p for p in pruned], ctx.tile_size)


@dataclasses.dataclass(frozen=True)
class VW(Pattern):
    """Vector-wise: along K, each output column's blocks of ``vector_size`` keep their top n.

    n is the same for every block up to one: ``round((1 - s) * total)`` weights are kept, every
    block keeping ``floor`` or ``floor + 1`` of them; the blocks whose next-best weight scores
    highest keep the extra one. A last block shorter than ``vector_size`` (K not a multiple)
    keeps at most its length.
    """

    vector_size: int = 16
    name: ClassVar[str] = "vw"
    ranks_weights: ClassVar[bool] = True

    def __post_init__(self):
        check_positive_int(self.vector_size, "vector_size")

    def _masks(self, scores, previous, kept, sparsity, final_sparsity, ctx):
        v = self.vector_size
        keys, layouts = [], []
        for s, k in zip(scores, kept):
            rows, n = s.shape
            pad = -rows % v
            eligible = jnp.pad(k, ((0, pad), (0, 0))).reshape(-1, v, n)
            sc = jnp.pad(s, ((0, pad), (0, 0))).reshape(-1, v, n)
            sc = jnp.where(eligible, sc, -jnp.inf)
            # Rank of each element inside its block (0 = best); ineligible ones rank last.
            rank = jnp.argsort(jnp.argsort(-sc, axis=1, stable=True), axis=1, stable=True)
            rank = jnp.where(eligible, rank, v)
            keys.append((rank, sc, eligible))
            layouts.append((rows, n))
        sizes = [s.size for s in scores]

        def keep(group, n_keep):
            n_keep = _small(n_keep)
            rank, sc, eligible = (a.reshape(-1) for a in group)
            order = jnp.lexsort((-sc, rank))  # by rank in block, then by score, best first
            n_keep = jnp.minimum(n_keep, jnp.sum(eligible))
            return jnp.zeros(rank.shape, bool).at[order].set(jnp.arange(rank.size) < n_keep)

        if ctx.per_layer:
            kept_flat = [keep(g, z - _target(sparsity, z)) for g, z in zip(keys, sizes)]
        else:
            cat = tuple(jnp.concatenate([a.reshape(-1) for a in parts]) for parts in zip(*keys))
            total = sum(sizes)
            flat = keep(cat, total - _target(sparsity, total))
            kept_flat = jnp.split(flat, np.cumsum([g[0].size for g in keys])[:-1])
        elements = []
        for f, (rows, n) in zip(kept_flat, layouts):
            elements.append(f.reshape(-1, n)[:rows])
        return _element_masks(elements, ctx.tile_size)


@dataclasses.dataclass(frozen=True)
class BW(Pattern):
    """Block-wise: square ``block_size`` x ``block_size`` blocks, ranked globally."""

    block_size: int = 32
    name: ClassVar[str] = "bw"

    def __post_init__(self):
        check_positive_int(self.block_size, "block_size")

    def _masks(self, scores, previous, kept, sparsity, final_sparsity, ctx):
        b = self.block_size
        groups, layouts = [], []
        for s, k in zip(scores, kept):
            rows, n = s.shape
            pr, pc = -rows % b, -n % b
            real = jnp.pad(jnp.ones(s.shape, jnp.int32), ((0, pr), (0, pc)))
            blocks = lambda a: a.reshape((rows + pr) // b, b, (n + pc) // b, b).sum(axis=(1, 3))
            length = blocks(real)
            score = blocks(jnp.pad(s, ((0, pr), (0, pc)))) / length
            forced = blocks(jnp.pad((~k).astype(jnp.int32), ((0, pr), (0, pc)))) > 0
            protected = _top(score.reshape(-1), forced.reshape(-1),
                             math.ceil(ctx.min_keep * score.size)).reshape(score.shape)
            groups.append((score, length, forced, protected))
            layouts.append((rows, n))
        sizes = [s.size for s in scores]
        pruned = _select(groups, [_target(sparsity, z) for z in sizes],
                         _target(sparsity, sum(sizes)), ctx.per_layer)
        elements = []
        for p, (rows, n) in zip(pruned, layouts):
            full = jnp.repeat(jnp.repeat(~p, b, axis=0), b, axis=1)
            elements.append(full[:rows, :n])
        return _element_masks(elements, ctx.tile_size)


_BY_NAME = {cls.name: cls for cls in (TW2D, TW1D, TEW, EW, VW, BW)}


def get(name: str, **options: Any) -> Pattern:
    """The pattern called ``name`` (tw2d, tw1d, tew, ew, vw, bw), built with ``options``.

    >>> get('bw', block_size=16)
    BW(block_size=16)
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _BY_NAME:
        raise ValueError(f"unknown pattern {name!r}; expected one of {sorted(_BY_NAME)}")
    return _BY_NAME[key](**options)
