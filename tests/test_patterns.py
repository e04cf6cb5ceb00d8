import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jax_tw import patterns
from twcheck import (assert_tile_structure, dense_reference, expand_reference, normalised,
                     pruned_count, tiles_of)

SETTINGS = settings(max_examples=12, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# Shapes and tile sizes come from small pools (awkward on purpose: 1, primes, N not a multiple
# of G) so that jit compilations are reused across examples; values and sparsities are free.
DIMS = st.sampled_from([1, 5, 13, 24, 37])
TILES = st.sampled_from([1, 3, 8])


@st.composite
def layers(draw):
    """Random per-layer score matrices (distinct positive values), a tile size, a sparsity."""
    n_layers = draw(st.integers(1, 2))
    shapes = [(draw(DIMS), draw(DIMS)) for _ in range(n_layers)]
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    scores = [rng.uniform(0.01, 1.0, size=s).astype(np.float32) * rng.uniform(0.1, 10.0)
              for s in shapes]
    tile_size = draw(TILES)
    sparsity = draw(st.floats(0.0, 0.95))
    per_layer = draw(st.booleans())
    return scores, tile_size, sparsity, per_layer


@functools.lru_cache(maxsize=None)
def _jitted(pattern, tile_size, per_layer, min_keep):
    def call(scores, sparsity, previous, final_sparsity):
        return pattern(scores, sparsity, tile_size=tile_size, previous=previous,
                       final_sparsity=final_sparsity, per_layer=per_layer, min_keep=min_keep)
    return jax.jit(call)


def run(pattern, scores, sparsity, *, tile_size, previous=None, final_sparsity=None,
        per_layer=False, min_keep=0.0):
    """``pattern(...)`` under a cached jit (sparsities traced, so they never recompile)."""
    if previous is None:
        previous = [patterns.keep_all(*s.shape, tile_size) for s in scores]
    final = sparsity if final_sparsity is None else final_sparsity
    out = _jitted(pattern, tile_size, per_layer, min_keep)(
        scores, np.float32(sparsity), previous, np.float32(final))
    return jax.tree.map(np.asarray, out)


def _check_count(masks, scores, tile_size, sparsity, per_layer, slack):
    if per_layer:
        for m, s in zip(masks, scores):
            pruned = pruned_count([m], tile_size)
            assert abs(pruned - round(np.float32(sparsity) * s.size)) <= slack(s), (pruned, s.shape)
    else:
        pruned = pruned_count(masks, tile_size)
        target = round(np.float32(sparsity) * sum(s.size for s in scores))
        assert abs(pruned - target) <= max(slack(s) for s in scores), (pruned, target)


# ----------------------------------------------------------------------------- expansion

@SETTINGS
@given(st.integers(1, 30), st.integers(1, 30), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_expand_matches_loop_reference(k, n, tile_size, seed):
    rng = np.random.default_rng(seed)
    columns = rng.random(n) < 0.6
    rows = rng.random((patterns.num_tiles(n, tile_size), k)) < 0.5
    got = np.asarray(patterns.expand(jnp.asarray(columns), jnp.asarray(rows), tile_size))
    np.testing.assert_array_equal(got, expand_reference(columns, rows, tile_size))


def test_expand_example_and_keep_all():
    cols = jnp.array([True, False, True, True])
    rows = jnp.array([[True, False, True], [False, True, True]])
    np.testing.assert_array_equal(
        patterns.expand(cols, rows, 2), [[1, 0, 1, 0], [0, 0, 0, 1], [1, 0, 1, 1]])
    assert patterns.dense_mask(patterns.keep_all(5, 7, 3), 3).all()


# ----------------------------------------------------------------------------- TW-2D / TW-1D

@SETTINGS
@given(layers())
def test_tw2d_structure_exact_sparsity_and_ranking(case):
    scores, g, s, per_layer = case
    masks = run(patterns.TW2D(), scores, s, tile_size=g, per_layer=per_layer)
    for m in masks:
        assert_tile_structure(m, g)
        # every tile but the last has exactly G kept columns (follows from the definition).
        sizes = [len(c) for c in tiles_of(m["columns"], g)]
        assert all(z == g for z in sizes[:-1])
    _check_count(masks, scores, g, s, per_layer, lambda sc: max(sc.shape[0], g) / 2)
    if per_layer:  # columns: a kept column never scores below a pruned one of the same layer.
        for m, sc in zip(masks, scores):
            col = normalised(sc).mean(axis=0)
            kept = np.asarray(m["columns"])
            if kept.any() and (~kept).any():
                assert col[kept].min() >= col[~kept].max() - 1e-6


@SETTINGS
@given(layers())
def test_tw1d_keeps_columns_and_ranks_segments(case):
    scores, g, s, per_layer = case
    masks = run(patterns.TW1D(), scores, s, tile_size=g, per_layer=per_layer)
    for m in masks:
        assert np.asarray(m["columns"]).all()
        assert_tile_structure(m, g)
    _check_count(masks, scores, g, s, per_layer, lambda sc: g / 2)
    # Segment ranking is global: every kept (tile, row) segment scores >= every pruned one.
    kept_scores, pruned_scores = [], []
    for m, sc in zip(masks, scores):
        ns = normalised(sc)
        for t, cols in enumerate(tiles_of(m["columns"], g)):
            seg = ns[:, cols].mean(axis=1)
            rows = np.asarray(m["rows"][t])
            kept_scores.append(seg[rows])
            pruned_scores.append(seg[~rows])
        if per_layer:
            k_, p_ = np.concatenate(kept_scores), np.concatenate(pruned_scores)
            if k_.size and p_.size:
                assert k_.min() >= p_.max() - 1e-5
            kept_scores, pruned_scores = [], []
    if not per_layer:
        k_, p_ = np.concatenate(kept_scores), np.concatenate(pruned_scores)
        if k_.size and p_.size:
            assert k_.min() >= p_.max() - 1e-5


@SETTINGS
@given(layers(), st.lists(st.floats(0.0, 0.9), min_size=2, max_size=4))
def test_tw2d_gradual_masks_only_grow_and_hit_each_target(case, steps):
    scores, g, _, per_layer = case
    steps = sorted(steps)
    final = steps[-1]
    previous = None
    for s in steps:
        masks = run(patterns.TW2D(), scores, s, tile_size=g, previous=previous,
                    final_sparsity=final, per_layer=per_layer)
        for i, m in enumerate(masks):
            assert_tile_structure(m, g)
            if previous is not None:
                new, old = dense_reference(m, g), dense_reference(previous[i], g)
                assert not (new & ~old).any(), "a pruned weight came back"
        # Columns-first keeps tiles fixed, so every step hits its own target.
        _check_count(masks, scores, g, s, per_layer, lambda sc: max(sc.shape[0], g) / 2)
        previous = masks


@pytest.mark.parametrize("pattern", [patterns.TW2D(), patterns.TEW(residue=0.05), patterns.EW()])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_a_score_that_is_not_finite_counts_as_zero(pattern, bad):
    """One diverged weight's score does not change how the rest of its layer ranks against the
    other layers: the masks are those of the same scores with a 0 there."""
    rng = np.random.default_rng(0)
    scores = [rng.random((16, 16)).astype(np.float32), rng.random((16, 24)).astype(np.float32)]
    zero = [scores[0].copy(), scores[1]]
    zero[0][3, 5] = 0.0
    diverged = [scores[0].copy(), scores[1]]
    diverged[0][3, 5] = bad
    want = run(pattern, zero, 0.5, tile_size=4)
    got = run(pattern, diverged, 0.5, tile_size=4)
    for w, m in zip(want, got):
        for key in w:
            np.testing.assert_array_equal(m[key], w[key], err_msg=key)


@pytest.mark.parametrize("per_layer", [False, True])
def test_tw2d_columns_stay_once_rows_are_pruned_under_changing_scores(per_layer):
    """With a final sparsity, the columns stop changing once rows are pruned, however the
    scores change between updates and however different the layers' K (a column of another
    length could otherwise come nearer the column count and move later columns into other
    tiles, under rows pruned for the old ones)."""
    g, final = 4, 0.8
    shapes = [(3, 36), (64, 10), (10, 1), (7, 20)]
    col_final = 1 - (1 - final) ** patterns.TW2D().column_share
    changed = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        previous, frozen = None, None
        for s in np.linspace(0.05, final, 12):
            scores = [(rng.random(shape) ** 3).astype(np.float32) for shape in shapes]
            masks = run(patterns.TW2D(), scores, s, tile_size=g, previous=previous,
                        final_sparsity=final, per_layer=per_layer)
            for i, m in enumerate(masks):
                assert_tile_structure(m, g)
                if previous is not None:
                    assert not (dense_reference(m, g) & ~dense_reference(previous[i], g)).any()
            columns = np.concatenate([m["columns"] for m in masks])
            if np.float32(s) >= np.float32(col_final):
                frozen = columns if frozen is None else frozen
                changed += int((columns != frozen).any())
            previous = masks
    assert changed == 0, f"columns changed after rows were pruned in {changed} updates"


@SETTINGS
@given(layers())
def test_masks_only_grow_even_when_tiles_must_change(case):
    """Without the columns-first split (final_sparsity = each step's own), column pruning re-forms
    tiles; masks must still only shrink and keep the tile structure."""
    scores, g, _, per_layer = case
    previous = None
    for s in (0.3, 0.5, 0.8):
        masks = run(patterns.TW2D(), scores, s, tile_size=g, previous=previous,
                    per_layer=per_layer)
        for i, m in enumerate(masks):
            assert_tile_structure(m, g)
            if previous is not None:
                assert not (dense_reference(m, g) & ~dense_reference(previous[i], g)).any()
        previous = masks


def test_determinism_eager_and_jit_and_tie_order():
    rng = np.random.default_rng(0)
    scores = [rng.random((48, 40)).astype(np.float32), rng.random((40, 24)).astype(np.float32)]
    first = patterns.TW2D()(scores, 0.6, tile_size=8)  # eager
    again = run(patterns.TW2D(), scores, 0.6, tile_size=8, min_keep=0.05)
    jitted = run(patterns.TW2D(), scores, 0.6, tile_size=8, min_keep=0.05)
    for a, b, c in zip(first, again, jitted):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
            np.testing.assert_array_equal(a[key], c[key])
    # Documented tie order: with equal scores the earlier vector is pruned first.
    flat = [np.ones((16, 32), np.float32)]
    [m] = run(patterns.TW2D(column_share=1.0), flat, 0.25, tile_size=8)
    np.testing.assert_array_equal(np.flatnonzero(~np.asarray(m["columns"])), np.arange(8))
    [m] = run(patterns.TW1D(), flat, 0.5, tile_size=8)
    # Tile-major order: all of tile 0's rows go first, then tile 1's.
    np.testing.assert_array_equal(np.asarray(m["rows"]).sum(axis=1), [0, 0, 16, 16])


@pytest.mark.parametrize("pattern", [patterns.TW2D(), patterns.TEW(residue=0.1), patterns.EW()],
                         ids=lambda p: p.name)
def test_eager_call_compiles_once_per_shape_and_matches_op_by_op(pattern):
    """An eager call runs as one compiled computation: new scores and sparsities reuse it, a new
    shape compiles it once. Op by op, each of its hundreds of small ops compiled on its own for
    every new shape (4.5-12.5 s per layer shape on a 2-core CPU). The results are those of the
    ops run one by one (``jax.disable_jit``)."""
    rng = np.random.default_rng(3)
    shapes = [(29, 45), (45, 19)]
    compiled = patterns._compute_masks._cache_size
    before = compiled()
    for sparsity in (0.3, 0.6):
        scores = [rng.random(s).astype(np.float32) for s in shapes]
        got = pattern(scores, sparsity, tile_size=8)
        with jax.disable_jit():
            want = pattern(scores, sparsity, tile_size=8)
        for a, b in zip(got, want):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
        assert compiled() == before + 1


def test_min_keep_floor_prevents_emptying_a_layer():
    # Layer A: uniform scores. Layer B: a third of its columns at 0, the rest at 1.5 (mean 1).
    # Ranked globally at 75%, A's vectors all rank below B's kept ones and A is emptied.
    a = np.ones((32, 48), np.float32)
    b = np.ones((32, 48), np.float32) * 1.5
    b[:, :16] = 0.0
    scores = [a, b]
    emptied = run(patterns.TW2D(), scores, 0.75, tile_size=8, min_keep=0.0)
    assert not dense_reference(emptied[0], 8).any()
    floored = run(patterns.TW2D(), scores, 0.75, tile_size=8, min_keep=0.05)
    assert dense_reference(floored[0], 8).mean() >= 0.05
    for p in (patterns.EW(), patterns.BW(block_size=8)):
        ms = run(p, [a, b * 0 + np.linspace(0, 2, 48, dtype=np.float32)], 0.9, tile_size=8,
                 min_keep=0.05)
        assert all(dense_reference(m, 8).mean() >= 0.05 for m in ms)


# ----------------------------------------------------------------------------- TEW and baselines

@SETTINGS
@given(layers(), st.sampled_from([0.01, 0.04]))
def test_tew_residue_is_separate_best_and_exact(case, residue):
    scores, g, s, per_layer = case
    s = min(s, 0.9)
    masks = run(patterns.TEW(residue=residue), scores, s, tile_size=g, per_layer=per_layer)
    for m, sc in zip(masks, scores):
        tile = expand_reference(m["columns"], m["rows"], g)
        res = np.asarray(m["elements"])
        assert not (tile & res).any(), "residue overlaps the tiles"
        assert_tile_structure({k: v for k, v in m.items() if k != "elements"}, g)
        if per_layer:
            assert res.sum() == min(round(np.float32(residue) * sc.size), (~tile).sum())
            removed = ~tile & ~res
            ns = normalised(sc)
            if res.any() and removed.any():
                assert ns[res].min() >= ns[removed].max() - 1e-6
    _check_count(masks, scores, g, s, per_layer, lambda sc: max(sc.shape[0], g) / 2 + 1)


@SETTINGS
@given(layers())
def test_ew_exact_and_thresholded(case):
    scores, g, s, per_layer = case
    masks = run(patterns.EW(), scores, s, tile_size=g, per_layer=per_layer)
    _check_count(masks, scores, g, s, per_layer, lambda sc: 0)
    kept = np.concatenate([normalised(sc)[np.asarray(m["elements"])] for m, sc in zip(masks, scores)])
    pruned = np.concatenate([normalised(sc)[~np.asarray(m["elements"])] for m, sc in zip(masks, scores)])
    assert not any(np.asarray(m["columns"]).any() for m in masks)
    if kept.size and pruned.size and not per_layer:
        assert kept.min() >= pruned.max() - 1e-6


@SETTINGS
@given(layers(), st.sampled_from([1, 4, 16]))
def test_vw_blocks_keep_n_or_n_plus_one(case, v):
    scores, g, s, per_layer = case
    masks = run(patterns.VW(vector_size=v), scores, s, tile_size=g, per_layer=per_layer)
    _check_count(masks, scores, g, s, per_layer, lambda sc: 0)
    counts = []
    for m, sc in zip(masks, scores):
        e = np.asarray(m["elements"])
        k = e.shape[0]
        full = k - k % v
        if full:
            counts.append(e[:full].reshape(-1, v, e.shape[1]).sum(axis=1).ravel())
            if per_layer:
                assert np.ptp(counts[-1]) <= 1
    if counts and not per_layer:
        assert np.ptp(np.concatenate(counts)) <= 1


@SETTINGS
@given(layers(), st.sampled_from([1, 3, 8]))
def test_bw_square_blocks(case, b):
    scores, g, s, per_layer = case
    masks = run(patterns.BW(block_size=b), scores, s, tile_size=g, per_layer=per_layer)
    for m in masks:
        e = np.asarray(m["elements"])
        for i in range(0, e.shape[0], b):
            for j in range(0, e.shape[1], b):
                blk = e[i:i + b, j:j + b]
                assert blk.all() or not blk.any()
    _check_count(masks, scores, g, s, per_layer, lambda sc: b * b / 2)


@pytest.mark.parametrize("pattern", [patterns.TW2D(), patterns.TW1D(), patterns.TEW(),
                                     patterns.EW(), patterns.VW(), patterns.BW(block_size=4)])
def test_every_pattern_only_shrinks_previous(pattern):
    rng = np.random.default_rng(1)
    scores = [rng.random((24, 40)).astype(np.float32), rng.random((40, 24)).astype(np.float32)]
    previous = None
    for s in (0.2, 0.4, 0.7):
        masks = run(pattern, scores, s, tile_size=8, previous=previous, final_sparsity=0.7,
                    min_keep=0.05)
        if previous is not None:
            for m, old in zip(masks, previous):
                assert not (dense_reference(m, 8) & ~dense_reference(old, 8)).any()
        previous = masks
    assert abs(pruned_count(previous, 8) / sum(s.size for s in scores) - 0.7) < 0.02


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity_names_value(bad):
    with pytest.raises(ValueError, match="sparsity must be in"):
        patterns.TW2D()([np.ones((4, 4), np.float32)], bad, tile_size=2)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_bad_tile_size_names_value(bad):
    with pytest.raises(ValueError, match=f"tile_size must be a positive integer, got {bad!r}"):
        patterns.TW2D()([np.ones((4, 4), np.float32)], 0.5, tile_size=bad)


def test_bad_scores_and_previous():
    with pytest.raises(ValueError, match="empty list"):
        patterns.TW2D()([], 0.5)
    with pytest.raises(ValueError, match=r"scores\[0\] must be a \(K, N\) matrix, got shape \(4,\)"):
        patterns.TW2D()([np.ones(4, np.float32)], 0.5)
    wrong = patterns.keep_all(4, 6, 2)
    with pytest.raises(ValueError, match=r"previous\[0\]: tw_mask 'columns' has shape \(6,\), expected \(4,\)"):
        patterns.TW2D()([np.ones((4, 4), np.float32)], 0.5, tile_size=2, previous=[wrong])
    with pytest.raises(ValueError, match="column_share must be in"):
        patterns.TW2D(column_share=1.5)
    with pytest.raises(ValueError, match="sparsity \\+ residue < 1"):
        patterns.TEW(residue=0.2)([np.ones((4, 4), np.float32)], 0.85, tile_size=2)
    with pytest.raises(ValueError, match="vector_size must be a positive integer, got 0"):
        patterns.VW(vector_size=0)
    with pytest.raises(ValueError, match="block_size must be a positive integer, got 2.5"):
        patterns.BW(block_size=2.5)
    with pytest.raises(ValueError, match="unknown pattern 'xw'"):
        patterns.get("xw")
    assert patterns.get("TW-2D") == patterns.TW2D()


# ----------------------------------------------------------------------------- counts past int32

def test_weight_counts_past_two_to_the_31():
    """The ranking's weight counts are exact beyond int32 (no 2**31 weights needed: few vectors
    of 2**30 weights each). An int32 prefix sum wraps negative here and prunes the wrong number."""
    lengths = jnp.full((6,), 2 ** 30 + 5, jnp.int32)
    none = jnp.zeros(6, bool)
    scores = jnp.arange(6, dtype=jnp.float32)
    total = 6 * (2 ** 30 + 5)
    for sparsity, want in ((0.5, 3), (0.7, 4), (0.95, 6), (0.05, 0)):
        target = patterns._target(np.float32(sparsity), total)
        pruned = jax.jit(patterns._prune_lowest)(scores, lengths, none, none, target)
        assert int(pruned.sum()) == want and bool(pruned[:want].all()), (sparsity, pruned)
    # Exact arithmetic: 2**33 + 3 weights, less 2**32, is 2**32 + 3 (the low word and the estimate).
    c = patterns._count(2 ** 33 + 3) - patterns._count(2 ** 32)
    assert int(c.low) == 3 and float(c.approx) == 2.0 ** 32
    prefix = patterns._prefix_counts(jnp.full((8,), 2 ** 31 - 1, jnp.int32))
    exact = np.cumsum(np.full(8, 2 ** 31 - 1, np.int64))
    assert (np.asarray(prefix.low) == exact % 2 ** 32).all()
    assert np.abs(np.asarray(prefix.approx, np.float64) - exact).max() < 2 ** 31


@pytest.mark.parametrize("seed", range(4))
def test_first_in_order_is_the_stable_sort_prefix(seed):
    """Single weights are ranked without a sort: the marked entries are exactly the first
    ``count`` of ``argsort(key, stable=True)``, with ties (few distinct values), infinities,
    -0.0 next to 0.0, negative keys, and counts 0, 1, all and in between."""
    rng = np.random.default_rng(seed)
    n = 1000
    key = rng.integers(-4, 5, n).astype(np.float32) * rng.choice([1.0, 0.25], n).astype(np.float32)
    key[rng.random(n) < 0.05] = -np.inf
    key[rng.random(n) < 0.05] = np.inf
    key[rng.random(n) < 0.05] = -0.0
    key[: n // 2] += rng.random(n // 2).astype(np.float32) * (seed % 2)  # distinct values too
    order = np.asarray(jnp.argsort(jnp.asarray(key), stable=True))
    first = jax.jit(patterns._first_in_order)
    below = int((key < 0).sum())
    for count in (0, 1, 7, 333, below, below + int((key == 0).sum()) // 2, n - 1, n):
        want = np.zeros(n, bool)
        want[order[:count]] = True
        np.testing.assert_array_equal(np.asarray(first(key, count)), want, err_msg=str(count))


@pytest.mark.parametrize("pattern", [patterns.TEW(), patterns.EW(), patterns.VW()], ids=lambda p: p.name)
def test_patterns_that_rank_single_weights_refuse_more_than_int32(pattern):
    """TEW's residue, EW and VW index single weights in int32: 2.5e9 weights in one ranking are
    refused before anything is computed (a broadcast view: no memory)."""
    huge = [np.broadcast_to(np.float32(1), (50000, 50000))]
    with pytest.raises(ValueError, match=r"2500000000 weights in one ranking .*per_layer=True"):
        pattern(huge, 0.5, tile_size=128)


def test_sparsity_rounding_to_one_in_float32_is_refused():
    with pytest.raises(ValueError, match="which is 1.0 in float32"):
        patterns.TW2D()([np.ones((4, 4), np.float32)], 0.99999999, tile_size=2)


def test_mask_tile_size_mismatch_and_marker():
    [m] = patterns.TW2D()([np.ones((6, 10), np.float32)], 0.5, tile_size=4)
    assert np.shape(m["tile_size"]) == (4,) and patterns.mask_tile_size(m) == 4
    with pytest.raises(ValueError, match="made for tile_size=4, got tile_size=5"):
        patterns.dense_mask(m, 5)
    with pytest.raises(ValueError, match="made for tile_size=4, got tile_size=2"):
        patterns.TW2D()([np.ones((6, 10), np.float32)], 0.5, tile_size=2, previous=[m])
    hand = {"columns": np.ones(10, bool), "rows": np.ones((3, 6), bool)}  # no marker: G given
    assert patterns.dense_mask(hand, 4).all()
    with pytest.raises(ValueError, match="carries no tile size"):
        patterns.dense_mask(hand)
