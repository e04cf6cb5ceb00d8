import dataclasses
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jax_tw import _ffi, ops, packing, patterns
from twcheck import (activate64, packed_layer, reference as _reference, run_script_stages, runnable_backends,
                     subprocess_env)

BACKENDS = runnable_backends()


def _layer(k, n, g, sparsity, dtype=np.float32, seed=0, pattern=None, empty_tiles=False):
    """twcheck.packed_layer, every other tile emptied when ``empty_tiles``."""
    return packed_layer(k, n, g, sparsity, dtype, seed, pattern, empty_every=2 if empty_tiles else 0)


# ----------------------------------------------------------------------------- packing

@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
@pytest.mark.parametrize("pattern", [patterns.TW2D(), patterns.TW1D(), patterns.TEW(residue=0.05),
                                     patterns.EW(), patterns.BW(block_size=4)])
def test_pack_unpack_round_trip_is_exact(dtype, pattern):
    for k, n, g, s in [(24, 40, 8, 0.6), (13, 7, 3, 0.5), (5, 9, 16, 0.3), (16, 16, 4, 0.0)]:
        w, mask, p = _layer(k, n, g, s, dtype, pattern=pattern)
        want = np.where(np.asarray(patterns.dense_mask(mask, g)), w, np.zeros((), dtype))
        got = packing.unpack(p)
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got.view(np.uint16 if dtype != np.float32 else np.uint32),
                                      want.view(np.uint16 if dtype != np.float32 else np.uint32))
        assert p.density() == pytest.approx(np.asarray(patterns.dense_mask(mask, g)).mean())


def test_pack_fully_pruned_layer():
    w = np.ones((6, 10), np.float32)
    mask = {"columns": np.zeros(10, bool), "rows": np.zeros((3, 6), bool), "elements": np.zeros((6, 10), bool)}
    p = packing.pack(w, mask, 4)
    assert p.num_tiles == 0 and p.max_depth == 0
    assert not packing.unpack(p).any()


# (name, corruption, message, whether a call's shape check sees it). Corrupt index *values*
# are found where tiles are made or loaded (validate, run by pack and load) and by the host
# kernel; a call checks only shapes and dtypes, so that it never copies device arrays to the host.
CORRUPTIONS = [
    ("columns", lambda p: dataclasses.replace(p, columns=p.columns[::-1].copy()), "strictly increasing", False),
    ("column range", lambda p: dataclasses.replace(p, columns=p.columns + p.n), r"columns must be strictly increasing in \[0", False),
    ("rows range", lambda p: dataclasses.replace(p, rows=p.rows + p.k), r"rows must lie in \[0", False),
    ("rows order", lambda p: dataclasses.replace(p, rows=p.rows[::-1].copy()), "strictly increasing within each tile", False),
    ("offsets", lambda p: dataclasses.replace(p, row_offsets=p.row_offsets[::-1].copy()), "row_offsets must rise", False),
    ("max_depth", lambda p: dataclasses.replace(p, max_depth=p.max_depth + 1), "max_depth", False),
    ("offsets length", lambda p: dataclasses.replace(p, row_offsets=p.row_offsets[:-1]), "row_offsets has length", True),
    ("values shape", lambda p: dataclasses.replace(p, values=p.values[:-1]), "values has shape", True),
    ("index dtype", lambda p: dataclasses.replace(p, rows=np.asarray(p.rows).astype(np.int64)), "must be 1-D int32", True),
    ("residue", lambda p: dataclasses.replace(p, residue_cols=p.residue_cols[:-1]), "one length", True),
    ("residue repeat", lambda p: dataclasses.replace(p, residue_rows=np.r_[p.residue_rows[:1], p.residue_rows[:-1]].astype(np.int32),
                                                     residue_cols=np.r_[p.residue_cols[:1], p.residue_cols[:-1]].astype(np.int32)),
     r"sorted by \(column, row\) without repeats", False),
    # The last residue weight only (the host kernel checks the first one apart from the rest).
    ("residue rows range", lambda p: dataclasses.replace(p, residue_rows=np.r_[p.residue_rows[:-1], p.k].astype(np.int32)),
     r"residue indices must lie in \[0", False),
    ("residue cols range", lambda p: dataclasses.replace(p, residue_cols=np.r_[p.residue_cols[:-1], p.n].astype(np.int32)),
     r"residue indices must lie in \[0", False),
    ("max_depth range", lambda p: dataclasses.replace(p, max_depth=p.k + 1), r"max_depth=25 must lie in \[0, k=24\]", True),
    ("tile order", lambda p: dataclasses.replace(p, tile_order=p.tile_order[::-1].copy()), "tile_order does not match", False),
    ("pruned", lambda p: dataclasses.replace(p, pruned=p.pruned + 1), "pruned does not match", False),
    ("schedule length", lambda p: dataclasses.replace(p, pruned_offsets=p.pruned_offsets[:-1]), "the schedule has lengths", True),
]
# Read by the GPU kernels only: the host kernel needs no schedule.
_HOST_IGNORES = {"max_depth", "tile order", "pruned"}


@pytest.mark.parametrize("name,corrupt,match,shape", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_packed_tiles_raise_clear_errors(name, corrupt, match, shape, tmp_path):
    _, _, p = _layer(24, 40, 8, 0.6, pattern=patterns.TEW(residue=0.05))
    bad = corrupt(p)
    with pytest.raises(ValueError, match=match):
        packing.validate(bad)
    path = str(tmp_path / "bad.safetensors")
    packing.save(path, {"tw_packed": {"tiles": bad}})
    with pytest.raises(ValueError, match=match):
        packing.load(path)
    if shape:
        for backend in BACKENDS:
            with pytest.raises(ValueError, match=match):
                ops.tw_matmul(np.ones((2, 24), np.float32), bad, backend=backend)
    elif _ffi.cpu_available() and name not in _HOST_IGNORES:  # the host kernel refuses them itself
        with pytest.raises(Exception, match="corrupt packed tiles"):
            jax.block_until_ready(ops.tw_matmul(np.ones((2, 24), np.float32), bad, backend="cpu"))


@pytest.fixture(scope="module")
def long_layer():
    """Packed tiles with tens of thousands of kept rows, and a residue of every other row of
    the pruned columns (sorted by column, then row)."""
    _, _, p = _layer(3000, 400, 16, 0.5)
    cols = np.setdiff1d(np.arange(p.n), np.asarray(p.columns))
    res_c, res_r = (a.ravel().astype(np.int32) for a in np.meshgrid(cols, np.arange(0, p.k, 2), indexing="ij"))
    values = np.random.default_rng(1).normal(size=len(res_r)).astype(np.float32)
    return dataclasses.replace(p, residue_rows=res_r, residue_cols=res_c, residue_values=values)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the host custom call is not built")
@pytest.mark.parametrize("where", [0, 16, 4099, -1])
@pytest.mark.parametrize("array", ["residue_rows", "residue_cols", "rows"])
def test_host_kernel_finds_one_bad_index_in_long_arrays(long_layer, array, where):
    """The host kernel's index checks run in vector passes (a clone per instruction set): one
    bad index at the start, inside the vector body or at the end of tens of thousands of
    indices is still refused, named, and the call fails instead of reading out of bounds."""
    p = long_layer
    x = np.random.default_rng(0).normal(size=(3, 3000)).astype(np.float32)
    want = _reference(x, packing.unpack(p))
    np.testing.assert_allclose(ops.tw_matmul(x, p, backend="cpu"), want, rtol=1e-4, atol=1e-3)
    good = np.asarray(getattr(p, array))
    assert len(good) > 4100
    bad = good.copy()
    bad[where] = p.k + 7 if array != "residue_cols" else p.n + 7
    with pytest.raises(Exception, match="corrupt packed tiles: .*out of"):
        jax.block_until_ready(ops.tw_matmul(x, dataclasses.replace(p, **{array: bad}), backend="cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_residue_weight_inside_a_tile_adds_to_it(backend):
    """pack puts the residue outside the tiles; where one is given inside (at a tile's kept
    position), every backend and unpack add it to the tile's weight there."""
    w, _, p = _layer(24, 40, 8, 0.6, pattern=patterns.TEW(residue=0.05))
    col, row = int(p.columns[0]), int(p.rows[0])  # tile 0's first kept position
    rows, cols = np.r_[p.residue_rows, row], np.r_[p.residue_cols, col]
    values = np.r_[p.residue_values, np.float32(0.75)]
    inside = packing.sort_residue(dataclasses.replace(p, residue_rows=rows.astype(np.int32),
                                                      residue_cols=cols.astype(np.int32), residue_values=values))
    want = packing.unpack(p)
    want[row, col] += np.float32(0.75)
    np.testing.assert_array_equal(packing.unpack(inside), want)
    x = np.random.default_rng(2).normal(size=(3, 24)).astype(np.float32)
    np.testing.assert_allclose(ops.tw_matmul(x, inside, backend=backend), _reference(x, want), rtol=1e-5, atol=1e-5)


def _corrupt_residue(p, rng):
    """p with its residue changed at random in one of five ways; some changes keep it sound
    (a column moved within its neighbours' range), most do not."""
    rows, cols = np.array(p.residue_rows), np.array(p.residue_cols)
    i = int(rng.integers(len(rows)))
    j = int(np.clip(i + rng.integers(-3, 4), 0, len(rows) - 1))
    kind = rng.integers(5)
    if kind == 0:  # two weights swapped (across a span's boundary when they straddle one)
        rows[[i, j]], cols[[i, j]] = rows[[j, i]], cols[[j, i]]
    elif kind == 1:
        cols[i] = rng.integers(-3, p.n + 3)
    elif kind == 2:
        rows[i] = rng.integers(-3, p.k + 3)
    elif kind == 3:  # a repeat
        rows[i], cols[i] = rows[j], cols[j]
    else:  # the first or last weight out of range
        (cols if rng.integers(2) else rows)[-int(rng.integers(2))] = -1 if rng.integers(2) else max(p.k, p.n)
    return dataclasses.replace(p, residue_rows=rows, residue_cols=cols)


def _residue_ends_out_of_range(p):
    """p with the residue's first or last row or column at -1 or at its bound (8 layers)."""
    for name, bound in (("residue_rows", p.k), ("residue_cols", p.n)):
        for at in (0, -1):
            for value in (-1, bound):
                a = np.array(getattr(p, name))
                a[at] = value
                yield dataclasses.replace(p, **{name: a})


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the host custom call is not built")
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8, 16, 40])
def test_host_kernel_judges_residue_as_validate_does(m, dtype):
    """The host kernel checks the residue span by span, in the work items that read it: on
    random corruptions (out of range, out of order, repeated, across spans' boundaries) it
    refuses exactly the residues packing.validate refuses, on every path (M = 1: a walk that
    checks as it goes on AVX-512; 3, 8 and 16: few rows, walks of 4, 8 and 16 floats per weight;
    40: blocked), and computes the rest right."""
    _, _, p = _layer(64, 200, 16, 0.6, dtype, pattern=patterns.TEW(residue=0.1))
    assert p.num_tiles >= 4 and len(p.residue_rows) > 100
    rng = np.random.default_rng(m)
    x = rng.normal(size=(m, 64)).astype(dtype)
    f = jax.jit(lambda x, p: _ffi.cpu_tw_matmul(x, p, None, jnp.float32))
    refused = 0
    for bad in [*_residue_ends_out_of_range(p), *(_corrupt_residue(p, rng) for _ in range(40))]:
        try:
            packing.validate(bad)
        except ValueError:
            refused += 1
            with pytest.raises(Exception, match="corrupt packed tiles: .*residue"):
                jax.block_until_ready(f(x, bad))
        else:
            tol = 1e-4 if dtype == np.float32 else 1e-2
            np.testing.assert_allclose(f(x, bad), _reference(x, packing.unpack(bad)), rtol=tol, atol=tol)
    assert 28 <= refused < 48


def test_call_reads_no_array_data(monkeypatch):
    """An eager call checks shapes and dtypes only: the tiles' data never comes to the host."""
    _, _, p = _layer(24, 40, 8, 0.6)
    want = np.ones((2, 24)) @ packing.unpack(p)
    p = jax.device_put(p)
    monkeypatch.setattr(packing, "validate", lambda *a: pytest.fail("tw_matmul validated the data"))
    for backend in BACKENDS:
        y = ops.tw_matmul(jnp.ones((2, 24), jnp.float32), p, backend=backend)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_residue_saved_in_row_order_loads_sorted(tmp_path):
    """Files written when the residue was sorted by (row, column) load, sorted by (column, row),
    and compute the same product."""
    _, _, p = _layer(24, 40, 8, 0.6, pattern=patterns.TEW(residue=0.1))
    order = np.lexsort((p.residue_cols, p.residue_rows))
    assert np.any(order != np.arange(len(order)))  # the two orders differ for this layer
    old = dataclasses.replace(p, residue_rows=p.residue_rows[order], residue_cols=p.residue_cols[order],
                              residue_values=p.residue_values[order])
    with pytest.raises(ValueError, match=r"sorted by \(column, row\)"):
        packing.validate(old)
    path = str(tmp_path / "old.safetensors")
    packing.save(path, {"tiles": old})
    for q in (packing.load(path)["tiles"], packing.from_arrays(packing.to_arrays({"t": old}))["t"]):
        for f in ("residue_rows", "residue_cols", "residue_values"):
            np.testing.assert_array_equal(getattr(q, f), getattr(p, f))


@pytest.mark.parametrize("columns,n,g", [([1, 2, 5, 6, 9], 12, 2), ([0, 1, 2], 3, 2), ([], 5, 4),
                                         ([4, 1, 7, -3, 10 ** 6], 9, 2)])  # the last: corrupt
def test_schedule_spans_cover_every_column_once(columns, n, g):
    """Every output column is written once: by its tile (kept, in range) or as a pruned column in
    exactly one tile's span, a span ending at its tile's last kept column. Tiles deepest first."""
    rng = np.random.default_rng(len(columns))
    t = -(-len(columns) // g)
    offsets = np.r_[0, np.cumsum(rng.integers(0, 5, size=t))].astype(np.int32)
    order, pruned, pruned_offsets = packing.schedule(np.asarray(columns, np.int32), offsets, n, g)
    depth = np.diff(offsets)
    assert sorted(order) == list(range(t)) and (np.diff(depth[order]) <= 0).all()
    assert all(depth[a] > depth[b] or a < b for a, b in zip(order[:-1], order[1:]))  # stable
    assert len(pruned_offsets) == t + 1 and (np.diff(pruned_offsets) >= 0).all()
    kept = [c for c in columns if 0 <= c < n]
    if not t:
        assert pruned.tolist() == list(range(n))
        return
    assert pruned_offsets[0] == 0 and pruned_offsets[-1] == len(pruned)
    spans = [pruned[pruned_offsets[i]:pruned_offsets[i + 1]].tolist() for i in range(t)]
    assert sorted(sum(spans, []) + kept) == list(range(n))
    if columns == sorted(kept):  # valid columns: a span ends at its tile's last kept column
        for i, span in enumerate(spans[:-1]):
            last = columns[min((i + 1) * g, len(columns)) - 1]
            before = columns[i * g - 1] if i else -1
            assert span == [j for j in range(before + 1, last) if j not in columns]


def test_tiles_saved_without_a_schedule_load(tmp_path):
    """Files written before the format carried its schedule load with it computed."""
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open
    _, _, p = _layer(24, 40, 8, 0.6)
    path = str(tmp_path / "old.safetensors")
    packing.save(path, {"tiles": p})
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
    arrays = {key: a for key, a in load_file(path).items() if key.split("/")[-1] not in packing.SCHEDULE_FIELDS}
    assert len(arrays) == 7
    save_file(arrays, path, metadata=meta)
    q = packing.load(path)["tiles"]
    for f in packing.SCHEDULE_FIELDS:
        np.testing.assert_array_equal(getattr(q, f), getattr(p, f))


def test_save_and_load_keep_zero_dimensional_leaves(tmp_path):
    _, _, p = _layer(24, 40, 8, 0.6)
    tree = {"params": {"scale": np.float32(1.5), "steps": np.int32(7), "half": np.asarray(2, jnp.bfloat16),
                       "bias": np.arange(3, dtype=np.float32)}, "tw_packed": {"fc": {"tiles": p}}}
    path = str(tmp_path / "scalars.safetensors")
    packing.save(path, tree)
    loaded = packing.load(path)["params"]
    for key, want in tree["params"].items():
        assert np.shape(loaded[key]) == np.shape(want) and loaded[key].dtype == np.asarray(want).dtype, key
        np.testing.assert_array_equal(np.asarray(loaded[key]), np.asarray(want))


def test_with_schedule_recomputes_max_depth_of_hand_edited_tiles():
    """Deepening a tile by hand and calling with_schedule, as its docstring says, gives tiles
    every backend and the gradient read in full."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(8, 4)).astype(np.float32)
    mask = {"columns": np.ones(4, bool), "rows": np.arange(8)[None] < 2, "tile_size": patterns.tile_marker(4)}
    p = packing.pack(w, mask, 4, keep_dense=False)
    assert p.max_depth == 2
    p = packing.with_schedule(dataclasses.replace(
        p, rows=np.arange(8, dtype=np.int32), row_offsets=np.array([0, 8], np.int32), values=w))
    assert p.max_depth == 8
    packing.validate(p)
    arrays = packing.to_arrays(p)  # a stored max_depth is checked, not derived, when read back
    arrays["statics"] = arrays["statics"] - np.array([0, 0, 0, 1])
    with pytest.raises(ValueError, match="the deepest tile has 8 rows; expected max_depth=7"):
        packing.from_arrays(arrays)
    x = rng.normal(size=(3, 8)).astype(np.float32)
    for backend in BACKENDS:
        np.testing.assert_allclose(ops.tw_matmul(x, p, backend=backend), x @ w, rtol=1e-5, atol=1e-5)
        grad = jax.grad(lambda x: jnp.sum(ops.tw_matmul(x, p, backend=backend)))(x)
        np.testing.assert_allclose(grad, np.tile(w.sum(1), (3, 1)), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not _ffi.cpu_available(), reason="jax_tw._cpu not built")
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512-bf16"])
def test_narrower_isa_variants_match_reference(isa):
    """The host kernel is compiled once per instruction set and the widest the CPU runs is
    chosen; JAX_TW_ISA asks for a narrower one, so every variant this machine can run is
    checked (tests/isa_check.py, in a fresh process: the choice is made at import)."""
    from jax_tw import _cpu
    order = ["generic", "avx2", "avx512", "avx512-bf16", "avx512-amx"]
    if order.index(isa) >= order.index(_cpu.isa()):
        pytest.skip(f"{isa} is not narrower than this machine's {_cpu.isa()} (run by every other test)")
    here = pathlib.Path(__file__).parent
    out = subprocess.run([sys.executable, str(here / "isa_check.py")], capture_output=True, text=True,
                         env=subprocess_env(JAX_TW_ISA=isa))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == isa


@pytest.mark.skipif(not _ffi.cpu_available(), reason="jax_tw._cpu not built")
def test_host_target_v1_still_answers():
    """Modules exported before v2 call jax_tw_tw_matmul_cpu_v1 (no bias, f32 result): it stays
    registered and computes the same product, residue included."""
    _, _, p = _layer(24, 40, 8, 0.6, pattern=patterns.TEW(residue=0.1))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(37, 24)), jnp.float32)
    operands = [x] + [jnp.asarray(a) for a in (p.columns, p.row_offsets, p.rows, p.values,
                                                p.residue_rows, p.residue_cols, p.residue_values)]
    y = jax.ffi.ffi_call(_ffi.CPU_TARGET_V1, jax.ShapeDtypeStruct((37, 40), jnp.float32))(
        *operands, n=np.int64(40), tile_size=np.int64(8))
    np.testing.assert_allclose(np.asarray(y, np.float64), _reference(x, packing.unpack(p)), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="must be float32"):
        jax.block_until_ready(jax.ffi.ffi_call(_ffi.CPU_TARGET_V1, jax.ShapeDtypeStruct((37, 40), jnp.bfloat16))(
            *operands, n=np.int64(40), tile_size=np.int64(8)))


@pytest.mark.skipif(not _ffi.cpu_available(), reason="jax_tw._cpu not built")
def test_host_target_v2_still_answers():
    """Modules exported before v3 call jax_tw_tw_matmul_cpu_v2 (bias, no activation attribute):
    it stays registered and computes x @ W + bias."""
    _, _, p = _layer(24, 40, 8, 0.6, pattern=patterns.TEW(residue=0.1))
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(37, 24)), jnp.float32)
    bias = rng.normal(size=40).astype(np.float32)
    operands = [x] + [jnp.asarray(a) for a in (p.columns, p.row_offsets, p.rows, p.values,
                                                p.residue_rows, p.residue_cols, p.residue_values, bias)]
    y = jax.ffi.ffi_call(_ffi.CPU_TARGET_V2, jax.ShapeDtypeStruct((37, 40), jnp.float32))(
        *operands, n=np.int64(40), tile_size=np.int64(8))
    np.testing.assert_allclose(np.asarray(y, np.float64), _reference(x, packing.unpack(p)) + bias,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="activation must be 0"):
        jax.block_until_ready(jax.ffi.ffi_call(_ffi.CPU_TARGET, jax.ShapeDtypeStruct((37, 40), jnp.float32))(
            *operands, n=np.int64(40), tile_size=np.int64(8), activation=np.int64(7)))


@pytest.mark.skipif(not _ffi.cpu_available(), reason="jax_tw._cpu not built")
def test_host_kernel_refuses_corrupt_tiles_on_its_own():
    """Inside jit the Python checks cannot see the data: the C++ handler checks every index."""
    _, _, p = _layer(24, 40, 8, 0.6, pattern=patterns.TEW(residue=0.1))
    assert len(p.residue_rows) > 2
    f = jax.jit(lambda x, p: _ffi.cpu_tw_matmul(x, p, None, jnp.float32))
    x = jnp.ones((3, 24), jnp.float32)
    # The residue in (row, column) order, as tiles saved by earlier versions held it.
    order = np.lexsort((p.residue_cols, p.residue_rows))
    by_rows = dataclasses.replace(p, residue_rows=p.residue_rows[order], residue_cols=p.residue_cols[order],
                                  residue_values=p.residue_values[order])
    for bad, match in [(dataclasses.replace(p, rows=p.rows + 1000), r"row index out of \[0, k\)"),
                       (dataclasses.replace(p, columns=p.columns + 1000), r"column index out of \[0, n\)"),
                       (dataclasses.replace(p, row_offsets=p.row_offsets * 2), "row_offsets must run"),
                       (by_rows, r"residue is not sorted by \(column, row\)")]:
        with pytest.raises(Exception, match=match):
            jax.block_until_ready(f(x, bad))


# ----------------------------------------------------------------------------- forward

SHAPES = [  # (lead dims of x, K, N, G, sparsity, empty tiles)
    ((1,), 24, 40, 8, 0.6, False),  # M = 1
    ((7,), 13, 29, 4, 0.5, False),  # N not a multiple of G
    ((2, 3), 32, 20, 8, 0.75, True),  # leading batch dims, tiles with no kept rows
    ((200,), 48, 64, 16, 0.3, False),  # more than one block of rows
    ((5,), 16, 24, 128, 0.5, False),  # G > N: one narrow tile
    ((300,), 600, 150, 64, 0.3, False),  # tiles deeper than the host kernel's K block (256)
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,k,n,g,s,empty", SHAPES)
def test_forward_matches_float64_reference(backend, lead, k, n, g, s, empty):
    w, mask, p = _layer(k, n, g, s, empty_tiles=empty, seed=k + n)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(*lead, k)).astype(np.float32)
    bias = rng.normal(size=(n,)).astype(np.float32)
    y = jax.jit(lambda x, p, b: ops.tw_matmul(x, p, b, backend=backend))(x, p, bias)
    assert y.shape == (*lead, n) and y.dtype == jnp.float32
    want = _reference(x, packing.unpack(p), bias)
    # f32 rounding grows with the depth of the sums (XLA's own dot needs the same slack at K = 600).
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-5, atol=max(1e-5, 2e-7 * k))


ACTIVATION_CASES = [  # (M, K, N, G, sparsity, pattern, empty tiles)
    (1, 24, 40, 8, 0.6, patterns.TW2D(), False),  # M = 1 (few rows)
    (7, 13, 29, 4, 0.5, patterns.TEW(residue=0.1), False),  # N not a multiple of G, a residue
    (200, 48, 70, 16, 0.5, patterns.TW2D(), True),  # tiles with no kept rows
    (300, 100, 90, 32, 0.5, patterns.TEW(residue=0.05), False),  # residue on many rows
    (1100, 64, 1000, 64, 0.75, patterns.TW2D(), False),  # y above 4 MiB: streamed f32 stores
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
@pytest.mark.parametrize("m,k,n,g,s,pattern,empty", ACTIVATION_CASES)
def test_activation_matches_float64_reference(backend, activation, dtype, m, k, n, g, s, pattern, empty):
    """tw_matmul(..., activation=a) is a(x @ W + bias) on every backend (fused into the host
    kernel's epilogue, in every one of its paths: few rows, tiles, residue, spans without a
    kept row, streamed stores, bf16 output), within float32 (or one bf16 rounding) of float64."""
    if backend == "pallas" and m > 300:
        pytest.skip("Pallas interpret mode is slow")
    _, _, p = _layer(k, n, g, s, dtype, seed=k + n, pattern=pattern, empty_tiles=empty)
    rng = np.random.default_rng(m)
    x = rng.normal(size=(m, k)).astype(dtype)
    bias = rng.normal(size=(n,)).astype(np.float32)
    y = jax.jit(lambda x, p, b: ops.tw_matmul(x, p, b, backend=backend, activation=activation))(x, p, bias)
    assert y.shape == (m, n) and y.dtype == np.dtype(dtype)
    want = activate64(_reference(x, packing.unpack(p)) + bias, activation)
    assert (want != 0).mean() > 0.3 and (want < 0).any() == (activation == "gelu")
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,k", [(1, 96), (5, 96), (40, 96), (300, 96), (300, 1000)])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_nonfinite_x_reaches_only_kept_weights(backend, m, k, dtype):
    """Pruned weights are absent, not zeros (tw_matmul's docstring): a NaN or infinity in x
    reaches exactly the outputs of its row whose kept weights (tiles or residue) read its K
    index, and no other row; the dense dot spreads it over the whole row (0 * NaN = NaN). K
    index 0 is where the XLA path pads shallow tiles; K = 1000 runs the host kernel in K blocks;
    the bad rows are the first, a middle and the last (the few-rows path up to M = 32, then
    the first and last work items, and a partial panel)."""
    if backend == "pallas" and m > 40:
        pytest.skip("Pallas interpret mode is slow")
    n = 70
    _, _, p = _layer(k, n, 16, 0.6, dtype, seed=3, pattern=patterns.TEW(residue=0.05))
    kept = packing.unpack(p) != 0  # values are never zero
    some = np.flatnonzero((kept.sum(1) > 0) & (kept.sum(1) < n))  # K indices some columns read
    assert some[0] == 0 and len(some) > 3
    rng = np.random.default_rng(m)
    x = rng.normal(size=(m, k)).astype(dtype)
    bad = {}  # row -> its non-finite K index
    for i, (row, value) in enumerate(zip([0, m // 2, m - 1], [np.nan, np.inf, -np.inf])):
        if row not in bad:
            bad[row] = q = int(some[i * len(some) // 3])
            x[row, q] = value
    y = np.asarray(jax.jit(lambda x, p: ops.tw_matmul(x, p, backend=backend))(x, p), np.float64)
    for row in range(m):
        reached = ~np.isfinite(y[row])
        if row not in bad:
            assert not reached.any(), row
        elif backend == "dense":
            assert reached.all(), row
        else:
            np.testing.assert_array_equal(reached, kept[bad[row]], err_msg=f"row {row}")
    finite = [r for r in range(m) if r not in bad]
    if finite:
        want = _reference(x[finite], packing.unpack(p))
        tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
        np.testing.assert_allclose(y[finite], want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_activation_gradients_match_the_unfused_product(backend, activation):
    """Gradients through a fused activation (to x, the packed values and the bias) equal those
    of activate(x @ W + b) written out in jnp."""
    _, _, p = _layer(24, 40, 8, 0.5, pattern=patterns.TEW(residue=0.1))
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(9, 24)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=40), jnp.float32)
    fused = lambda x, v, b: jnp.sum(jnp.sin(ops.tw_matmul(
        x, dataclasses.replace(p, values=v), b, backend=backend, activation=activation)))
    plain = lambda x, v, b: jnp.sum(jnp.sin(ops.activate(
        x @ ops._dense_kernel(dataclasses.replace(p, values=v)) + b, activation)))
    got = jax.grad(fused, argnums=(0, 1, 2))(x, jnp.asarray(p.values), bias)
    want = jax.grad(plain, argnums=(0, 1, 2))(x, jnp.asarray(p.values), bias)
    for g, w in zip(got, want):
        assert float(jnp.abs(w).max()) > 0
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_activation_gradients_of_gradients_and_values_under_vjp(backend, activation):
    """Through a fused activation, gradients of gradients (a Hessian-vector product) equal
    those of the unfused product, and the value tw_matmul returns under jax.vjp is rounded to
    bf16 once, as the plain call is: within half a bf16 step of float64 (the activation's own
    error aside)."""
    _, _, p = _layer(24, 40, 8, 0.5, pattern=patterns.TEW(residue=0.1))
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(9, 24)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=40), jnp.float32)
    w = ops._dense_kernel(p)
    fused = lambda x: jnp.sum(jnp.sin(ops.tw_matmul(x, p, bias, backend=backend, activation=activation)))
    plain = lambda x: jnp.sum(jnp.sin(ops.activate(
        jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST) + bias, activation)))
    hvp = lambda f: jax.grad(lambda x: jnp.sum(jax.grad(f)(x) ** 2))(x)
    got, want = hvp(fused), hvp(plain)
    assert float(jnp.abs(want).max()) > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))

    _, _, p = _layer(64, 64, 8, 0.25, dtype=jnp.bfloat16, pattern=patterns.TEW(residue=0.05))
    x = jnp.asarray(rng.normal(size=(128, 64)), jnp.bfloat16)
    bias = jnp.asarray(rng.normal(size=64), jnp.float32)
    want = activate64(_reference(x, packing.unpack(p)) + np.asarray(bias, np.float64), activation)
    half_step = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(want), 1e-30))) - 8)
    call = lambda x: ops.tw_matmul(x, p, bias, backend=backend, activation=activation)
    for y in (jax.jit(call)(x), jax.jit(lambda x: jax.vjp(call, x)[0])(x)):
        assert y.dtype == jnp.bfloat16
        err = np.abs(np.asarray(y, np.float64) - want)
        assert (err <= half_step * (1 + 1e-3) + 1e-5 * np.abs(want) + 1e-6).all(), float((err / half_step).max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_preferred_element_type_float32_is_not_rounded_to_bf16(backend, activation):
    """bf16 x and tiles with preferred_element_type=float32: the float32 sums, rounded once to
    float32 (within float32 of float64), not to bf16 first; also under jax.grad."""
    _, _, p = _layer(64, 40, 8, 0.5, dtype=jnp.bfloat16, pattern=patterns.TEW(residue=0.05))
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(33, 64)), jnp.bfloat16)
    bias = jnp.asarray(rng.normal(size=40), jnp.float32)
    call = lambda x: ops.tw_matmul(x, p, bias, backend=backend, activation=activation,
                                   preferred_element_type=jnp.float32)
    want = activate64(_reference(x, packing.unpack(p)) + np.asarray(bias, np.float64), activation)
    y, vjp = jax.vjp(call, x)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(np.asarray(jax.jit(call)(x)), np.asarray(y), rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert vjp(jnp.ones_like(y))[0].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"preferred_element_type must be None, x's dtype \(bfloat16\) or float32, got 'float16'"):
        ops.tw_matmul(x, p, preferred_element_type="float16")


def test_activation_must_be_a_known_name():
    _, _, p = _layer(24, 40, 8, 0.5)
    for bad in ("tanh", "GELU", 1, jax.nn.relu):
        with pytest.raises(ValueError, match=r"activation must be one of \[None, 'relu', 'gelu'\], got"):
            ops.tw_matmul(np.ones((2, 24), np.float32), p, activation=bad)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the host custom call is not built")
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_host_deep_layer_in_k_blocks(dtype):
    """K above 768: the host kernel packs x and runs the tiles one K block at a time (here three
    of 567, 567 and 566 columns) and writes the spans after the last block. Tile 1 keeps rows in
    the last block only, tile 2 in the first only, tile 3 none; there is a residue and a bias."""
    k, n, g, m = 1700, 70, 16, 100
    rng = np.random.default_rng(12)
    w = rng.normal(size=(k, n)).astype(np.float32)
    tiles = -(-n // g)
    rows = rng.random((tiles, k)) < 0.3
    rows[1, :1134] = False
    rows[2, 567:] = False
    rows[3] = False
    columns = np.ones(n, bool)
    elements = np.zeros((k, n), bool)
    elements[rng.integers(0, k, 300), rng.integers(0, n, 300)] = True
    mask = {"columns": columns, "rows": rows, "elements": elements}
    p = packing.pack(w.astype(dtype), mask, g, keep_dense=False)
    assert np.shape(p.residue_rows)[0] > 0
    x = rng.normal(size=(m, k)).astype(dtype)
    bias = rng.normal(size=n).astype(np.float32)
    y = np.asarray(ops.tw_matmul(x, p, bias, backend="cpu"), np.float64)
    want = _reference(np.asarray(x, np.float32), np.asarray(packing.unpack(p), np.float32), bias)
    tol = 2e-7 * k if dtype == np.float32 else 3e-2 * np.abs(want).max()
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", [patterns.TEW(residue=0.05), patterns.EW()])
def test_forward_with_residue(backend, pattern):
    w, mask, p = _layer(40, 48, 8, 0.7, pattern=pattern)
    assert np.shape(p.residue_rows)[0] > 0
    x = np.random.default_rng(2).normal(size=(9, 40)).astype(np.float32)
    y = ops.tw_matmul(x, p, backend=backend)
    np.testing.assert_allclose(np.asarray(y, np.float64), _reference(x, packing.unpack(p)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the host custom call is not built")
@pytest.mark.parametrize("m", [1, 3, 8, 30, 49, 70, 97, 500, 1100, 2048, 2100, 3000])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_host_residue_covers_every_row_block(m, dtype):
    """The host kernel's residue covers a work item's rows in walks of up to 15 vectors, of
    equal width, and cuts items of a layer with a residue that are slightly longer than one walk
    to one walk (120 rows on AVX2). On AVX2 these give items of 24, 72, 120 and 192 rows (one
    walk, one, one of 15 vectors, two of 12). With at least two items per thread the rows are
    shared evenly, a panel more or less each, in a whole number of items per thread (M = 500:
    11 items of 48 rows become 12 of 36-48 on AVX-512; M = 2048: 22 of 84-96), so items end
    in partial vectors; with fewer, each M's last item is shorter, its last vector
    partial. M = 1, 3, 8 and 30 take the few-rows path: x transposed once per call, each item's
    walk starting at its first row (up to 4 and 8 rows, walks of 4 and 8 floats per weight).
    M = 49 and 97 end in an item of one row (items of 48 rows on
    AVX-512, 24 on AVX2, 96 for bf16 in pairs), whose residue, like M = 1's, gathers x at the
    weights' K indices (WalkOne) from the item's padded transpose. Against a float64 reference."""
    rng = np.random.default_rng(13)
    _, _, p = _layer(40, 56, 8, 0.7, dtype, pattern=patterns.TEW(residue=0.08))
    assert np.shape(p.residue_rows)[0] > 0
    x = rng.normal(size=(m, 40)).astype(dtype)
    bias = rng.normal(size=56).astype(np.float32)
    y = np.asarray(jax.jit(lambda x, p, b: ops.tw_matmul(x, p, b, backend="cpu"))(x, p, bias), np.float64)
    want = _reference(np.asarray(x, np.float32), np.asarray(packing.unpack(p), np.float32), bias)
    tol = 1e-5 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(y, want, rtol=tol, atol=tol)


@pytest.fixture
def poisoned(monkeypatch):
    """The kernels' test hook on: they fill their output with NaN before they run. The host
    kernel reads JAX_TW_POISON_OUTPUT on every call; the CUDA module at import, or when told."""
    monkeypatch.setenv("JAX_TW_POISON_OUTPUT", "1")
    if _ffi.cuda_available():
        _ffi._cuda.set_poison_output(True)
    yield
    if _ffi.cuda_available():
        _ffi._cuda.set_poison_output(False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [3, 40])  # the few-rows path and the blocked path
@pytest.mark.parametrize("columns", [False, True])  # no tiles; tiles that all lost every row
def test_fully_pruned_layer_gives_bias(backend, m, columns, poisoned):
    w = np.ones((6, 10), np.float32)
    mask = {"columns": np.full(10, columns), "rows": np.zeros((3, 6), bool), "elements": np.zeros((6, 10), bool)}
    p = packing.pack(w, mask, 4)
    assert p.max_depth == 0 and p.num_tiles == (3 if columns else 0)
    bias = np.arange(10, dtype=np.float32)
    y = ops.tw_matmul(np.ones((m, 6), np.float32), p, bias, backend=backend)
    np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(bias, (m, 10)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [3, 33, 200])  # the few-rows path and the blocked path
def test_bf16_error_within_xla_bf16_error(backend, m):
    """bf16 in, f32 accumulation: the error against an f32 reference of the same bf16 inputs
    may be at most a small multiple of XLA's own bf16 dot error."""
    w, mask, p = _layer(64, 96, 16, 0.5, dtype=jnp.bfloat16, seed=3)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(m, 64)), jnp.bfloat16)
    wm = jnp.asarray(packing.unpack(p))
    ref = np.asarray(x, np.float64) @ np.asarray(wm, np.float64)
    y = ops.tw_matmul(x, p, backend=backend)
    assert y.dtype == jnp.bfloat16
    xla_err = np.abs(np.asarray(jnp.dot(x, wm), np.float64) - ref).max()
    err = np.abs(np.asarray(y, np.float64) - ref).max()
    assert err <= 2 * xla_err + 1e-6, (err, xla_err)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the host custom call is not built")
@pytest.mark.parametrize("m", [7, 200])  # the few-rows path and the blocked path
def test_host_bf16_output_is_its_f32_output_rounded_as_xla(m):
    """The host kernel writes a bf16 y by rounding its f32 sums to nearest even (vectorised on
    AVX-512; vcvtneps2bf16 would not do: it flushes denormals): a bf16 call must equal the
    f32-output call of the same operands, converted by XLA, bit for bit, with a bias or without
    (or a denormal one), through a tile's span or the residue's, and with NaN and infinities in
    x."""
    rng = np.random.default_rng(13)
    for pattern in (patterns.TW2D(), patterns.TEW(residue=0.1)):
        _, _, p = _layer(48, 70, 16, 0.5, dtype=jnp.bfloat16, pattern=pattern, empty_tiles=True, seed=m)
        x = (rng.normal(size=(m, 48)) * 1e3).astype(jnp.bfloat16)
        kept = np.asarray(p.rows)  # K indices some tile reads
        x[0, kept[0]], x[-1, kept[-1]] = np.nan, np.inf
        # The last bias is denormal: the columns no tile writes keep it, and bf16 has denormals.
        for bias in (None, rng.normal(size=70).astype(np.float32), (rng.normal(size=70) * 1e-39).astype(np.float32)):
            b = None if bias is None else jnp.asarray(bias)
            y16 = np.asarray(_ffi.cpu_tw_matmul(jnp.asarray(x), p, b, jnp.bfloat16))
            y32 = _ffi.cpu_tw_matmul(jnp.asarray(x), p, b, jnp.float32)
            assert y16.dtype == jnp.bfloat16 and np.isnan(np.asarray(y32)).any()
            np.testing.assert_array_equal(y16.view(np.uint16),
                                          np.asarray(y32.astype(jnp.bfloat16)).view(np.uint16),
                                          err_msg=f"{pattern} bias={bias is not None}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "cuda")] or ["cpu"])
@pytest.mark.parametrize("m", [1, 7, 200])  # the few-rows path and the blocked path
def test_poisoned_output_is_fully_written(backend, m, poisoned):
    """The kernels fill their output with NaN first (test hook): every entry must be
    overwritten, including pruned columns and tiles with no kept rows. The EW layer (no tiles)
    is wider than the host kernel's 256-column spans of such layers, its last span partial."""
    if backend not in BACKENDS:
        pytest.skip(f"no {backend} custom call runs here")
    rng = np.random.default_rng(5)
    for pattern, n in ((patterns.TW2D(), 50), (patterns.TEW(residue=0.05), 50), (patterns.EW(), 600)):
        for dtype, bias in [(np.float32, None), (jnp.bfloat16, rng.normal(size=n).astype(np.float32))]:
            _, _, p = _layer(32, n, 8, 0.8, dtype, empty_tiles=True, pattern=pattern)
            assert len(p.columns) < n  # some columns pruned
            x = rng.normal(size=(m, 32)).astype(dtype)
            y = np.asarray(ops.tw_matmul(x, p, bias, backend=backend), np.float64)
            assert np.isfinite(y).all()
            want = _reference(np.asarray(x, np.float32), np.asarray(packing.unpack(p), np.float32), bias)
            tol = 1e-5 if dtype == np.float32 else 2e-2
            np.testing.assert_allclose(y, want, rtol=tol, atol=tol)


@pytest.mark.skipif(not _ffi.cpu_available(), reason="jax_tw._cpu not built")
def test_large_f32_output_is_fully_written(poisoned):
    """f32 outputs of 4 MB and more are written with non-temporal stores in 64-byte lines, the
    span's edges with masked or plain stores. N = 1000 puts every row of y at a different offset
    in its lines; every entry must be written once, with the bias, the pruned columns and the
    residue."""
    rng = np.random.default_rng(11)
    m, k, n = 1100, 24, 1000
    assert m * n * 4 >= 4 << 20
    for pattern in (patterns.TW2D(), patterns.TEW(residue=0.05)):
        for g in (16, 128):
            _, _, p = _layer(k, n, g, 0.7, pattern=pattern, empty_tiles=True, seed=g)
            x = rng.normal(size=(m, k)).astype(np.float32)
            for bias in (None, rng.normal(size=n).astype(np.float32)):
                y = np.asarray(ops.tw_matmul(x, p, bias, backend="cpu"), np.float64)
                assert np.isfinite(y).all()
                want = _reference(x, np.asarray(packing.unpack(p), np.float32), bias)
                np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5, err_msg=f"{pattern} G={g}")


def _check_host(p, m, seed, atol_bf16=1e-4):
    """The host call on a random x (M rows, the tiles' dtype) and bias against the float64
    reference. A bf16 result is one rounding of an f32 sum (2^-9 relative)."""
    k, n = p.k, p.n
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, k)).astype(p.dtype)
    bias = rng.normal(size=n).astype(np.float32)
    y = np.asarray(ops.tw_matmul(x, p, bias, backend="cpu"), np.float64)
    want = _reference(x, np.asarray(packing.unpack(p), np.float32), bias)
    if p.dtype == np.float32:
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=2e-7 * k)
    else:
        np.testing.assert_allclose(y, want, rtol=2.0 ** -8, atol=atol_bf16)


def _l1_dcache_ways():
    """The L1 data cache's ways as libc reports them (getconf: Python before 3.12 has no
    os.sysconf name for it), 8 where it does not say or its size is not whole sets of 64-byte
    lines, as the host kernel takes it."""
    def conf(name):
        try:
            out = subprocess.run(["getconf", name], capture_output=True, text=True, check=True).stdout
            return int(out.strip())
        except (OSError, ValueError, subprocess.CalledProcessError):
            return 0
    size, ways = conf("LEVEL1_DCACHE_SIZE"), conf("LEVEL1_DCACHE_ASSOC")
    return ways if size > 0 and ways > 0 and size % (ways * 64) == 0 else 8


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the host custom call is not built")
@pytest.mark.parametrize("k", [200, 1000, 1024])
@pytest.mark.parametrize("per_k", [0.3, 3.0])
@pytest.mark.parametrize("pattern", [patterns.TW2D(), patterns.TEW(residue=0.05)])
def test_host_f32_x_read_in_place_or_packed(k, per_k, pattern):
    """f32 layers with few kept tile weights per column of x (below _cpu.DIRECT_WEIGHTS_PER_K)
    are computed from x's rows in place (and a residue from x transposed straight from them),
    others from packed panels: both against the reference, with M = 100 (a last panel of 4
    rows, always packed), K in one K block and in two, tiles with no kept rows. At K = 1024
    a micro-kernel's 12 rows of x all fall in one set of the L1 data cache: read in place
    only where it has at least 12 ways."""
    from jax_tw import _cpu
    n, g, m = int(per_k * _cpu.DIRECT_WEIGHTS_PER_K / 0.45) + 5, 32, 100
    _, _, p = _layer(k, n, g, 0.4, pattern=pattern, empty_tiles=True, seed=k)
    kept = round(p.density() * k * n) - np.shape(p.residue_rows)[0]  # tile weights
    assert (kept <= _cpu.DIRECT_WEIGHTS_PER_K * k) == (per_k < 1)
    in_place = per_k < 1 and (k != 1024 or _l1_dcache_ways() >= 12)
    assert _cpu.x_in_place(k, kept) == in_place
    _check_host(p, m, seed=k)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the host custom call is not built")
@pytest.mark.parametrize("g", [32, 48, 128])
@pytest.mark.parametrize("n_tiles", [3, 12])
def test_host_f32_weights_read_in_place_or_copied(g, n_tiles):
    """f32 tile weights are read in place from the packed values where whole micro-panels fit a
    row of G (G a multiple of the micro-tile width: 32 and 128 on AVX-512, 48 too on AVX2),
    else from a per-call copy: both against the reference, with a partial last tile, tiles
    with no kept rows, K = 1700 in three K blocks, and x read in place (all but one case) or
    packed (G = 128 with 12 tiles: more than _cpu.DIRECT_WEIGHTS_PER_K kept weights per K)."""
    k, n = 1700, n_tiles * g + g // 2 + 3
    _, _, p = _layer(k, n, g, 0.5, empty_tiles=True, seed=g + n_tiles)
    _check_host(p, 100, seed=g)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the host custom call is not built")
@pytest.mark.parametrize("g", [32, 48, 128])
@pytest.mark.parametrize("m", [1, 12, 13, 20, 32])
@pytest.mark.parametrize("pattern", [patterns.TW2D(), patterns.TEW(residue=0.05)])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_host_few_rows_weights_in_place_or_copied(g, m, pattern, dtype):
    """Calls with few rows (M <= 32) read the tile weights in place (bf16 widened as they are
    loaded; G a multiple of the micro-tile width, and for bf16 at most 12 rows per work item:
    TW-2D splits M into such groups, as f32 without a residue does on AVX-512), or from an f32
    copy (G = 48 on AVX-512, or bf16 items of more than 12 rows: with a residue, groups of rows
    are at least a vector, 13 rows at M = 13). With a residue from M = 20 on, bf16 on CPUs with
    AVX512-BF16 or AMX takes the blocked path instead, its rows padded to 32. All against the
    float64 reference, with a partial last tile and tiles with no kept rows."""
    n = 12 * g + g // 2 + 3
    _, _, p = _layer(300, n, g, 0.5, dtype, empty_tiles=True, seed=g + m, pattern=pattern)
    _check_host(p, m, seed=m)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the host custom call is not built")
@pytest.mark.parametrize("g", [128, 160, 256])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("pattern", [patterns.TW2D(), patterns.TEW(residue=0.05)])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_host_few_rows_in_wide_strips(g, m, pattern, dtype):
    """Work items of up to 3 rows (AVX-512; AVX2: 1) with the weights in place read each tile in
    strips of 8 vectors (128 f32 columns; AVX2: 64), the rest of its padded width in micro-panels:
    G = 128 one strip, 160 a strip and a micro-panel, 256 two strips; the last tile partial
    (width 131: a strip and micro-panels), tiles with no kept rows. 13 tiles: each item has all M
    rows. Against the float64 reference."""
    n = 12 * g + 131
    _, _, p = _layer(300, n, g, 0.5, dtype, empty_tiles=True, seed=g + m, pattern=pattern)
    _check_host(p, m, seed=m)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the host custom call is not built")
@pytest.mark.parametrize("g", [32, 48, 128])
@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("residue", [0.0, 0.05])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_host_few_rows_few_tiles(g, m, residue, dtype):
    """Calls with few rows on layers of 1-3 tiles (fewer work items than threads, or one more):
    tiles with 1 kept row, none, 7, 150 and all 300, a partial last tile, weights read in place
    (G = 32, 128) or copied (G = 48 on AVX-512), an element-wise residue, f32 and bf16. Against
    the float64 reference."""
    k = 300
    rng = np.random.default_rng(g + m)
    for depths in [(1,), (0, 7), (300, 150, 2)]:
        n = len(depths) * g - g // 3
        w = rng.normal(size=(k, n)).astype(dtype)
        rows = np.zeros((len(depths), k), bool)
        for t, depth in enumerate(depths):
            rows[t, rng.choice(k, depth, replace=False)] = True
        mask = {"columns": np.ones(n, bool), "rows": rows, "elements": rng.random((k, n)) < residue}
        p = packing.pack(w, mask, g, keep_dense=False)
        assert np.diff(np.asarray(p.row_offsets)).tolist() == list(depths)
        _check_host(p, m, seed=m + len(depths))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the host custom call is not built")
@pytest.mark.parametrize("g", [32, 48, 128])
@pytest.mark.parametrize("m", [40, 300])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_host_weights_copied_per_item_or_per_call(g, m, dtype):
    """Calls with more than 32 rows copy the tile weights into the layout their GEMM reads
    (bf16 on every CPU; f32 where G is not a multiple of the micro-tile width): each work item
    its own tiles when the call has one block of rows (M = 40), else once for the call
    (M = 300): against the float64 reference, with K = 1700 in three K blocks, a partial last
    tile and tiles with no kept rows."""
    _, _, p = _layer(1700, 12 * g + g // 2 + 3, g, 0.5, dtype, empty_tiles=True, seed=g + m)
    _check_host(p, m, seed=m, atol_bf16=1e-3)


# ----------------------------------------------------------------------------- transforms

@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_match_dense_reference_and_check_grads(backend):
    w, mask, p = _layer(12, 20, 4, 0.5, pattern=patterns.TEW(residue=0.05), seed=6)
    # The loss swaps in new values: drop any dense cache packing kept (it does when the residue
    # makes the layer cost more than DENSE_ABOVE), or the 'dense' backend would read a stale cache.
    p = jax.device_put(dataclasses.replace(p, dense=None))
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(5, 12)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(20,)), jnp.float32)

    def loss(x, values, residue_values, bias):
        q = dataclasses.replace(p, values=values, residue_values=residue_values)
        return jnp.sum(jnp.sin(ops.tw_matmul(x, q, bias, backend=backend)))

    gx, gv, gr, gb = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, p.values, p.residue_values, bias)
    dense = jnp.asarray(packing.unpack(p))
    gx_ref, gw_ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w + bias)), argnums=(0, 1))(x, dense)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)
    # d(values) equals the dense gradient at the kept positions.
    gpacked = packing.pack(np.asarray(gw_ref), mask, 4)
    widths = [min(4, len(p.columns) - 4 * t) for t in range(p.num_tiles)]
    for t, wdt in enumerate(widths):
        sl = slice(p.row_offsets[t], p.row_offsets[t + 1])
        np.testing.assert_allclose(np.asarray(gv)[sl, :wdt], gpacked.values[sl, :wdt], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gr, gpacked.residue_values, rtol=1e-5, atol=1e-5)
    check_grads(lambda x, v: loss(x, v, p.residue_values, bias), (x, p.values), order=1,
                modes=["rev"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_scan_remat(backend):
    _, _, p = _layer(16, 24, 8, 0.5, seed=8)
    p = jax.device_put(p)
    xs = jnp.asarray(np.random.default_rng(9).normal(size=(3, 4, 16)), jnp.float32)
    want = _reference(np.asarray(xs), packing.unpack(p))
    f = lambda x: ops.tw_matmul(x, p, backend=backend)
    np.testing.assert_allclose(jax.jit(jax.vmap(f))(xs), want, rtol=1e-5, atol=1e-5)
    _, ys = jax.lax.scan(lambda c, x: (c, f(x)), 0.0, xs)
    np.testing.assert_allclose(ys, want, rtol=1e-5, atol=1e-5)
    # Against an independent reference: the gradient of sum((x @ W)^2) is 2 (x @ W) @ W^T.
    w = packing.unpack(p).astype(np.float64)
    g_ref = 2 * (np.asarray(xs, np.float64) @ w) @ w.T
    for g in (jax.grad(lambda x: jnp.sum(jax.remat(f)(x) ** 2))(xs),
              jax.jit(jax.grad(lambda x: jnp.sum(jax.vmap(jax.remat(f))(x) ** 2)))(xs)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not _ffi.cpu_available(), reason="jax_tw._cpu not built")
def test_vmap_folds_batch_into_rows_one_call():
    """vmap (nested too) over x with unbatched tiles is one custom call on M = B * rows, no
    loop; tiles batched along with x run one call per element and stay correct."""
    _, _, p = _layer(16, 24, 8, 0.5, seed=8)
    rng = np.random.default_rng(3)
    xs = jnp.asarray(rng.normal(size=(2, 3, 4, 16)), jnp.float32)
    f = jax.jit(jax.vmap(jax.vmap(lambda x: ops.tw_matmul(x, p, backend="cpu"))))
    hlo = f.lower(xs).as_text()
    assert hlo.count(f"custom_call @{_ffi.CPU_TARGET}") == 1 and "stablehlo.while" not in hlo, hlo
    np.testing.assert_allclose(f(xs), _reference(np.asarray(xs), packing.unpack(p)), rtol=1e-5, atol=1e-5)
    if _ffi.cuda_available():  # the CUDA call folds the same way (lowered only: no GPU here)
        g = jax.jit(jax.vmap(jax.vmap(lambda x: ops.tw_matmul(x, p, backend="cuda"))))
        hlo = g.trace(xs).lower(lowering_platforms=("cuda",)).as_text()
        assert hlo.count(f"custom_call @{_ffi.CUDA_TARGET}") == 1 and "stablehlo.while" not in hlo
    ps = jax.tree.map(lambda a: np.stack([a, a]), p)
    scaled = dataclasses.replace(ps, values=ps.values * np.array([1.0, -2.0], np.float32)[:, None, None])
    ys = jax.vmap(lambda x, q: ops.tw_matmul(x, q, backend="cpu"))(xs[:, 0], scaled)
    for i, c in enumerate((1.0, -2.0)):
        np.testing.assert_allclose(ys[i], c * _reference(np.asarray(xs[i, 0]), packing.unpack(p)),
                                   rtol=1e-5, atol=1e-5)


def test_backend_is_chosen_by_the_lowering_platform():
    """Automatic choice per platform at lowering, not from jax.default_backend(): lowered for
    CUDA the call is the CUDA kernel (or the reference path where it was not built), for CPU
    the host kernel; lowered for both, both are in the module."""
    _, _, p = _layer(16, 24, 8, 0.75)  # sparse enough for the tiles on both (FALLBACK_RULES)
    assert p.dense_on == ()
    x = np.ones((2, 16), np.float32)
    lower = lambda *platforms: jax.jit(lambda x: ops.tw_matmul(x, p)).trace(x).lower(
        lowering_platforms=platforms).as_text()
    cpu, cuda, both = lower("cpu"), lower("cuda"), lower("cpu", "cuda")
    assert (_ffi.CPU_TARGET in cpu) == _ffi.cpu_available() and _ffi.CUDA_TARGET not in cpu
    assert (_ffi.CUDA_TARGET in cuda) == _ffi.cuda_available() and _ffi.CPU_TARGET not in cuda
    assert (_ffi.CPU_TARGET in both) == _ffi.cpu_available()
    assert (_ffi.CUDA_TARGET in both) == _ffi.cuda_available()
    # The dense fallback on every platform (as tiles packed before the rules were per platform,
    # dense_on=None, and pack(keep_dense=True) have it): no custom call at all.
    for dense_on in (None, ("cpu", "cuda")):
        dense = dataclasses.replace(p, dense=packing.unpack(p), dense_on=dense_on)
        hlo = jax.jit(lambda x: ops.tw_matmul(x, dense)).trace(x).lower(lowering_platforms=("cpu", "cuda")).as_text()
        assert _ffi.CPU_TARGET not in hlo and _ffi.CUDA_TARGET not in hlo


def test_training_through_the_dense_fallback_is_refused():
    """A layer whose forward reads the dense cache cannot learn through values: refused with a
    clear error; gradients to x alone stay correct; without the cache the weights learn."""
    w, mask, p = _layer(16, 24, 8, 0.1, seed=2)
    assert p.dense is not None  # 10% sparsity: packing kept the dense kernel
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 16)), jnp.float32)
    loss = lambda x, q: jnp.sum(ops.tw_matmul(x, q) ** 2)
    with pytest.raises(ValueError, match="keep a dense copy of the kernel.*keep_dense=False"):
        jax.grad(loss, argnums=1, allow_int=True)(x, p)
    with pytest.raises(ValueError, match="keep a dense copy"):
        jax.grad(lambda v: loss(x, dataclasses.replace(p, values=v)))(p.values)
    wd = packing.unpack(p).astype(np.float64)
    gx = jax.grad(loss)(x, p)
    np.testing.assert_allclose(gx, 2 * (np.asarray(x, np.float64) @ wd) @ wd.T, rtol=1e-4, atol=1e-4)
    q = packing.pack(w, mask, 8, keep_dense=False)
    gv = jax.grad(lambda v: loss(x, dataclasses.replace(q, values=v)))(q.values)
    assert np.abs(np.asarray(gv)).sum() > 0


def test_export_serialize_and_call_in_a_fresh_process(tmp_path):
    """jax.export of a jitted packed model (CPU and CUDA lowerings), deserialized and called in
    a new process: the same outputs."""
    run_script_stages("export_check.py", ("export", "call"), tmp_path, timeout=300)


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_name_the_problem(monkeypatch):
    _, _, p = _layer(16, 24, 8, 0.5)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., K=16\), got \(2, 15\)"):
        ops.tw_matmul(np.ones((2, 15), np.float32), p)
    with pytest.raises(ValueError, match="x dtype float16 must match the packed values' dtype float32"):
        ops.tw_matmul(np.ones((2, 16), np.float16), p)
    with pytest.raises(ValueError, match=r"bias must be a float array of shape \(24,\), got float32 \(23,\)"):
        ops.tw_matmul(np.ones((2, 16), np.float32), p, np.ones(23, np.float32))
    with pytest.raises(ValueError, match=r"bias must be a float array of shape \(24,\), got complex64 \(24,\)"):
        ops.tw_matmul(np.ones((2, 16), np.float32), p, np.ones(24, np.complex64))
    for name, value in (("k", 16.0), ("n", "24"), ("max_depth", 3.5), ("max_depth", True)):
        with pytest.raises(ValueError, match=f"{name} must be an int, got {value!r}"):
            ops.tw_matmul(np.ones((2, 16), np.float32), dataclasses.replace(p, **{name: value}))
    w, mask, _ = _layer(16, 24, 8, 0.5)
    with pytest.raises(ValueError, match="keep_dense must be None, True or False, got 'no'"):
        packing.pack(w, mask, 8, keep_dense="no")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.tw_matmul(np.ones((2, 16), np.float32), p, backend="tpu")
    with pytest.raises(ValueError, match="packed must be jax_tw.packing.PackedTiles"):
        ops.tw_matmul(np.ones((2, 16), np.float32), {"values": 1})
    monkeypatch.setattr(_ffi, "_cpu", None)
    monkeypatch.setattr(_ffi, "_cpu_error", "jax_tw._cpu failed to import: test")
    with pytest.raises(ValueError, match="built without its CPU extension"):
        ops.tw_matmul(np.ones((2, 16), np.float32), p, backend="cpu")
    monkeypatch.setenv("JAX_TW_BACKEND", "bogus")
    with pytest.raises(ValueError, match="got 'bogus'"):
        ops.tw_matmul(np.ones((2, 16), np.float32), p)


def test_environment_variable_selects_backend(monkeypatch):
    _, _, p = _layer(16, 24, 8, 0.5)
    x = np.ones((2, 16), np.float32)
    monkeypatch.setenv("JAX_TW_BACKEND", "xla")
    hlo = jax.jit(lambda x: ops.tw_matmul(x, p)).lower(x).as_text()
    assert _ffi.CPU_TARGET not in hlo
    if _ffi.cpu_available():
        monkeypatch.setenv("JAX_TW_BACKEND", "cpu")
        hlo = jax.jit(lambda x: ops.tw_matmul(x, p)).lower(x).as_text()
        assert _ffi.CPU_TARGET in hlo


# The subprocess runs on 4 CPU devices whatever this machine has: the CPU platform's backends.
@pytest.mark.parametrize("backend", ["xla", "dense"] + (["cpu"] if _ffi.cpu_available() else []))
def test_shard_map_on_four_cpu_devices(backend):
    """Batch-sharded x, replicated tiles: forward, refusal of a wrong out_specs, and gradients,
    inside shard_map and under jit alone (explicit sharding). In a subprocess: the device count
    is fixed when jax starts."""
    script = pathlib.Path(__file__).with_name("shard_map_check.py")
    done = subprocess.run([sys.executable, str(script), backend], capture_output=True, text=True,
                          timeout=300, env=subprocess_env())
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"shard_map ok {backend}" in done.stdout


def test_dense_fallback_rule(monkeypatch):
    monkeypatch.delenv("JAX_TW_BACKEND", raising=False)
    x = np.random.default_rng(10).normal(size=(4, 32)).astype(np.float32)
    w, mask, _ = _layer(32, 48, 8, 0.1)
    dense_packed = packing.pack(w, mask, 8)  # ~10% sparse: denser than DENSE_ABOVE
    assert dense_packed.density() > packing.DENSE_ABOVE and dense_packed.dense is not None
    np.testing.assert_array_equal(dense_packed.dense, packing.unpack(dense_packed))
    hlo = jax.jit(lambda x: ops.tw_matmul(x, dense_packed)).lower(x).as_text()
    assert _ffi.CPU_TARGET not in hlo and "dot" in hlo
    np.testing.assert_allclose(ops.tw_matmul(x, dense_packed), _reference(x, packing.unpack(dense_packed)),
                               rtol=1e-5, atol=1e-5)
    w, mask, sparse_packed = _layer(32, 48, 8, 0.75)
    assert sparse_packed.dense is None
    if _ffi.cpu_available():
        hlo = jax.jit(lambda x: ops.tw_matmul(x, sparse_packed)).lower(x).as_text()
        assert _ffi.CPU_TARGET in hlo
    assert packing.pack(w, mask, 8, keep_dense=True).dense is not None


def test_bench_quick_prints_ratios(tmp_path, capsys):
    from jax_tw import bench
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    rows = bench.main(["--quick", "--json", str(out_json), "--plot", str(out_png)])
    text = capsys.readouterr().out
    assert "ratio" in text and "of ideal" in text
    assert [r["sparsity"] for r in rows] == [0.0, 0.5, 0.9]
    for r in rows:
        assert r["ratio"] == pytest.approx(r["dense_ms"] / r["tw_ms"])
        assert r["fraction_of_ideal"] == pytest.approx(r["ratio"] * (1 - r["sparsity"]))
        assert abs(r["measured_sparsity"] - r["sparsity"]) < 0.05
    import json
    assert json.loads(out_json.read_text()) == rows
    assert out_png.stat().st_size > 1000


def test_bench_inner_none_makes_every_sample_last_alike(monkeypatch):
    """inner=None queues each call as many times as fill the span (or the slowest call, up to 5
    spans), so a fast call's samples last about as long as a slow one's; the medians stay per
    call. The calls advance a fake clock, so the counts are exact."""
    from jax_tw import bench
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    counts = {}

    def call(name, seconds):
        def f():
            counts[name] = counts.get(name, 0) + 1
            clock[0] += seconds
            return np.float32(seconds)
        return f

    def run(slow_seconds, span, inner):
        counts.clear()
        return bench.time_interleaved([(call("fast", 0.001), ()), (call("slow", slow_seconds), ())],
                                      repeats=3, inner=inner, span=span)

    # 1 warm-up + 3 single calls each, then 3 samples: slow 2 calls each (16 ms), fast 16.
    fast, slow = run(0.008, span=0.016, inner=None)
    assert counts == {"fast": 1 + 3 + 3 * 16, "slow": 1 + 3 + 3 * 2}
    assert fast == pytest.approx(0.001) and slow == pytest.approx(0.008)
    # A call slower than 5 spans (a slow peer) does not stretch the others' samples: fast fills
    # 5 spans (20 ms), not the slow call's 30 ms.
    fast, slow = run(0.03, span=0.004, inner=None)
    assert counts == {"fast": 1 + 3 + 3 * 20, "slow": 1 + 3 + 3 * 1}
    assert fast == pytest.approx(0.001) and slow == pytest.approx(0.03)
    run(0.008, span=0.016, inner=1)
    assert counts == {"fast": 4, "slow": 4}


def test_bench_peers_and_residue(capsys):
    """--peers adds the BCOO column (checked against the dense product like every contender);
    --residue sets TEW's residue."""
    from jax_tw import bench
    rows = bench.main(["--quick", "--peers", "--pattern", "tew", "--residue", "0.1", "--backend", "cpu,xla"])
    assert "bcoo ms" in capsys.readouterr().out
    assert [r["backend"] for r in rows] == ["cpu", "xla", "bcoo"] * 3
    for r in rows:
        assert r["pattern"] == "tew" and r["tw_ms"] > 0
        assert abs(r["measured_sparsity"] - r["sparsity"]) < 0.05


def test_bench_dense_column_multiplies_by_a_kept_dense_kernel(monkeypatch):
    """A 'dense' column times the dense fallback as a packed model runs it: its tiles keep the
    masked dense kernel (and its product is checked as every contender's); without one, the
    tiles keep none, so the automatic choice cannot fall back to it."""
    from jax_tw import bench
    kept, pack = [], packing.pack

    def recording_pack(*args, **kwargs):
        p = pack(*args, **kwargs)
        kept.append(p.dense is not None)
        return p

    monkeypatch.setattr(bench.packing, "pack", recording_pack)
    rows = bench.main(["--quick", "--backend", "cpu,dense"])
    assert kept and all(kept) and not any("error" in r for r in rows)
    kept.clear()
    bench.main(["--quick", "--backend", "cpu"])
    assert kept and not any(kept)


def test_bench_bf16_peers_and_bad_arguments(capsys):
    """BCOO accumulates bf16 products in bf16 (several percent of max |y| off at K = 3072): it
    is timed, not taken for a wrong product. Bad arguments are refused by the parser."""
    from jax_tw import bench
    rows = bench.main(["-m", "4", "--sparsities", "0.75", "--repeats", "1", "--peers",
                       "--dtype", "bfloat16", "--backend", "cpu"])
    assert [r["backend"] for r in rows] == ["cpu", "bcoo"] * 3 and not any("error" in r for r in rows)
    capsys.readouterr()
    for argv, message in ((["--repeats", "0"], "--repeats must be at least 1, got 0"),
                          (["-m", "0"], "-m must be at least 1, got 0"),
                          (["--inner", "-1"], "--inner must be at least 1, got -1"),
                          (["--sparsities", "0.5,"], "could not convert string to float"),
                          (["--pattern", "tw2d", "--residue", "0.1"], "unexpected keyword argument 'residue'"),
                          (["--pattern", "tew", "--residue", "0.5"], "sparsity 0.5 + residue 0.5 must be below 1")):
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert message in capsys.readouterr().err, argv


def test_bench_layers_chains_distinct_layers(monkeypatch, capsys):
    """--layers 3: each sample runs a chain of 3 distinct layers, CHAIN_ROUNDS rounds, and the
    times are per layer; every layer is packed from its own weights. In a chain each call's
    result reaches the next call's x, in order, round after round."""
    from jax_tw import bench
    packed = []
    real_pack = bench.packing.pack

    def pack(w, *args, **kwargs):
        packed.append(np.asarray(w, np.float32))
        return real_pack(w, *args, **kwargs)

    monkeypatch.setattr(bench.packing, "pack", pack)
    rows = bench.main(["--quick", "--layers", "3", "--backend", "xla"])
    assert [r["layers"] for r in rows] == [3] * 3 and all(np.isfinite(r["ratio"]) for r in rows)
    assert f"chain of 3 distinct layers, {bench.CHAIN_ROUNDS} rounds" in capsys.readouterr().out
    # 3 sparsities x 3 layers: each sparsity packs the same 3 distinct weights
    assert len(packed) == 9 and not np.array_equal(packed[0], packed[1]) and np.array_equal(packed[1], packed[4])
    # y[0, 0] = (x[0, 0] * a + 1) * 1e30, of which x[0, 0] takes 1e-30: x -> x * (1 + a) + 1,
    # a = 2, 3, 2, 3: 0 -> 1 -> 5 -> 16 -> 65.
    f = bench.chain(lambda x, a: (x @ a) * 1e30 + 1e30, rounds=2)
    got = np.asarray(f(jnp.zeros((2, 4)), [jnp.eye(4) * 2, jnp.eye(4) * 3]))
    np.testing.assert_allclose(got[0, 0], 65.0, rtol=1e-5)
    assert bench.cold_layers(1 << 20, 1 << 18) >= max(256, (64 << 20) // (1 << 18))
    monkeypatch.setattr(bench, "MAX_COLD_LAYERS", 2)
    with pytest.warns(UserWarning, match=r"needs \d+ layers to outgrow the caches; timing 2"):
        [row] = bench.run([(96, 160)], 4, [np.float32], [0.5], 16, 1, "xla", layers=None)
    assert row["layers"] == 2 and np.isfinite(row["ratio"])
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match=f"layers must be a positive int.*got {bad}"):
            bench.run([(96, 160)], 4, [np.float32], [0.5], 16, 1, "xla", layers=bad)
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--layers", "0"])
    assert "--layers must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--layers", "2", "--cold"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_bench_reports_a_wrong_backend_and_times_the_rest(monkeypatch, capsys):
    """A contender that computes a wrong product is not timed: its rows carry the error, the
    others are still measured and printed as they go, and the run exits 1."""
    from jax_tw import bench
    real = ops.tw_matmul

    def wrong_xla(x, p, backend=None):
        y = real(x, p, backend=backend)
        return y + 1.0 if backend == "xla" else y

    monkeypatch.setattr(ops, "tw_matmul", wrong_xla)
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick", "--backend", "cpu,xla"])
    assert e.value.code == 1
    out = capsys.readouterr()
    assert out.err.count("xla: ERROR AssertionError: wrong product") == 3
    assert out.err.count("cpu: dense") == 3 and "3 measurement(s) failed" in out.out


def test_dense_fallback_counts_the_residue_cost():
    """A residue weight costs RESIDUE_COST tile weights: an EW layer (all residue) or a TEW layer
    with enough residue packs with the dense kernel; a tiny residue does not."""
    rng = np.random.default_rng(11)
    w = rng.normal(size=(64, 96)).astype(np.float32)
    for sparsity, dense in ((0.6, True), (0.8, False)):
        [ew] = patterns.EW()([np.abs(w)], sparsity, tile_size=16, min_keep=0.0)
        p = packing.pack(w, jax.tree.map(np.asarray, ew), 16)
        assert p.density() == pytest.approx(1 - sparsity, abs=0.01)
        assert (p.dense is not None) == dense, (sparsity, p.cost())
    # 0.5 + (RESIDUE_COST - 1) * residue crosses DENSE_ABOVE between these two residues.
    assert 0.5 + (packing.RESIDUE_COST - 1) * 0.002 < packing.DENSE_ABOVE
    assert 0.5 + (packing.RESIDUE_COST - 1) * 0.3 > packing.DENSE_ABOVE
    for residue, dense in ((0.3, True), (0.002, False)):
        [tew] = patterns.TEW(residue=residue)([np.abs(w)], 0.5, tile_size=16, min_keep=0.0)
        p = packing.pack(w, jax.tree.map(np.asarray, tew), 16)
        assert p.density() == pytest.approx(0.5, abs=0.01)
        assert p.cost() == pytest.approx(p.density() + (packing.RESIDUE_COST - 1) * len(p.residue_rows) / w.size)
        assert (p.dense is not None) == dense, (residue, p.cost())
        assert ("cpu" in p.dense_on) == dense and "cuda" in p.dense_on  # the GPU adds a residue in XLA


def test_fallback_counts_bf16_tiles_at_the_variants_cost():
    """Where the host kernel runs bf16 in pairs (``_ffi.cpu_isa()`` 'avx512-amx' or
    'avx512-bf16'), a bf16 tile weight costs BF16_TILE_COSTS of an f32 one: a 10%-sparse TW-2D
    layer keeps the dense dot in f32 but runs the tiles in bf16 (on other machines both keep the
    dense dot). The residue costs the same in both: a 60% EW layer keeps the dense dot in bf16
    too."""
    assert set(packing.BF16_TILE_COSTS) == {"avx512-amx", "avx512-bf16"}
    paired = _ffi.cpu_isa() in packing.BF16_TILE_COSTS
    w, mask, _ = _layer(64, 96, 16, 0.1)
    x = np.random.default_rng(3).normal(size=(40, 64)).astype(np.float32)
    f = jax.jit(lambda x, p: ops.tw_matmul(x, p))
    for dtype in (np.float32, jnp.bfloat16):
        p = packing.pack(w.astype(dtype), mask, 16)
        tiles = dtype != np.float32 and paired
        assert ("cpu" in p.dense_on) == (not tiles) and "cuda" in p.dense_on, (dtype, p.dense_on)
        hlo = f.trace(x.astype(dtype), p).lower(lowering_platforms=("cpu",)).as_text()
        assert (_ffi.CPU_TARGET in hlo) == (tiles and _ffi.cpu_available())
        got = np.asarray(f(x.astype(dtype), p), np.float64)
        want = np.asarray(x.astype(dtype), np.float64) @ np.asarray(packing.unpack(p), np.float64)
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
    [ew] = patterns.EW()([np.abs(w)], 0.6, tile_size=16, min_keep=0.0)
    assert "cpu" in packing.pack(w.astype(jnp.bfloat16), jax.tree.map(np.asarray, ew), 16).dense_on


@pytest.mark.parametrize("sparsity,cpu,cuda", [(0.1, True, True), (0.5, False, True), (0.75, False, False)])
def test_fallback_rule_is_per_platform(sparsity, cpu, cuda, tmp_path):
    """Each platform's rule decides at pack time; the automatic backend follows it per platform
    (lowered for both on this machine), the dense kernel is kept only where the host path needs
    it, and the decision survives save / load, to_arrays / from_arrays and jax.export."""
    w, mask, p = _layer(64, 96, 16, sparsity)
    assert p.dense_on == tuple(pl for pl, on in (("cpu", cpu), ("cuda", cuda)) if on)
    assert (p.dense is not None) == cpu
    for pl, rule in packing.FALLBACK_RULES.items():
        assert (pl in p.dense_on) == (p.cost(rule.residue_cost) > rule.dense_above)
    x = np.random.default_rng(12).normal(size=(8, 64)).astype(np.float32)
    f = jax.jit(lambda x, p: ops.tw_matmul(x, p))
    for platform, target, dense in (("cpu", _ffi.CPU_TARGET, cpu), ("cuda", _ffi.CUDA_TARGET, cuda)):
        built = _ffi.cpu_available() if platform == "cpu" else _ffi.cuda_available()
        hlo = f.trace(x, p).lower(lowering_platforms=(platform,)).as_text()
        assert (target in hlo) == (built and not dense), (platform, dense)
    np.testing.assert_allclose(f(x, p), _reference(x, packing.unpack(p)), rtol=1e-5, atol=1e-5)
    path = str(tmp_path / "t.safetensors")
    packing.save(path, {"t": p})
    for q in (packing.load(path)["t"], packing.from_arrays(packing.to_arrays({"t": p}))["t"]):
        assert q.dense_on == p.dense_on and (q.dense is None) == (p.dense is None)
    exported = jax.export.export(f, disabled_checks=ops.export_checks())(x, p)
    back = jax.export.deserialize(exported.serialize())
    np.testing.assert_allclose(back.call(x, p), f(x, p), rtol=1e-6)
    # Without the dense cache the host path runs the tiles; a GPU rebuilds the dense kernel.
    q = dataclasses.replace(p, dense=None)
    assert (_ffi.CPU_TARGET in f.trace(x, q).lower(lowering_platforms=("cpu",)).as_text()) == _ffi.cpu_available()
    with pytest.raises(ValueError, match="dense_on must be None or a tuple"):
        packing.check_shapes(dataclasses.replace(p, dense_on=("tpu",)))


@pytest.mark.parametrize("backend", BACKENDS + [None])
def test_no_rows(backend):
    """M = 0 (an empty batch) gives an empty result on every backend, the automatic one too."""
    _, _, p = _layer(16, 24, 8, 0.5)
    y = ops.tw_matmul(np.ones((0, 16), np.float32), p, np.ones(24, np.float32), backend=backend)
    assert y.shape == (0, 24)


@pytest.mark.skipif(not _ffi.cpu_available(), reason="jax_tw._cpu not built")
@pytest.mark.parametrize("m", [33, 100, 517])
def test_host_bf16_blocked_path_sums_in_f32(m):
    """bf16 x on the blocked path (in pairs of kept K indices on AMX tiles or by VDPBF16PS where
    the CPU has them: _cpu.isa() is avx512-amx or avx512-bf16) against a float64 reference,
    with an f32 output so that only the sums' own rounding shows: tile widths that are not
    whole 16-column groups (even and odd counts of them), kept rows per tile not whole 32-row
    steps (and odd), tiles with no kept rows, K in three blocks, rows not a multiple of 32, a
    residue and a bias."""
    rng = np.random.default_rng(m)
    for pattern in (patterns.TW2D(), patterns.TEW(residue=0.05)):
        for k, n, g in ((40, 70, 16), (1700, 200, 48), (768, 300, 64), (97, 33, 8), (200, 90, 48)):
            _, _, p = packed_layer(k, n, g, 0.6, jnp.bfloat16, seed=m + k, pattern=pattern, empty_every=3)
            x = jnp.asarray(rng.normal(size=(m, k)).astype(jnp.bfloat16))
            bias = rng.normal(size=n).astype(np.float32)
            y = np.asarray(_ffi.cpu_tw_matmul(x, p, jnp.asarray(bias), jnp.float32), np.float64)
            want = np.asarray(x, np.float64) @ np.asarray(packing.unpack(p), np.float64) + bias
            np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                                       err_msg=f"{pattern} {k}x{n} G={g}")
