"""Packed tiles: the execution format of one tile-wise sparse layer.

For a kernel ``W`` (K, N), tile size G and a layer mask (see :mod:`jax_tw.patterns`), the packed
tiles hold only the kept work. This module is the one Python definition of the format;
``cpu/packed_tiles.h`` is the one C++ definition, and the two are tested against each other.

Fields (``C`` kept columns, ``T = ceil(C / G)`` tiles, ``R`` kept rows over all tiles, ``E``
residue weights)::

    columns         int32 (C,)       kept output columns, ascending; tile t owns columns[t*G:(t+1)*G]
    row_offsets     int32 (T + 1,)   tile t's kept K indices are rows[row_offsets[t]:row_offsets[t+1]]
    rows            int32 (R,)       kept K indices, ascending within each tile
    values          dtype (R, G)     values[r] = W[rows[r], tile's columns]; zero past the tile's width
    residue_rows    int32 (E,)       element-wise residue (TEW, or a baseline's whole mask):
    residue_cols    int32 (E,)         W[residue_rows[e], residue_cols[e]] += residue_values[e],
    residue_values  dtype (E,)         sorted by (col, row) (each column's residue one run, as
                                       the host kernel reads it); pack puts it outside the
                                       tiles (where it is not, it adds to the tile's weight)
    tile_order      int32 (T,)       the schedule, made by pack from columns and row_offsets alone
    pruned          int32 (N - C,)     (see schedule()): tiles deepest first; the pruned output
    pruned_offsets  int32 (T + 1,)     columns, ascending; tile t's span of them (those between
                                       tile t-1's last kept column and tile t's), the last tile's
                                       span running to N. The GPU kernels read it instead of
                                       sorting tiles or finding pruned columns on every call
    dense           dtype (K, N)     or None: the masked dense kernel, kept when the layer is so
                                     dense that the host kernel would run slower (see
                                     FALLBACK_RULES). A cache of unpack(): replace values or
                                     residue_values only together with dense=None (or pack
                                     again), or it goes stale
    k, n, tile_size, max_depth       static ints (max_depth = the deepest tile's kept rows)
    dense_on                         static: the platforms whose automatic backend runs the
                                     dense dot for this layer (FALLBACK_RULES), or None

Why ``values`` is (R, G) row-major: a tile's weights are then one contiguous ``K_t x G`` block,
the B operand of that tile's small dense GEMM, read one K row (G contiguous values) at a time by
every kernel; padding the last tile to G keeps every tile the same width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from jax_tw import _ffi, patterns

__all__ = ["PackedTiles", "pack", "unpack", "validate", "check_shapes", "sort_residue", "schedule",
           "with_schedule",
           "pack_variables", "save", "load", "to_arrays", "from_arrays", "PACKED_COLLECTION"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedTiles:
    """Packed tiles of one layer (a JAX pytree; the ints are static). Build with :func:`pack`."""

    columns: Any
    row_offsets: Any
    rows: Any
    values: Any
    residue_rows: Any
    residue_cols: Any
    residue_values: Any
    tile_order: Any
    pruned: Any
    pruned_offsets: Any
    dense: Any  # None, or the masked dense (K, N) kernel when the tiles would run slower
    k: int = dataclasses.field(metadata=dict(static=True))
    n: int = dataclasses.field(metadata=dict(static=True))
    tile_size: int = dataclasses.field(metadata=dict(static=True))
    max_depth: int = dataclasses.field(metadata=dict(static=True))
    # The platforms ('cpu', 'cuda') whose automatic backend runs the dense dot for this layer,
    # decided by pack from each platform's FallbackRule; None (tiles made before the rules were
    # per platform): the dense dot wherever ``dense`` is kept. See :func:`dense_platforms`.
    dense_on: tuple | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def num_tiles(self) -> int:
        return int(np.shape(self.row_offsets)[0]) - 1

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(jnp.result_type(self.values))

    def cost(self, residue_cost: float | None = None, tile_cost: float = 1.0) -> float:
        """Estimated work relative to the dense kernel: ``tile_cost`` times the tile density
        plus ``residue_cost`` (default: the host kernel's, ``RESIDUE_COST``) times the residue
        density (see ``DENSE_ABOVE`` and :class:`FallbackRule`)."""
        residue_cost = RESIDUE_COST if residue_cost is None else residue_cost
        residue = int(np.shape(self.residue_rows)[0]) / (self.k * self.n)
        return tile_cost * (self.density() - residue) + residue_cost * residue

    def density(self) -> float:
        """Fraction of the K x N weights held (tiles, without their padding, plus residue)."""
        offsets = np.asarray(self.row_offsets)
        widths = np.minimum(self.tile_size, len(np.asarray(self.columns)) - self.tile_size * np.arange(self.num_tiles))
        kept = int((np.diff(offsets) * widths).sum()) + int(np.shape(self.residue_rows)[0])
        return kept / (self.k * self.n)


def _serialize_statics(statics: tuple) -> bytes:
    import json
    return json.dumps(list(statics)).encode()


def _deserialize_statics(data: bytes) -> tuple:
    import json
    return tuple(tuple(s) if isinstance(s, list) else s for s in json.loads(data.decode()))


# jax.export can serialize functions whose arguments or results hold PackedTiles.
jax.export.register_pytree_node_serialization(
    PackedTiles, serialized_name="jax_tw.packing.PackedTiles",
    serialize_auxdata=_serialize_statics, deserialize_auxdata=_deserialize_statics)


# Density (in tile weights: see cost) above which the packed tiles also keep the dense kernel
# and tw_matmul's automatic backend uses the dense dot. Measured with `python -m jax_tw.bench
# --repeats 9 --backend cpu` (M = 2048, BERT-base shapes, f32): at 0% sparsity the host kernel
# ran at 0.91-1.18x of the dense dot (2-core AVX-512 + AMX), 0.92-1.07x (AMD Zen 4) and
# 0.84-1.05x (AMD Zen 5); at 25%, 1.09-1.26x, and on Zen 5 1.19-1.26x (0.94x once, from fresh
# output pages). On Zen 5 (2026-12-06) 10% ran at 1.02-1.04x, 15% at 1.05-1.08x and 20% at
# 1.14-1.19x on every shape, and two TEW layers of the BERT example (1536 x 384, 9% residue)
# at 1.10x and 1.09x (BUILD_NOTES.md, "Fresh output pages"; cost 0.82 and 0.85 as counted
# with RESIDUE_COST below, so the first now runs the tiles). With the kernel's time about
# proportional to the cost, 0.85 is where the tiles break even on the machine whose 0% ratio is
# the lowest (0.84 / 0.85 ~ 0.99x) and gain elsewhere; denser layers take the dense dot (no
# gathers, no per-call packing of x).
DENSE_ABOVE = 0.85

# What one residue weight costs, in kept tile weights (the unit of DENSE_ABOVE), in the fallback
# rule: packing keeps the dense kernel when ``tile density + RESIDUE_COST * residue density >
# DENSE_ABOVE``. The host kernel runs the residue per output column, vectorised over up to 15
# vectors of rows of x copied feature-major, but each weight is still a gathered row and one
# multiply-add per row, against a GEMM's register-blocked ones. Measured with `python -m
# jax_tw.bench --pattern ew --sparsities S --backend cpu --repeats 7` (M = 2048, f32, BERT-base
# shapes; BUILD_NOTES.md has the tables): an EW layer's time over the dense dot's, per unit of
# residue density, was 2.2-3.4 (median 2.9) on a 2-core AVX2 machine (2026-12-03) and 2.4-4.4
# (median 3.4; the deep 3072 x 768 layer the dearest) on a 2-core AVX-512 machine (2026-12-03,
# 70-90%). A tile weight costs about 1 / 0.85 dense weights, so one residue weight costs about
# 3.4 * 0.85 = 2.9 tile weights on the machine where it is dearer. On AMD Zen 5 (2026-12-06,
# `--repeats 7`): EW at 70-75% 3.1-3.3 dense weights per residue weight, a tile weight about
# 1 / 0.9 dense weights there, so again 2.9; but BW, whose residue comes in blocks, 3.8-4.1
# (BW at 72%: 0.88-0.95x of the dense dot), 3.4-3.7 tile weights. 3.3 keeps layers that are
# all residue on the dense dot below about 74% sparsity (DENSE_ABOVE / 3.3 = 0.26 density), as
# the rule with DENSE_ABOVE = 0.75 and 2.9 did: EW/VW/BW layers from 75% sparsity run the
# kernel (AVX-512 at 75%: 1.30 / 1.64 / 0.98x; AVX2: 1.31-1.56x; Zen 5: EW 1.21-1.26x, BW
# 1.00-1.07x, VW 0.92-1.27x), and TEW layers at 75% whatever their residue. The rule does not
# depend on M: at M = 1 (one token at a time) layers that are mostly residue run slower than
# the dense dot (EW at 70-80%, AVX2: 0.62-0.92x; per residue weight the product reads 12
# bytes, at memory speed), TEW at 75% + 5% at 1.03-1.59x; at M = 16-32, EW mostly above 1
# (BUILD_NOTES.md, "Few rows with a residue").
# Those layers' weights were in the caches; read from memory, as in a model (`python -m
# jax_tw.bench -m 1 --cold`), f32 TEW at 75% + 5% and + 12.5% ran 1.41-2.27x faster than the
# dense dot on the AVX-512 machine (BUILD_NOTES.md, "Weights from memory").
RESIDUE_COST = 3.3

# What a bf16 tile weight costs, relative to an f32 one (against the dense dot in the same
# dtype), where the host kernel runs bf16 in pairs of K indices and XLA's bf16 dot does not, per
# kernel variant (``_ffi.cpu_isa()``); other variants count 1. `python -m jax_tw.bench --backend
# cpu --dtype both` (M = 2048, BERT-base shapes) measured the bf16 kernel at 0% sparsity at
# 3.7-4.2x of the dense bf16 dot on AMX tiles (2-core AVX-512 + AMX machine, 2026-12-03,
# --repeats 9) and at 1.91-2.11x by VDPBF16PS (2-core AMD EPYC with AVX512-BF16, 2026-12-04,
# --repeats 11, --dtype bfloat16), where f32 ran at 0.92-1.07x. bf16 TW layers then run the
# tiles at any sparsity there; the residue is summed in f32 either way and keeps RESIDUE_COST.
BF16_TILE_COSTS = {"avx512-amx": 0.25, "avx512-bf16": 0.5}


@dataclasses.dataclass(frozen=True)
class FallbackRule:
    """When a platform's automatic backend runs the dense dot instead of the tiles: when the
    layer's estimated cost, ``tile density + residue_cost * residue density``, exceeds
    ``dense_above``. ``source`` says where the numbers come from."""

    dense_above: float
    residue_cost: float
    source: str
    # A bf16 tile weight's cost relative to f32's per host kernel variant, (variant, cost) pairs
    # (the "cpu" rule only: BF16_TILE_COSTS); variants not named cost 1.
    bf16_tile_costs: tuple[tuple[str, float], ...] = ()

    def dense_is_faster(self, packed: "PackedTiles") -> bool:
        bf16 = packed.dtype == jnp.bfloat16
        tile_cost = dict(self.bf16_tile_costs).get(_ffi.cpu_isa(), 1.0) if bf16 else 1.0
        return packed.cost(self.residue_cost, tile_cost) > self.dense_above


# One rule per platform. Neither depends on M: on the CPU, few rows (M <= 32) run a
# path that reads the packed values directly, measured at 0.8-2.6x of dense for M = 1 at 50-75%
# sparsity; bf16 on the other variants measured about as fast as f32 (BUILD_NOTES.md). Where the
# host kernel runs bf16 in pairs (AMX or VDPBF16PS), the "cpu" rule counts bf16 tiles at
# BF16_TILE_COSTS. Pack decides on the machine it runs on: tiles packed there and run on a
# machine without those variants keep low-sparsity bf16 layers on the tiles, at about the dense
# dot's speed. On a GPU nothing is measured yet.
FALLBACK_RULES = {
    "cpu": FallbackRule(DENSE_ABOVE, RESIDUE_COST, "measured on the host kernel (see DENSE_ABOVE, "
                        "RESIDUE_COST and BF16_TILE_COSTS)", tuple(BF16_TILE_COSTS.items())),
    # A guess, until a GPU run measures it. The sm80 tile kernel on an H200 was estimated (from
    # a read of its code, not a run) at about 1.0-1.8x of dense at 75% sparsity: tiles would
    # break even at a density of about 0.25-0.45. The residue is added by XLA after the call, a
    # gather of x's columns and a scatter-add into y, memory-bound: about M * 12 bytes per
    # residue weight at 4.8 TB/s, against 2 * M flops per dense weight at about 790 TFLOP/s,
    # some 1000 dense weights each.
    "cuda": FallbackRule(0.4, 1000.0, "a guess: no GPU measurement exists yet"),
}


def dense_platforms(packed: "PackedTiles") -> tuple:
    """The platforms whose fallback rule prefers the dense dot for ``packed``."""
    return tuple(p for p, rule in FALLBACK_RULES.items() if rule.dense_is_faster(packed))


def pack(kernel: Any, mask: patterns.LayerMask, tile_size: int | None = None,
         keep_dense: bool | None = None) -> PackedTiles:
    """Packs a layer's kernel (K, N) under its layer mask, on the host (not under jit).

    The tiles come back as arrays on the default device, like a model's params: a jitted call
    then reads them where they are, where host (NumPy) arrays would be copied to the device on
    every call (on the CPU, a copy of all the layer's packed weights per call).

    ``tile_size`` defaults to the one the mask carries; given, it must equal it (a mask
    built by hand without the ``tile_size`` entry needs it).

    ``keep_dense``: the dense fallback of :func:`jax_tw.ops.tw_matmul`. ``None`` asks each
    platform's :class:`FallbackRule` (``FALLBACK_RULES``) and records the platforms that
    prefer the dense dot in ``dense_on``; the masked dense kernel is kept (``dense``) when the
    CPU's rule prefers it (the host path would otherwise rebuild it on every call; a GPU
    rebuilds it in the graph, a scatter that is small next to the GEMM). ``True`` keeps it and
    runs the dense dot everywhere, ``False`` runs the tiles everywhere.

    >>> import numpy as np
    >>> w = np.arange(12, dtype=np.float32).reshape(3, 4)
    >>> mask = {'columns': np.array([True, False, True, True]),
    ...         'rows': np.array([[True, False, True], [False, True, False]])}
    >>> p = pack(w, mask, tile_size=2)
    >>> p.columns, p.row_offsets, p.rows
    (Array([0, 2, 3], dtype=int32), Array([0, 2, 3], dtype=int32), Array([0, 2, 1], dtype=int32))
    >>> p.values
    Array([[ 0.,  2.],
           [ 8., 10.],
           [ 7.,  0.]], dtype=float32)
    >>> bool((unpack(p) == np.where(patterns.dense_mask(mask, 2), w, 0)).all())
    True
    """
    if isinstance(kernel, jax.core.Tracer):
        raise ValueError("pack runs on the host: call it outside jax.jit with concrete arrays")
    w = np.asarray(kernel)
    if w.ndim != 2:
        raise ValueError(f"kernel must be (K, N), got shape {w.shape}")
    if w.dtype not in (np.float32, np.dtype(jnp.bfloat16)):
        raise ValueError(f"kernel dtype must be float32 or bfloat16, got {w.dtype}")
    if keep_dense is not None and not isinstance(keep_dense, (bool, np.bool_)):
        raise ValueError(f"keep_dense must be None, True or False, got {keep_dense!r}")
    k, n = w.shape
    tile_size = patterns.check_layer_mask(mask, k, n, tile_size, where="pack")
    keep_cols = np.asarray(mask["columns"], bool)
    keep_rows = np.asarray(mask["rows"], bool)
    columns = np.flatnonzero(keep_cols).astype(np.int32)
    t = -(-len(columns) // tile_size)
    tile_rows = [np.flatnonzero(keep_rows[i]).astype(np.int32) for i in range(t)]
    offsets = np.zeros(t + 1, np.int32)
    offsets[1:] = np.cumsum([len(r) for r in tile_rows])
    rows = np.concatenate(tile_rows) if t else np.zeros(0, np.int32)
    values = np.zeros((len(rows), tile_size), w.dtype)
    for i, r in enumerate(tile_rows):
        cols = columns[i * tile_size:(i + 1) * tile_size]
        values[offsets[i]:offsets[i + 1], :len(cols)] = w[np.ix_(r, cols)]
    tiles = np.asarray(patterns.expand(keep_cols, keep_rows, tile_size))
    elements = np.asarray(mask["elements"], bool) if "elements" in mask else np.zeros_like(tiles)
    res_c, res_r = np.nonzero((elements & ~tiles).T)  # sorted by (col, row)
    packed = PackedTiles(
        columns=columns, row_offsets=offsets, rows=rows, values=values,
        residue_rows=res_r.astype(np.int32), residue_cols=res_c.astype(np.int32),
        residue_values=w[res_r, res_c], **_schedule_fields(columns, offsets, n, tile_size),
        dense=None, k=k, n=n, tile_size=tile_size,
        max_depth=int(max((len(r) for r in tile_rows), default=0)))
    validate(packed)
    dense_on = dense_platforms(packed) if keep_dense is None else tuple(FALLBACK_RULES) if keep_dense else ()
    packed = dataclasses.replace(packed, dense_on=dense_on)
    if keep_dense or keep_dense is None and "cpu" in dense_on:
        packed = dataclasses.replace(packed, dense=_unpack_valid(packed))
    return jax.device_put(packed)


def unpack(packed: PackedTiles) -> np.ndarray:
    """The masked dense kernel (K, N) that ``packed`` holds (exact: values are copied)."""
    validate(packed)
    return _unpack_valid(packed)


def _unpack_valid(packed: PackedTiles) -> np.ndarray:
    """:func:`unpack` of tiles already validated."""
    p = jax.tree.map(np.asarray, packed)
    w = np.zeros((p.k, p.n), p.values.dtype)
    g = p.tile_size
    for i in range(p.num_tiles):
        cols = p.columns[i * g:(i + 1) * g]
        rows = p.rows[p.row_offsets[i]:p.row_offsets[i + 1]]
        w[np.ix_(rows, cols)] = p.values[p.row_offsets[i]:p.row_offsets[i + 1], :len(cols)]
    # Added, as every backend adds the residue's product: a residue weight at a tile's kept
    # position (pack makes none) adds to the tile's weight there.
    w[p.residue_rows, p.residue_cols] += p.residue_values
    return w


def sort_residue(packed: PackedTiles) -> PackedTiles:
    """``packed`` with its residue sorted by (column, row), the order the format requires (tiles
    saved before it did were sorted by (row, column); :func:`load` and :func:`from_arrays` call
    this, so old files load)."""
    r, c = np.asarray(packed.residue_rows), np.asarray(packed.residue_cols)
    if not r.ndim == c.ndim == 1 or not len(r) == len(c) == np.size(packed.residue_values):
        return packed  # malformed: left for validate to name
    order = np.lexsort((r, c))
    if np.all(order == np.arange(len(order))):
        return packed
    return dataclasses.replace(packed, residue_rows=r[order], residue_cols=c[order],
                               residue_values=np.asarray(packed.residue_values)[order])


SCHEDULE_FIELDS = ("tile_order", "pruned", "pruned_offsets")


def schedule(columns: Any, row_offsets: Any, n: int, tile_size: int):
    """The schedule of tiles with these columns and row offsets, as numpy int32 arrays:
    ``(tile_order, pruned, pruned_offsets)`` (see the module docstring).

    Output column j belongs to one span: tile t's kept columns, and the pruned columns between
    tile t-1's last kept column and tile t's (the last tile's run to N). A kernel that writes
    tile t's kept columns and ``pruned[pruned_offsets[t]:pruned_offsets[t + 1]]`` (bias, or
    zero) then writes every output column exactly once, with no fill pass.

    Defined for any index arrays, so kernels handed hand-edited tiles stay in bounds: columns
    outside [0, n) mark nothing kept (those output columns are pruned), and the offsets rise
    even for unsorted columns. With no tiles, ``pruned`` is every column and
    ``pruned_offsets`` is ``[0]`` (the output is the bias; kernels need no schedule).

    >>> order, pruned, offsets = schedule([1, 2, 5], [0, 3, 4], n=7, tile_size=2)
    >>> order.tolist(), pruned.tolist(), offsets.tolist()
    ([0, 1], [0, 3, 4, 6], [0, 1, 4])
    """
    columns = np.asarray(columns).astype(np.int64).ravel()
    offsets = np.asarray(row_offsets).astype(np.int64).ravel()
    c, t = len(columns), max(len(offsets) - 1, 0)
    order = np.argsort(-np.diff(offsets), kind="stable").astype(np.int32)
    kept = np.zeros(n, bool)
    kept[columns[(columns >= 0) & (columns < n)]] = True
    pruned = np.flatnonzero(~kept).astype(np.int32)
    if t == 0 or c == 0:
        return order, pruned, np.zeros(t + 1, np.int32)
    last = columns[np.minimum(np.arange(1, t + 1) * tile_size, c) - 1]  # each tile's last column
    ends = np.searchsorted(pruned, last)[:-1]  # pruned columns before it: spans 0..t
    pruned_offsets = np.concatenate([[0], np.clip(ends, 0, len(pruned)), [len(pruned)]])
    return order, pruned, np.maximum.accumulate(pruned_offsets).astype(np.int32)


def _schedule_fields(columns, row_offsets, n, tile_size) -> dict:
    return dict(zip(SCHEDULE_FIELDS, schedule(columns, row_offsets, n, tile_size)))


def _with_schedule_only(packed: PackedTiles) -> PackedTiles:
    """``packed`` with its schedule computed (tiles read back without one); ``max_depth`` is
    kept as stored, for :func:`validate` to check."""
    return dataclasses.replace(packed, **_schedule_fields(
        packed.columns, packed.row_offsets, packed.n, packed.tile_size))


def with_schedule(packed: PackedTiles) -> PackedTiles:
    """``packed`` with its schedule and ``max_depth`` computed again from its columns and row
    offsets (for tiles whose index arrays were edited by hand)."""
    depths = np.diff(np.asarray(packed.row_offsets).astype(np.int64))  # (clamped where corrupt)
    depth = int(np.clip(depths.max(initial=0), 0, packed.k))
    return _with_schedule_only(dataclasses.replace(packed, max_depth=depth))


def check_shapes(packed: PackedTiles) -> None:
    """Raises ValueError, naming the first inconsistency, unless the shapes, dtypes and static
    sizes of ``packed`` fit together. Reads no array data (cheap, works on traced tiles)."""
    if not isinstance(packed, PackedTiles):
        raise ValueError(f"expected PackedTiles, got {type(packed).__name__}")
    k, n, g = packed.k, packed.n, packed.tile_size
    for name in ("k", "n", "max_depth"):
        v = getattr(packed, name)
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"packed tiles: {name} must be an int, got {v!r}")
    if k <= 0 or n <= 0:
        raise ValueError(f"packed tiles: k and n must be positive, got k={k}, n={n}")
    patterns.check_tile_size(g)
    dtype = lambda a: np.dtype(a.dtype) if hasattr(a, "dtype") else np.asarray(a).dtype
    for name in ("columns", "row_offsets", "rows", "residue_rows", "residue_cols") + SCHEDULE_FIELDS:
        a = getattr(packed, name)
        if np.ndim(a) != 1 or dtype(a) != np.int32:
            raise ValueError(f"packed tiles: {name} must be 1-D int32, got {dtype(a)} {np.shape(a)}")
    vdtype = dtype(packed.values)
    if vdtype not in (np.float32, np.dtype(jnp.bfloat16)):
        raise ValueError(f"packed tiles: values dtype must be float32 or bfloat16, got {vdtype}")
    c, r = np.shape(packed.columns)[0], np.shape(packed.rows)[0]
    t = -(-c // g)
    if c > n:
        raise ValueError(f"packed tiles: {c} kept columns, more than n={n}")
    if np.shape(packed.row_offsets)[0] != t + 1:
        raise ValueError(f"packed tiles: row_offsets has length {np.shape(packed.row_offsets)[0]}, "
                         f"expected {t + 1} for {c} columns in tiles of {g}")
    if not 0 <= packed.max_depth <= k or not t and packed.max_depth:  # 0: every tile empty
        raise ValueError(f"packed tiles: max_depth={packed.max_depth} must lie in [0, k={k}] "
                         f"for {t} tiles (0 without tiles)")
    sched = {f: np.shape(getattr(packed, f))[0] for f in SCHEDULE_FIELDS}
    if (sched["tile_order"], sched["pruned_offsets"]) != (t, t + 1) or sched["pruned"] > n:
        raise ValueError(f"packed tiles: the schedule has lengths {sched}, expected tile_order {t}, "
                         f"pruned at most n={n} and pruned_offsets {t + 1} (packing.with_schedule "
                         "makes it)")
    if np.shape(packed.values) != (r, g):
        raise ValueError(f"packed tiles: values has shape {np.shape(packed.values)}, expected {(r, g)}")
    res = [np.shape(getattr(packed, f)) for f in ("residue_rows", "residue_cols", "residue_values")]
    if len(res[2]) != 1 or not res[0] == res[1] == res[2]:
        raise ValueError("packed tiles: residue_rows, residue_cols and residue_values must have "
                         f"one length, got shapes {res}")
    if dtype(packed.residue_values) != vdtype:
        raise ValueError(f"packed tiles: residue_values dtype {dtype(packed.residue_values)} "
                         f"!= values dtype {vdtype}")
    if packed.dense_on is not None and (not isinstance(packed.dense_on, tuple)
                                        or not set(packed.dense_on) <= set(FALLBACK_RULES)):
        raise ValueError(f"packed tiles: dense_on must be None or a tuple of platforms from "
                         f"{tuple(FALLBACK_RULES)}, got {packed.dense_on!r}")
    if packed.dense is not None and (np.shape(packed.dense) != (k, n) or dtype(packed.dense) != vdtype):
        raise ValueError(f"packed tiles: dense must be {vdtype} {(k, n)}, "
                         f"got {dtype(packed.dense)} {np.shape(packed.dense)}")


def validate(packed: PackedTiles) -> None:
    """Raises ValueError, naming the first inconsistency, unless ``packed`` is well formed.

    Checks every index against its range, sortedness, offsets and shapes, so that a kernel
    handed these tiles can never read or write out of bounds. Reads the arrays (on a GPU, a
    copy to the host): :func:`pack` and :func:`load` run it; tiles built or edited by hand
    should pass it before use. Traced arrays get only :func:`check_shapes`.
    """
    check_shapes(packed)
    if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(packed)):
        return
    k, n, g = packed.k, packed.n, packed.tile_size
    cols, offs, rows = (np.asarray(a) for a in (packed.columns, packed.row_offsets, packed.rows))
    res_r, res_c = np.asarray(packed.residue_rows), np.asarray(packed.residue_cols)
    t = len(offs) - 1
    if len(cols) and (cols[0] < 0 or cols[-1] >= n or np.any(np.diff(cols) <= 0)):
        raise ValueError(f"packed tiles: columns must be strictly increasing in [0, {n})")
    if offs[0] != 0 or np.any(np.diff(offs) < 0) or offs[-1] != len(rows):
        raise ValueError(f"packed tiles: row_offsets must rise from 0 to len(rows)={len(rows)}, "
                         f"got {offs.tolist() if len(offs) < 20 else '...'}")
    depth = np.diff(offs)
    if t and depth.max() != packed.max_depth:
        raise ValueError(f"packed tiles: the deepest tile has {depth.max()} rows; expected "
                         f"max_depth={packed.max_depth}")
    if len(rows) and (rows.min() < 0 or rows.max() >= k):
        raise ValueError(f"packed tiles: rows must lie in [0, {k}), got [{rows.min()}, {rows.max()}]")
    tile_of_row = np.repeat(np.arange(t), depth)
    if np.any((np.diff(rows) <= 0) & (tile_of_row[1:] == tile_of_row[:-1])):
        raise ValueError("packed tiles: rows must be strictly increasing within each tile")
    if len(res_r) and (res_r.min() < 0 or res_r.max() >= k or res_c.min() < 0 or res_c.max() >= n):
        raise ValueError(f"packed tiles: residue indices must lie in [0, {k}) x [0, {n})")
    key = res_c.astype(np.int64) * k + res_r
    if np.any(np.diff(key) <= 0):
        raise ValueError("packed tiles: the residue must be sorted by (column, row) without repeats "
                         "(tiles saved by earlier jax_tw versions were sorted by (row, column): "
                         "packing.sort_residue sorts them)")
    for name, want in zip(SCHEDULE_FIELDS, schedule(cols, offs, n, g)):
        if not np.array_equal(np.asarray(getattr(packed, name)), want):
            raise ValueError(f"packed tiles: {name} does not match the schedule of these columns and "
                             "row_offsets (edited by hand? packing.with_schedule computes it again)")


# ----------------------------------------------------------------------------- model variables

PACKED_COLLECTION = "tw_packed"


def pack_variables(variables: dict, tile_size: int | None = None, dtype: Any = None,
                   keep_dense: bool | None = None) -> dict:
    """Converts a trained model's variables (``params`` + ``tw_mask``) into packed variables.

    Every layer of the ``tw_mask`` collection loses its kernel from ``params`` and gains
    ``{'tw_packed': {...layer path...: {'tiles': PackedTiles}}}``; other params are kept. The same
    model definition then runs inference over packed tiles: :class:`jax_tw.nn.TWDense` uses its
    tiles whenever the ``tw_packed`` collection is given. ``dtype`` (e.g. ``jnp.bfloat16``)
    casts the packed weights; by default they keep the params' dtype. ``tile_size`` defaults
    to the one each mask carries (given, it must equal it); ``keep_dense`` is passed to
    :func:`pack`. All arrays come back on the default device (see :func:`pack`).

    >>> import jax, jax.numpy as jnp
    >>> from jax_tw.nn import TWDense
    >>> layer = TWDense(8, tile_size=4)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 6)))
    >>> packed = pack_variables(variables)
    >>> sorted(packed), sorted(packed['params'])
    (['params', 'tw_packed'], ['bias'])
    >>> bool(jnp.allclose(layer.apply(packed, jnp.ones((1, 6))), layer.apply(variables, jnp.ones((1, 6)))))
    True
    """
    from flax import traverse_util

    if "params" not in variables or "tw_mask" not in variables:
        raise ValueError(f"variables must hold 'params' and 'tw_mask', got {sorted(variables)}")
    params = traverse_util.flatten_dict(patterns.plain_dict(variables["params"]))
    packed = {}
    for layer, mask in patterns.layer_masks(variables["tw_mask"]).items():
        patterns.check_not_stacked(patterns.stack_axes(mask), f"tw_mask {'/'.join(layer)}")
        mask = {key: np.asarray(v) for key, v in mask.items()}
        key = layer + ("kernel",)
        if key not in params:
            raise ValueError(f"params has no kernel at {'/'.join(key)} for tw_mask layer {'/'.join(layer)}")
        kernel = np.asarray(meta.unbox(params.pop(key)))  # (boxed by nn.with_partitioning)
        if dtype is not None:
            kernel = kernel.astype(dtype)
        try:
            kernel = patterns.kernel_matrix(kernel, mask, tile_size, where="pack")  # DenseGeneral
            packed[layer + ("tiles",)] = pack(kernel, mask, tile_size, keep_dense)
        except ValueError as e:
            raise ValueError(f"tw_mask {'/'.join(layer) or '(the root module)'}: {e}") from None
    out = {k: v for k, v in variables.items() if k not in ("params", "tw_mask")}
    out["params"] = traverse_util.unflatten_dict(params)
    out[PACKED_COLLECTION] = traverse_util.unflatten_dict(packed)
    return jax.device_put(out)


_FIELDS = ("columns", "row_offsets", "rows", "values", "residue_rows", "residue_cols", "residue_values")
# Saved too, and computed again where a file written before the format had them lacks them.
_SAVED = _FIELDS + SCHEDULE_FIELDS + ("dense",)
_STATICS = ("k", "n", "tile_size", "max_depth")


def save(path: str, variables: dict) -> None:
    """Saves (packed) model variables to a safetensors file; :func:`load` gives them back exactly.

    bfloat16 arrays are stored as their uint16 bits (safetensors' numpy API has no bfloat16),
    with the true dtypes and the tiles' static sizes in the file's metadata.
    """
    import json

    from flax import traverse_util
    from safetensors.numpy import save_file

    tensors, dtypes, statics = {}, {}, {}
    for path_, leaf in traverse_util.flatten_dict(patterns.plain_dict(variables)).items():
        name = "/".join(path_)
        if isinstance(leaf, PackedTiles):
            statics[name] = {s: getattr(leaf, s) for s in _STATICS + ("dense_on",)}
            items = {f"{name}/{f}": getattr(leaf, f) for f in _SAVED if getattr(leaf, f) is not None}
        else:
            items = {name: meta.unbox(leaf)}  # (a boxed param saves its value)
        for key, value in items.items():
            a = np.asarray(value)
            dtypes[key] = a.dtype.name
            # (np.ascontiguousarray would make a 0-d array 1-d)
            tensors[key] = a.view(np.uint16) if a.dtype == np.dtype(jnp.bfloat16) else np.require(a, requirements="C")
    save_file(tensors, path, metadata={"jax_tw.dtypes": json.dumps(dtypes),
                                       "jax_tw.tiles": json.dumps(statics)})


def to_arrays(tree: Any) -> Any:
    """``tree`` with every :class:`PackedTiles` replaced by a dict of its non-empty arrays, its
    static sizes in a ``'statics'`` int64 array (k, n, tile_size, max_depth) and its dtype in a
    one-element ``'dtype'`` array: a tree of non-empty arrays only, which checkpointers such as
    Orbax save and restore without a target structure (Orbax refuses empty arrays, such as the
    residue of a TW-2D layer). :func:`from_arrays` gives the tiles back (validated).

    >>> import orbax.checkpoint as ocp  # doctest: +SKIP
    >>> ocp.StandardCheckpointer().save(path, packing.to_arrays(packed))  # doctest: +SKIP
    >>> packed = packing.from_arrays(ocp.StandardCheckpointer().restore(path))  # doctest: +SKIP
    """
    def convert(leaf):
        if not isinstance(leaf, PackedTiles):
            return leaf
        out = {f: getattr(leaf, f) for f in _FIELDS + ("dense",)  # the schedule is derived
               if getattr(leaf, f) is not None and np.size(getattr(leaf, f))}
        out["statics"] = np.array([getattr(leaf, s) for s in _STATICS], np.int64)
        if leaf.dense_on is not None:  # one flag per platform of FALLBACK_RULES
            out["dense_on"] = np.array([p in leaf.dense_on for p in FALLBACK_RULES], np.int8)
        out["dtype"] = np.zeros(1, leaf.dtype)
        return out
    return jax.tree.map(convert, patterns.plain_dict(tree), is_leaf=lambda x: isinstance(x, PackedTiles))


def from_arrays(tree: Any) -> Any:
    """The inverse of :func:`to_arrays`: every dict holding ``'statics'`` and ``'dtype'``
    entries becomes :class:`PackedTiles` again (empty fields restored, validated, and placed on
    the default device, see :func:`pack`); other leaves are kept."""
    if isinstance(tree, PackedTiles) or not hasattr(tree, "items"):
        return tree
    keys = set(tree.keys())
    if not {"statics", "dtype"} <= keys:
        return {k: from_arrays(v) for k, v in tree.items()}
    extra = keys - set(_SAVED) - {"statics", "dtype", "dense_on"}
    statics = np.asarray(tree["statics"])
    if extra or statics.shape != (len(_STATICS),):
        raise ValueError(f"packed tiles: unexpected entries {sorted(extra)} or statics of shape "
                         f"{statics.shape}, expected ({len(_STATICS)},)")
    statics = {s: int(v) for s, v in zip(_STATICS, statics)}
    if "dense_on" in tree:
        flags = np.asarray(tree["dense_on"]).astype(bool).ravel()
        statics["dense_on"] = tuple(p for p, on in zip(FALLBACK_RULES, flags) if on)
    dtype = np.asarray(tree["dtype"]).dtype
    empty = {f: np.zeros(0, np.int32) for f in _FIELDS}
    empty.update(values=np.zeros((0, statics["tile_size"]), dtype), residue_values=np.zeros(0, dtype))
    tiles = PackedTiles(**{f: np.asarray(tree[f]) if f in tree else empty[f] for f in _FIELDS},
                        **{f: np.zeros(0, np.int32) for f in SCHEDULE_FIELDS},
                        dense=np.asarray(tree["dense"]) if "dense" in tree else None, **statics)
    tiles = sort_residue(_with_schedule_only(tiles))  # to_arrays leaves the schedule out
    validate(tiles)
    return jax.device_put(tiles)


def load(path: str) -> dict:
    """Loads variables saved by :func:`save` (validating every packed layer), as arrays on the
    default device (see :func:`pack`)."""
    import json

    from flax import traverse_util
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
        if "jax_tw.dtypes" not in meta:
            raise ValueError(f"{path} was not written by jax_tw.packing.save (no jax_tw metadata)")
        dtypes = json.loads(meta["jax_tw.dtypes"])
        statics = json.loads(meta["jax_tw.tiles"])
        arrays = {}
        for key in f.keys():
            a = f.get_tensor(key)
            arrays[key] = a.view(jnp.bfloat16) if dtypes[key] == "bfloat16" else a
    flat = {}
    for name, st in statics.items():
        if st.get("dense_on") is not None:
            st["dense_on"] = tuple(st["dense_on"])
        sched = {f: arrays.pop(f"{name}/{f}", None) for f in SCHEDULE_FIELDS}
        tiles = PackedTiles(**{f: arrays.pop(f"{name}/{f}") for f in _FIELDS}, **sched,
                            dense=arrays.pop(f"{name}/dense", None), **st)
        if any(v is None for v in sched.values()):  # written before the format had a schedule
            tiles = _with_schedule_only(tiles)
        tiles = sort_residue(tiles)
        validate(tiles)
        flat[tuple(name.split("/"))] = tiles
    for key, a in arrays.items():
        flat[tuple(key.split("/"))] = a
    return jax.device_put(traverse_util.unflatten_dict(flat))
