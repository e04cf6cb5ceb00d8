"""Benchmark: tile-wise matmul over packed tiles vs the dense ``jnp.dot`` under jit.

    python -m jax_tw.bench                       # BERT-base shapes, M = 2048, f32
    python -m jax_tw.bench --json out.json --plot speedup.png
    python -m jax_tw.bench --quick               # tiny shapes, a few repeats (used by the tests)
    python -m jax_tw.bench --shapes both -m 16384 --dtype bfloat16 --backend cuda,pallas   # on a GPU
    python -m jax_tw.bench --pattern tew --residue 0.05 --sparsities 0.75
    python -m jax_tw.bench --peers                # adds jax.experimental.sparse BCOO, same masks
    python -m jax_tw.bench -m 1 --cold            # one token; weights read from memory, not caches

``--backend`` takes a comma-separated list: every backend gets its own column in the table,
timed in the same interleaved run as the dense dot. ``--peers`` adds a ``bcoo`` column: the
same masked kernel as a ``jax.experimental.sparse`` BCOO matrix (``x @ W`` as
``(W^T @ x^T)^T`` with ``sparse.sparsify``), the JAX user's own alternative, in the same run.

For every shape, dtype and sparsity, the dense dot and the TW call are timed *interleaved* (dense,
TW, dense, TW, ...) so that a noisy machine slows both alike; the table reports the medians and
their ratio (dense time / TW time), and the fraction of the ideal speedup ``1 / (1 - s)``. A
sample is several calls queued back to back (``--inner``; on a CPU by default as many as make
every sample last about as long as the others: ``time_interleaved``).
Masks are TW-2D from random magnitudes, G = 128 unless ``--tile-size`` says otherwise.

Before JAX starts, the bench makes glibc keep freed memory (:func:`jax_tw.host.keep_freed_memory`,
for both contenders): otherwise whichever computation glibc hands fresh pages pays a page fault
per 4 KiB of its output on every call, which on a fast layer can cost more than its work, and
which computation that is depends on the process's allocation history. ``--default-malloc``
times the process as its environment sets malloc up. (A layer's buffers are small; a training
process pays in peak memory for the setting, so the BERT example leaves it to
``--keep-freed-memory``.)

By default every call multiplies by the same weights, which after the first call sit in the
CPU's caches as far as they fit. In a model each layer's weights are read once per step, from
memory once the model outgrows the last-level cache; with few rows (one token at a time) that
read is most of the call. ``--cold`` times that case: each sample runs a chain of distinct layers
of the shape (each with its own random weights and masks, each call waiting on the one before,
in one ``jax.jit``) whose weights, dense and packed, outgrow the caches (:func:`cold_layers`),
and reports the time per layer. ``--layers N`` sets the chain's length instead.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_tw import host, ops, packing, patterns

BERT_BASE = [(768, 768), (768, 3072), (3072, 768)]
BERT_LARGE = [(1024, 1024), (1024, 4096), (4096, 1024)]


def time_interleaved(calls, repeats: int, inner: int | None = 1, span: float = 0.02) -> list[float]:
    """Medians (seconds per call) of each ``f(*args)`` in ``calls``, timed interleaved (one
    sample of each in turn) after one warm-up call each. Each sample times ``inner`` calls
    queued back to back (on a GPU one call can be shorter than its dispatch from Python).

    ``inner=None``: for each call as many as fill ``span`` seconds or the slowest call, whichever
    is longer, but at most ``5 * span`` (a slow peer such as BCOO does not stretch the others'
    samples); the fastest of three single calls gives each call's time. So every sample lasts
    about as long. On a 2-core virtual machine a call of a few milliseconds or less, timed
    alone, often waits a millisecond or two for its second core (BUILD_NOTES.md, "Timing short
    calls"); a sample that lasts as long as the others pays that wait no more than they do."""
    for f, args in calls:
        jax.block_until_ready(f(*args))

    def sample(f, args, n):
        t = time.perf_counter()
        for _ in range(n):
            out = f(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - t) / n

    if inner is None:
        single = [min(sample(f, args, 1) for _ in range(3)) for f, args in calls]
        longest = max(span, min(max(single), 5 * span))
        inners = [max(1, min(1000, round(longest / t))) for t in single]
    else:
        inners = [inner] * len(calls)
    times = [[] for _ in calls]
    for _ in range(repeats):
        for ts, (f, args), n in zip(times, calls, inners):
            ts.append(sample(f, args, n))
    return [float(np.median(ts)) for ts in times]


def time_pair(f_dense, f_tw, args_dense, args_tw, repeats: int, inner: int | None = 1) -> tuple[float, float]:
    """:func:`time_interleaved` of two calls: (dense median, TW median)."""
    t_dense, t_tw = time_interleaved([(f_dense, args_dense), (f_tw, args_tw)], repeats, inner)
    return t_dense, t_tw


def largest_cache_bytes() -> int:
    """The largest CPU cache Linux reports (``/sys/devices/system/cpu/cpu0/cache``), 0 if none."""
    import glob
    import re
    largest = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                size = re.fullmatch(r"(\d+)([KMG]?)", f.read().strip())
        except OSError:
            continue
        if size:
            largest = max(largest, int(size[1]) << {"": 0, "K": 10, "M": 20, "G": 30}[size[2]])
    return largest


def cold_layers(dense_bytes: int, packed_bytes: int) -> int:
    """Layers in a ``--cold`` chain: enough that their dense weights fill 256 MiB and 4x the
    largest cache, and their packed tiles twice it (64 MiB where no cache size is known), so
    that a round of the chain finds none of its layers still cached from the round before."""
    cache = largest_cache_bytes()
    return max(-(-max(256 << 20, 4 * cache) // dense_bytes), -(-max(64 << 20, 2 * cache) // packed_bytes))


# Most layers a --cold chain holds: compiling and packing thousands of layers of a tiny shape
# took minutes (`--quick --cold`: over 5 minutes for its first row). Capped, a chain of small
# layers may fit in the caches; run() warns when it does.
MAX_COLD_LAYERS = 1024

# Times a --cold sample runs its chain of layers: one dispatch from Python, which flattens every
# layer's arrays (212 us for 1,056 arrays here), is spread over all of them.
CHAIN_ROUNDS = 4


def chain(step, rounds: int = CHAIN_ROUNDS):
    """``jax.jit`` of ``x, operands -> x`` that calls ``step(x, a)`` for each ``a`` in turn,
    ``rounds`` times over, each call waiting on the one before (x[0, 0] takes a vanishing share
    of its result)."""
    def once(_, x, operands):
        for a in operands:
            y = step(x, a)
            x = x.at[0, 0].add((y[0, 0] * 1e-30).astype(x.dtype))
        return x
    return jax.jit(lambda x, operands: jax.lax.fori_loop(0, rounds, functools.partial(once, operands=operands), x))


def bcoo_matmul(x, w_t):
    """``x @ W`` with ``W^T`` (N, K) a BCOO matrix: the sparse operand on the left, as
    ``jax.experimental.sparse`` multiplies best."""
    from jax.experimental import sparse
    return sparse.sparsify(lambda w_t, x: (w_t @ x.T).T)(w_t, x)


def run(shapes, m: int, dtypes, sparsities, tile_size: int, repeats: int, backend: str | None,
        seed: int = 0, pattern: str = "tw2d", inner: int | None = 1, residue: float | None = None,
        peers: bool = False, progress=None, layers: int | None = 1) -> list[dict[str, Any]]:
    """Times every (shape, dtype, sparsity); returns one row dict per measurement and backend.

    ``backend``: a name, a comma-separated list of names (each timed in the same interleaved
    run) or None (automatic). ``pattern`` (a :func:`jax_tw.patterns.get` name) makes the
    masks; EW/VW/BW masks pack into an element-wise residue only, which measures the residue
    path. ``residue`` sets a TEW pattern's residue fraction; ``peers`` adds a ``'bcoo'`` row
    (:func:`bcoo_matmul`) to every measurement. ``inner``: calls per timed sample, or None
    (:func:`time_interleaved`). ``progress`` is called with each row as it
    is made. A contender that raises or computes a wrong product is not timed: its row has
    ``'error'`` (and NaN times). ``layers``: each timed call runs a :func:`chain` of that many
    distinct layers of the shape (their times per layer are reported); None: as many as
    :func:`cold_layers` asks, at most ``MAX_COLD_LAYERS`` (with a warning). The first layer's
    product is the one checked."""
    if layers is not None and (not isinstance(layers, (int, np.integer)) or layers < 1):
        raise ValueError(f"layers must be a positive int (or None: as many as cold_layers asks), got {layers!r}")
    make_masks = patterns.get(pattern, **({} if residue is None else {"residue": residue}))
    rng = np.random.default_rng(seed)
    names = [ops.backend_for(b) for b in (backend.split(",") if backend else [None])]
    steps = [functools.partial(lambda x, p, name: ops.tw_matmul(x, p, backend=name), name=b) for b in names]
    if peers:
        from jax.experimental import sparse
        names = names + ["bcoo"]
        steps = steps + [bcoo_matmul]
    # The tiles keep the masked dense kernel only for a 'dense' column, which then multiplies
    # by it as a packed model would (without it, that backend rebuilds it inside every call).
    keep_dense = "dense" in names
    dense_fn, dense_chain = jax.jit(jnp.dot), chain(jnp.dot)
    tw_fns, tw_chains = [jax.jit(f) for f in steps], [chain(f) for f in steps]
    rows = []
    for k, n in shapes:
        w32s = [rng.normal(size=(k, n)).astype(np.float32)]
        x32 = rng.normal(size=(m, k)).astype(np.float32)
        for dtype in dtypes:
            x = jnp.asarray(x32.astype(dtype))

            def layer(i, s):  # layer i's dense weights and packed tiles at sparsity s
                while len(w32s) <= i:
                    w32s.append(rng.normal(size=(k, n)).astype(np.float32))
                w = w32s[i].astype(dtype)
                [mask] = make_masks([np.abs(w32s[i])], s, tile_size=tile_size, min_keep=0.0)
                p = packing.pack(w, jax.tree.map(np.asarray, mask), tile_size, keep_dense=keep_dense)
                return jnp.asarray(w), p  # pack places the tiles on the device

            for s in sparsities:
                wj, p = layer(0, s)
                wjs, ps = [wj], [p]
                count = layers
                if count is None:
                    count = cold_layers(wj.nbytes, sum(a.nbytes for a in jax.tree.leaves(p)))
                    if count > MAX_COLD_LAYERS:
                        warnings.warn(f"--cold: {k}x{n} {np.dtype(dtype).name} at {s:.0%} needs {count} "
                                      f"layers to outgrow the caches; timing {MAX_COLD_LAYERS} "
                                      f"(MAX_COLD_LAYERS), whose weights may stay cached", stacklevel=2)
                        count = MAX_COLD_LAYERS
                for i in range(1, count):
                    wj, q = layer(i, s)
                    wjs.append(wj)
                    ps.append(q)
                operands = [ps] * (len(tw_fns) - peers)
                if peers:  # the same masked kernels, transposed, as BCOO
                    operands.append([sparse.BCOO.fromdense(jnp.asarray(packing.unpack(q).T)) for q in ps])
                # Every contender computes the same product: a wrong one (or one that raises)
                # is not timed; its row carries the error instead (main() then exits 1).
                want = np.asarray(x, np.float32) @ packing.unpack(p).astype(np.float32)
                tol = 1e-3 if np.dtype(dtype) == np.float32 else 5e-2
                scale = np.abs(want).max()
                good, errors = [], {}
                for name, f, fc, a in zip(names, tw_fns, tw_chains, operands):
                    # BCOO accumulates bf16 products in bf16: a wider bound, still far below
                    # what a wrong product gives.
                    t = 0.25 if name == "bcoo" and np.dtype(dtype) != np.float32 else tol
                    try:
                        got = np.asarray(f(x, a[0]), np.float32)
                        if not np.allclose(got, want, rtol=t, atol=t * scale):
                            err = np.abs(got - want).max() / scale
                            raise AssertionError(f"wrong product (max error {err:.2e} of max |y|)")
                        good.append((name, f, a[0]) if count == 1 else (name, fc, a))
                    except Exception as e:  # recorded and reported, so the other rows still run
                        errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                dense_call = (dense_fn, (x, wjs[0])) if count == 1 else (dense_chain, (x, wjs))
                calls_per_sample = 1 if count == 1 else count * CHAIN_ROUNDS
                t_dense, *t_tws = (t / calls_per_sample for t in time_interleaved(
                    [dense_call] + [(f, (x, a)) for _, f, a in good], repeats, inner))
                times = dict(zip([g[0] for g in good], t_tws))
                for name in names:
                    t_tw = times.get(name, float("nan"))
                    ratio = t_dense / t_tw
                    rows.append({
                        "k": k, "n": n, "m": m, "dtype": np.dtype(dtype).name, "pattern": pattern,
                        "sparsity": s, "measured_sparsity": 1.0 - p.density(), "backend": name,
                        "layers": count, "dense_ms": 1e3 * t_dense, "tw_ms": 1e3 * t_tw, "ratio": ratio,
                        "fraction_of_ideal": ratio * (1.0 - s),
                        **({"error": errors[name]} if name in errors else {}),
                    })
                    if progress:
                        progress(rows[-1])
    return rows


def format_row(r: dict[str, Any]) -> str:
    """One measurement on one line (printed as the run goes, so a cut-off run keeps its rows)."""
    head = (f"{r['m']}x{r['k']}x{r['n']} {r['dtype']} {r['pattern']} {r['sparsity']:.0%} "
            f"{r['backend']}: ")
    if "error" in r:
        return head + "ERROR " + r["error"]
    return head + (f"dense {r['dense_ms']:.3f} ms, tw {r['tw_ms']:.3f} ms, "
                   f"{r['ratio']:.2f}x, {r['fraction_of_ideal']:.2f} of ideal")


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per (shape, dtype, sparsity); TW ms, ratio and fraction of ideal per backend."""
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    head = f"{'shape (MxKxN)':>18} {'dtype':>8} {'pattern':>7} {'sparsity':>8} {'dense ms':>9}"
    for b in backends:
        head += f" {b + ' ms':>10} {'ratio':>6} {'of ideal':>8}"
    lines = [head, "-" * len(head)]
    chained = sorted({r.get("layers", 1) for r in rows} - {1})
    if chained:  # --cold or --layers
        lines.insert(0, f"times per layer: each sample a chain of {'/'.join(map(str, chained))} distinct "
                        f"layers, {CHAIN_ROUNDS} rounds")
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["m"], r["k"], r["n"], r["dtype"], r["pattern"], r["sparsity"]), {})[r["backend"]] = r
    for (m, k, n, dtype, pattern, s), by in groups.items():
        first = next(iter(by.values()))
        line = f"{m:>6}x{k:>5}x{n:>5} {dtype:>8} {pattern:>7} {s:>8.0%} {first['dense_ms']:>9.2f}"
        for b in backends:
            r = by.get(b)
            line += (f" {r['tw_ms']:>10.2f} {r['ratio']:>5.2f}x {r['fraction_of_ideal']:>8.2f}"
                     if r and "error" not in r else
                     f" {'ERROR' if r else '':>10} {'':>6} {'':>8}")
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    keys = list(dict.fromkeys((r["k"], r["n"], r["dtype"], r["backend"]) for r in rows))
    for key in keys:
        sel = [r for r in rows if (r["k"], r["n"], r["dtype"], r["backend"]) == key]
        ax.plot([r["sparsity"] for r in sel], [r["ratio"] for r in sel], "o-",
                label="{}x{} {} {}".format(*key))
    s = np.linspace(0, max(r["sparsity"] for r in rows), 50)
    ax.plot(s, 1 / (1 - s), "k--", label="ideal 1/(1-s)")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel(f"{rows[0]['pattern']} sparsity")
    ax.set_ylabel("speedup vs dense jnp.dot")
    ax.set_title(f"jax_tw tw_matmul, M={rows[0]['m']}, backend {', '.join(dict.fromkeys(r['backend'] for r in rows))}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description="tw_matmul vs dense jnp.dot, side by side")
    ap.add_argument("--shapes", choices=["base", "large", "both"], default="base",
                    help="BERT-base (768/3072) or BERT-large (1024/4096) K x N shapes")
    ap.add_argument("-m", type=int, default=2048, help="rows of x (tokens)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="float32")
    ap.add_argument("--sparsities", default="0,0.25,0.5,0.75,0.9")
    ap.add_argument("--tile-size", type=int, default=128)
    ap.add_argument("--pattern", default="tw2d", help="mask pattern: tw2d, tw1d, tew, ew, vw, bw")
    ap.add_argument("--residue", type=float, default=None,
                    help="TEW's residue fraction (default: the pattern's own, 0.05)")
    ap.add_argument("--peers", action="store_true",
                    help="also time jax.experimental.sparse BCOO on the same masked kernel")
    chained = ap.add_mutually_exclusive_group()
    chained.add_argument("--cold", action="store_true",
                         help="weights read from memory: each sample chains distinct layers of the "
                              "shape, as many as outgrow the caches (cold_layers); times per layer")
    chained.add_argument("--layers", type=int, default=1,
                         help="distinct layers chained in each sample (at least 1); times per layer")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--backend", default=None,
                    help="xla, cpu, cuda, pallas or dense, or a comma-separated list of them, each "
                         "its own column (default: automatic)")
    ap.add_argument("--inner", type=int, default=None,
                    help="calls per timed sample (default: on a GPU 20; on a CPU, per call, as "
                         "many as last 20 ms or as long as the slowest call: see time_interleaved)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="time under the malloc settings the process starts with (glibc's "
                         "defaults hand freed memory back and fault in fresh pages on later calls; "
                         "default: keep it, jax_tw.host.keep_freed_memory)")
    ap.add_argument("--json", help="write the rows to this JSON file")
    ap.add_argument("--plot", help="draw speedup vs sparsity to this PNG")
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes and repeats (smoke test; replaces --shapes, -m, --sparsities "
                         "and --repeats)")
    args = ap.parse_args(argv)
    for flag, value in (("--layers", args.layers), ("--repeats", args.repeats), ("-m", args.m),
                        ("--inner", 1 if args.inner is None else args.inner)):
        if value < 1:
            ap.error(f"{flag} must be at least 1, got {value}")
    shapes = {"base": BERT_BASE, "large": BERT_LARGE, "both": BERT_BASE + BERT_LARGE}[args.shapes]
    dtypes = {"float32": [np.float32], "bfloat16": [jnp.bfloat16],
              "both": [np.float32, jnp.bfloat16]}[args.dtype]
    m, repeats = args.m, args.repeats
    try:
        sparsities = [float(s) for s in args.sparsities.split(",")]
        if args.quick:
            shapes, m, repeats, sparsities = [(96, 160)], 64, 3, [0.0, 0.5, 0.9]
        pattern = patterns.get(args.pattern, **({} if args.residue is None else {"residue": args.residue}))
        for s in sparsities:
            pattern.check_target(s)
    except (ValueError, TypeError) as e:
        ap.error(f"--pattern {args.pattern!r}, --residue {args.residue}, --sparsities "
                 f"{args.sparsities!r}: {e}")
    malloc = host.malloc_setting(keep=not args.default_malloc)  # before JAX's first computation
    print(f"malloc: {malloc}", flush=True)
    inner = args.inner or (20 if jax.default_backend() == "gpu" else None)
    rows = run(shapes, m, dtypes, sparsities, args.tile_size, repeats, args.backend,
               pattern=args.pattern, inner=inner, residue=args.residue, peers=args.peers,
               progress=lambda r: print(format_row(r), file=sys.stderr, flush=True),
               layers=None if args.cold else args.layers)
    for r in rows:
        r["malloc"] = malloc
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    errors = [r for r in rows if "error" in r]
    if args.plot:
        plot([r for r in rows if "error" not in r], args.plot)
    if errors:
        print(f"{len(errors)} measurement(s) failed:", *map(format_row, errors), sep="\n")
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()
