"""``tw_matmul``: ``activation(x @ W + bias)`` over packed tiles, with backends chosen per platform.

Backends:

* ``'xla'``  the pure-XLA reference: gathers plus one batched ``dot_general`` over tiles padded
  to the deepest tile. Runs everywhere; every kernel is checked against it.
* ``'cpu'``  the XLA FFI custom call of the ``jax_tw._cpu`` extension (host kernel; the bias,
  a TEW residue, the activation and the cast to x's dtype are fused into it).
* ``'cuda'`` the XLA FFI custom call of the ``jax_tw._cuda`` extension (CUDA kernel; the bias is
  fused into it, and a TEW residue is added by XLA afterwards in float32).
* ``'pallas'`` the Pallas kernel of :mod:`jax_tw.pallas` (bias fused, residue added by XLA): on
  a GPU compiled by Triton; on a CPU run in Pallas interpret mode (slow, for testing). Never
  chosen automatically until GPU measurements say it should be: ask for it with
  ``backend='pallas'`` or ``JAX_TW_BACKEND=pallas``.
* ``'dense'`` ``x @ unpack(packed)`` with XLA's dense dot (what the automatic choice falls back
  to where the sparse path would be slower).

``backend=None`` picks automatically, per platform: ``'dense'`` where that platform's fallback
rule (``packing.FALLBACK_RULES``: estimated cost, tile density plus the rule's residue cost
times residue density, above its density threshold; measured on the CPU, a guess on GPUs)
chose it at pack time (``PackedTiles.dense_on``), else the custom call of the platform
(``'cpu'`` or ``'cuda'``) when it was built, else ``'xla'``. The platform is the one the computation is lowered for (``lax.platform_dependent``),
not the default backend: ``jax.jit(f, device=cpu_device)`` on a GPU host runs the host
kernel, and ``jax.export`` for several platforms holds each platform's call. Few rows (M <= 32)
need no fallback: the host kernel then reads the packed values directly and was measured at
0.8-2.6x of dense for M = 1 at 50-75% sparsity. The environment
variable ``JAX_TW_BACKEND`` overrides the automatic choice (for testing). Gradients: ``dx`` is
itself a tile-wise product (scatter-added into the kept K rows) and ``d(values)`` is formed only
at kept positions; both run on the reference path, whatever the forward's backend. A layer whose
forward reads the dense cache (``'dense'`` with ``packed.dense`` set) cannot pass gradients to its
weights (they would reach ``values``, which that forward does not read): differentiating its
weights raises ValueError; gradients to ``x`` are fine.

Under ``jax.vmap``, batch dimensions of ``x`` fold into M (one custom call) whenever the tiles
are not batched.

Deployment: ``jax.export`` works on a jitted function that calls ``tw_matmul``; pass
``disabled_checks=ops.export_checks()`` (the custom-call targets are jax_tw's own, see
BUILD_NOTES.md for their compatibility promise) and import ``jax_tw`` before deserializing.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_tw import _ffi, packing, pallas
from jax_tw.packing import PackedTiles

__all__ = ["tw_matmul", "available_backends", "backend_for", "export_checks", "exact_f32", "BACKENDS"]

BACKENDS = ("xla", "cpu", "cuda", "pallas", "dense")

# The activations tw_matmul applies after the bias (fused into the host kernel's epilogue; other
# backends apply them in float32 before the one rounding to x's dtype).
ACTIVATIONS = tuple(_ffi.ACTIVATION_CODES)


def activate(y: jax.Array, activation: str | None) -> jax.Array:
    """``activation`` (one of ACTIVATIONS) of ``y``: ``'relu'`` is ``jax.nn.relu``, ``'gelu'``
    the exact (erf) GELU, ``jax.nn.gelu(approximate=False)``."""
    if activation == "relu":
        return jax.nn.relu(y)
    if activation == "gelu":
        return jax.nn.gelu(y, approximate=False)
    return y


def check_activation(activation: Any) -> str | None:
    """``activation`` if it is one tw_matmul applies, else ValueError naming the choices."""
    if not (activation is None or isinstance(activation, str)) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    return activation


def available_backends() -> tuple[str, ...]:
    """The backends this installation has (``'cpu'`` and ``'cuda'`` only where their extension
    was built; ``'cuda'`` also needs a GPU to run, but lowers for one anywhere)."""
    return (("xla", "dense", "pallas") + (("cpu",) if _ffi.cpu_available() else ())
            + (("cuda",) if _ffi.cuda_available() else ()))


def export_checks() -> list:
    """The ``disabled_checks`` that ``jax.export.export`` needs for functions calling
    :func:`tw_matmul`: it allows jax_tw's versioned custom-call targets (``*_vN``)."""
    return [jax.export.DisabledSafetyCheck.custom_call(t)
            for t in (_ffi.CPU_TARGET, _ffi.CPU_TARGET_V2, _ffi.CPU_TARGET_V1, _ffi.CUDA_TARGET)]


def _platform_backend(platform: str, p: PackedTiles | None = None) -> str:
    """The automatic backend on ``platform`` ('cpu' or 'cuda') for tiles ``p``, given what was
    built: the dense dot where the platform's fallback rule chose it at pack time (on the CPU
    only while the dense cache is kept: dropping it asks for the tiles)."""
    if p is not None and p.dense_on is not None and platform in p.dense_on and (
            platform != "cpu" or p.dense is not None):
        return "dense"
    if platform == "cpu" and _ffi.cpu_available():
        return "cpu"
    if platform == "cuda" and _ffi.cuda_available():
        return "cuda"
    return "xla"


def backend_for(backend: str | None = None, platform: str | None = None) -> str:
    """The backend ``tw_matmul(..., backend=backend)`` runs on ``platform`` ('cpu', 'cuda' or
    'gpu'; default: the default backend) for tiles without a dense cache."""
    name = _choose(backend)
    if name != "auto":
        return name
    platform = platform or jax.default_backend()
    return _platform_backend("cuda" if platform == "gpu" else platform)


def _choose(backend: str | None, packed: PackedTiles | None = None) -> str:
    """The backend name, or ``'auto'``: chosen per platform when the call is lowered."""
    if backend is None:
        backend = os.environ.get("JAX_TW_BACKEND") or None
    if backend is None:
        if packed is not None and packed.dense is not None and (
                packed.dense_on is None or set(packed.dense_on) >= set(packing.FALLBACK_RULES)):
            return "dense"  # the dense dot on every platform: the tiles would be slower
        return "auto"  # chosen per platform (see _platform_backend)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (or None for automatic), got {backend!r}")
    if backend == "cpu":
        if not _ffi.cpu_available():
            raise ValueError("backend='cpu' was requested but jax_tw was built without its CPU "
                             f"extension ({_ffi.cpu_import_error()})")
    if backend == "cuda" and not _ffi.cuda_available():
        raise ValueError(f"backend='cuda' was requested but {_ffi.cuda_import_error()}")
    return backend


# ----------------------------------------------------------------------------- reference path

def _padded_tiles(p: PackedTiles):
    """Tiles padded to the deepest one: gather index (T, D), validity (T, D), weights (T, D, G)."""
    t, d = p.num_tiles, p.max_depth
    offsets = jnp.asarray(p.row_offsets)
    j = jnp.arange(d)
    pos = offsets[:-1, None] + j[None, :]  # (T, D)
    valid = pos < offsets[1:, None]
    pos = jnp.minimum(pos, max(np.shape(p.rows)[0] - 1, 0))
    idx = jnp.where(valid, jnp.asarray(p.rows)[pos], 0)
    w = jnp.where(valid[..., None], jnp.asarray(p.values)[pos], 0)
    return idx, valid, w


def _sharding(x2: jax.Array, rows: bool):
    """The ``out_sharding`` of a result of the XLA path under explicit sharding (the default of
    ``jax.make_mesh``), where JAX does not infer it: an (M, n) array sharded as x2's rows
    (``rows``) or a replicated one (a sum over the rows). None where x2 has no mesh."""
    sharding = jax.typeof(x2).sharding
    if not sharding.mesh.axis_names:
        return None
    spec = (sharding.spec[0] if len(sharding.spec) else None, None) if rows else ()
    return sharding.update(spec=jax.sharding.PartitionSpec(*spec))


def _zeros_rows_like(x2: jax.Array, n: int) -> jax.Array:
    """(M, n) float32 zeros with x2's row sharding (the buffer the XLA path scatters into)."""
    return jnp.zeros((x2.shape[0], n), jnp.float32, out_sharding=_sharding(x2, rows=True))


def _forward_xla(x2: jax.Array, p: PackedTiles, precision=None) -> jax.Array:
    """(M, K) -> (M, N) in f32 on the reference path."""
    m = x2.shape[0]
    y = _zeros_rows_like(x2, p.n)
    c = np.shape(p.columns)[0]
    if c and p.max_depth:
        idx, valid, w = _padded_tiles(p)
        # (M, T, D); f32 operands = f32 accumulation. The padding's x is zeroed, not only its
        # weights: pruned weights are absent, so a NaN or infinity in x reaches only the outputs
        # whose kept weights read it (tw_matmul).
        xg = jnp.where(valid, x2[:, idx].astype(jnp.float32), 0)
        out = jnp.einsum("mtd,tdg->mtg", xg, w.astype(jnp.float32), precision=precision)
        out = out.reshape(m, p.num_tiles * p.tile_size)[:, :c]  # explicit sizes: M may be 0
        y = y.at[:, jnp.asarray(p.columns)].set(out)
    return _add_residue(y, x2, p)


def _add_residue(y, x2, p: PackedTiles):
    """y (M, N) f32 plus the element-wise residue's product, if the layer has one."""
    if np.shape(p.residue_rows)[0]:
        contrib = x2[:, p.residue_rows].astype(jnp.float32) * jnp.asarray(p.residue_values, jnp.float32)
        y = y.at[:, jnp.asarray(p.residue_cols)].add(contrib)
    return y


def _backward_xla(x2, p: PackedTiles, dy):
    """Cotangents of x (M, K), values (R, G) and residue_values (E,) for dy (M, N) in f32."""
    m = x2.shape[0]
    dx = _zeros_rows_like(x2, p.k)
    dvalues = jnp.zeros(np.shape(p.values), jnp.float32)
    dres = jnp.zeros(np.shape(p.residue_values), jnp.float32)
    c = np.shape(p.columns)[0]
    if c and p.max_depth:
        t, g = p.num_tiles, p.tile_size
        idx, valid, w = _padded_tiles(p)
        cols = jnp.pad(jnp.asarray(p.columns), (0, t * g - c))
        dyt = jnp.where(jnp.arange(t * g) < c, dy[:, cols], 0).reshape(m, t, g)  # (M, T, G)
        dxg = jnp.einsum("mtg,tdg->mtd", dyt, w.astype(jnp.float32))
        dx = dx.at[:, idx].add(jnp.where(valid, dxg, 0))
        xg = x2[:, idx].astype(jnp.float32)
        dw = jnp.einsum("mtd,mtg->tdg", xg, dyt, out_sharding=_sharding(x2, rows=False))  # (T, D, G)
        offsets = jnp.asarray(p.row_offsets)
        pos = offsets[:-1, None] + jnp.arange(p.max_depth)[None, :]
        pos = jnp.where(valid, pos, np.shape(p.values)[0])  # out of range: dropped
        dvalues = dvalues.at[pos].set(dw, mode="drop")
    if np.shape(p.residue_rows)[0]:
        rr, rc = jnp.asarray(p.residue_rows), jnp.asarray(p.residue_cols)
        dx = dx.at[:, rr].add(dy[:, rc] * jnp.asarray(p.residue_values, jnp.float32))
        dres = jnp.sum(x2[:, rr].astype(jnp.float32) * dy[:, rc], axis=0)
    return dx, dvalues, dres


# ----------------------------------------------------------------------------- custom_vjp

def _forward(backend: str, exact: bool, act: str | None, x2, p: PackedTiles, bias, f32: bool = False):
    """act(x2 @ W + bias) in x2's dtype (``f32``: in float32), accumulated in f32; bias is f32
    (N,) or None. ``exact``: f32 products in IEEE f32 (Precision.HIGHEST), else as XLA's default
    precision (TF32 tensor cores on a GPU; the host kernel is always exact)."""
    if backend == "auto":
        return jax.lax.platform_dependent(
            x2, p, bias, cpu=lambda *a: _forward(_platform_backend("cpu", p), exact, act, *a, f32),
            cuda=lambda *a: _forward(_platform_backend("cuda", p), exact, act, *a, f32),
            default=lambda *a: _forward("dense" if p.dense is not None else "xla", exact, act, *a, f32))
    precision = jax.lax.Precision.HIGHEST if exact else None
    out = jnp.float32 if f32 else x2.dtype
    if backend == "pallas":
        kernel = functools.partial(pallas.tw_matmul, precision=precision)
        return jax.lax.platform_dependent(  # compiled by Triton on a GPU, interpreted elsewhere
            x2, p, bias, cuda=lambda *a: _bias_fused(functools.partial(kernel, interpret=False), act, *a, out),
            default=lambda *a: _bias_fused(functools.partial(kernel, interpret=True), act, *a, out))
    if backend == "cuda":
        return _bias_fused(functools.partial(_ffi.cuda_tw_matmul, exact_f32=exact), act, x2, p, bias, out)
    if backend == "cpu":  # bias, residue, activation and output dtype fused into the kernel
        return _ffi.cpu_tw_matmul(x2, p, bias, out, activation=act)
    if backend == "dense":
        w = _dense_kernel(p)
        y = jax.lax.platform_dependent(  # XLA:CPU has no bf16 x bf16 -> f32 dot
            x2, w, cpu=lambda x, w: jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32)),
            default=lambda x, w: jnp.dot(x, w.astype(x.dtype), precision=precision,
                                         preferred_element_type=jnp.float32))
    else:
        y = _forward_xla(x2, p, precision)
    if bias is not None:
        y = y + bias
    return activate(y, act).astype(out)


def _bias_fused(kernel, act, x2, p: PackedTiles, bias, out):
    """A GPU kernel ``kernel(x2, p, bias, out_dtype)`` that fuses the bias and writes ``out``;
    a TEW residue and the activation are applied by XLA to its f32 output."""
    b = jnp.zeros((p.n,), jnp.float32) if bias is None else bias
    residue = bool(np.shape(p.residue_rows)[0])
    if not residue and act is None:
        return kernel(x2, p, b, out)
    y = kernel(x2, p, b, jnp.float32)
    return activate(_add_residue(y, x2, p) if residue else y, act).astype(out)


def _dense_kernel(p: PackedTiles) -> jax.Array:
    """The masked dense kernel: kept by packing, or rebuilt inside jit from the packed arrays."""
    if p.dense is not None:
        return jnp.asarray(p.dense)
    w = jnp.zeros((p.k, p.n), jnp.result_type(p.values))
    c = np.shape(p.columns)[0]
    if c and p.max_depth:
        idx, valid, wt = _padded_tiles(p)
        t, g = p.num_tiles, p.tile_size
        cols = jnp.pad(jnp.asarray(p.columns), (0, t * g - c), constant_values=p.n)
        rows = jnp.where(valid, idx, p.k)[:, :, None]
        w = w.at[rows, cols.reshape(t, 1, g)].set(wt, mode="drop")
    if np.shape(p.residue_rows)[0]:
        w = w.at[p.residue_rows, p.residue_cols].add(p.residue_values)  # as packing.unpack
    return w


@functools.cache
def _make_matmul(backend: str, exact: bool, act: str | None, f32: bool = False):
    """``act(x2 @ W + bias)`` in x2's dtype (``f32``: in float32), differentiable any number of
    times: the backward pass runs on XLA (_backward_xla)."""
    @jax.custom_vjp
    def matmul(x2, p, bias):
        return _forward(backend, exact, act, x2, p, bias, f32)

    def fwd(x2, p, bias):
        # symbolic_zeros: every leaf is a CustomVJPPrimal telling whether it is differentiated.
        if backend in ("dense", "auto") and p.dense is not None and any(
                leaf.perturbed for leaf in (p.values, p.residue_values, p.dense)):
            raise ValueError(
                "tw_matmul: this layer's packed tiles keep a dense copy of the kernel (packing fell "
                "back to the dense dot, see packing.DENSE_ABOVE), which its forward reads; gradients "
                "to its weights would not reach it. To train through packed tiles, pack with "
                "keep_dense=False (or train the masked model and pack afterwards)")
        x2, p, bias = jax.tree.map(lambda leaf: leaf.value, (x2, p, bias))
        if act is None:
            return matmul(x2, p, bias), (x2, p, bias, None)
        # The product before the activation, in f32 (rounded once, after the activation, as the
        # fused kernel rounds), kept for the activation's derivative (M x N x 4 bytes, twice a
        # bf16 layer's output); made by the custom_vjp without activation, so that gradients of
        # gradients reach it.
        z = _make_matmul(backend, exact, None, True)(x2, p, bias)
        return activate(z, act).astype(jnp.float32 if f32 else x2.dtype), (x2, p, bias, z)

    def bwd(res, dy):
        x2, p, bias, z = res
        if isinstance(dy, jax.custom_derivatives.SymbolicZero):
            dy = jnp.zeros(dy.shape, dy.dtype)
        dy = dy.astype(jnp.float32)
        if act is not None:
            dy = jax.vjp(lambda z: activate(z, act), z)[1](dy)[0]
        dx, dvalues, dres = _backward_xla(x2, p, dy)
        # Index arrays get float0 zeros; values, residue values and the dense cache real ones.
        dp = dataclasses.replace(
            jax.tree.map(lambda a: np.zeros(np.shape(a), jax.dtypes.float0)
                         if jnp.issubdtype(jnp.result_type(a), jnp.integer) else None, p),
            values=dvalues.astype(jnp.result_type(p.values)),
            residue_values=dres.astype(jnp.result_type(p.residue_values)),
            dense=None if p.dense is None else jnp.zeros_like(p.dense))
        return dx.astype(x2.dtype), dp, (None if bias is None else jnp.sum(dy, axis=0))

    matmul.defvjp(fwd, bwd, symbolic_zeros=True)
    return matmul


@functools.partial(jax.jit, static_argnames=("name", "exact", "activation", "f32"))
def _matmul(x2, packed, bias, *, name, exact, activation, f32=False):
    """Jitted, so an eager call dispatches one compiled computation (cached per shapes and
    static sizes) instead of each small op of the platform switch and the custom_vjp."""
    return _make_matmul(name, exact, activation, f32)(x2, packed, bias)


def exact_f32(precision: Any = None) -> bool:
    """Whether ``precision`` (as ``jnp.dot`` takes it; None: JAX's default matmul precision)
    asks for exact IEEE f32 products (``Precision.HIGHEST``), which on a GPU rules out TF32
    tensor cores. Raises ValueError for a value ``jnp.dot`` would not take."""
    if precision is None:
        precision = jax.config.jax_default_matmul_precision
        if precision is None:
            return False
        try:  # the config also takes names of dot algorithms: those are not exact f32 here
            return jax.lax.Precision(precision) == jax.lax.Precision.HIGHEST
        except ValueError:
            return False
    values = precision if isinstance(precision, (tuple, list)) else (precision,)
    try:
        return len(values) in (1, 2) and all(
            jax.lax.Precision(v) == jax.lax.Precision.HIGHEST for v in values)
    except ValueError:
        raise ValueError(f"precision must be None, a jax.lax.Precision (or its name) or a pair of "
                         f"them, got {precision!r}") from None


def tw_matmul(x: Any, packed: PackedTiles, bias: Any = None, *, backend: str | None = None,
              precision: Any = None, activation: str | None = None,
              preferred_element_type: Any = None) -> jax.Array:
    """``activation(x @ unpack(packed) + bias)`` over packed tiles.

    ``x`` is ``(..., K)`` (leading dims are flattened into M), float32 or bfloat16 like the
    packed values; the result is ``(..., N)`` in the same dtype (``preferred_element_type``:
    None, x's dtype or float32, as ``jnp.dot`` takes it: in that dtype), accumulated in float32.
    ``precision`` is honoured as ``jnp.dot`` honours it: float32 products on a GPU run on TF32
    tensor cores by default, and in exact IEEE float32 only under ``Precision.HIGHEST`` (or
    with that as JAX's default matmul precision); the host kernel is always exact.
    ``activation`` (None, ``'relu'`` or ``'gelu'``, see :func:`activate`) is applied in float32
    after the bias, fused into the host kernel's epilogue (no pass of XLA over the output).
    Pruned weights are absent, not zeros: a NaN or infinity in a row of ``x`` reaches only the
    outputs of that row whose kept weights (tiles or residue) read its K index, on the
    ``'cpu'``, ``'pallas'`` and ``'xla'`` backends (and by construction on ``'cuda'``, which
    loads zeros past a tile's depth; not yet run on a GPU). The dense dot
    (``backend='dense'``, and the automatic choice for layers kept dense, see
    ``packing.DENSE_ABOVE``) spreads it over the whole row, as ``x @ unpack(packed)`` does
    (0 * NaN is NaN). Finite inputs give the same sums either way.

    >>> import numpy as np
    >>> from jax_tw import packing, patterns
    >>> w = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    >>> [mask] = patterns.TW2D()([np.abs(w)], 0.5, tile_size=4)
    >>> p = packing.pack(w, mask, tile_size=4)
    >>> x = np.ones((2, 16), np.float32)
    >>> np.allclose(tw_matmul(x, p, backend='xla'), x @ packing.unpack(p), atol=1e-5)
    True
    """
    if not isinstance(packed, PackedTiles):
        raise ValueError(f"packed must be jax_tw.packing.PackedTiles, got {type(packed).__name__}")
    # Shapes and dtypes only: reading the indices would copy device arrays to the host on every
    # eager call. Tiles are validated where they are made (pack) and loaded (load); the host
    # kernel checks every index again, the CUDA kernel clamps them.
    packing.check_shapes(packed)
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != packed.k:
        raise ValueError(f"x must have shape (..., K={packed.k}), got {x.shape}")
    if x.dtype != packed.dtype:
        raise ValueError(f"x dtype {x.dtype} must match the packed values' dtype {packed.dtype}")
    name = _choose(backend, packed)
    exact = exact_f32(precision)
    activation = check_activation(activation)
    try:
        out = np.dtype(x.dtype if preferred_element_type is None else preferred_element_type)
    except TypeError:
        out = None
    if out not in (x.dtype, np.float32):
        raise ValueError(f"preferred_element_type must be None, x's dtype ({x.dtype}) or float32, "
                         f"got {preferred_element_type!r}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, packed.k)
    # Under shard_map, replicated tiles meet a batch-sharded x: make them varying like x so the
    # custom_vjp's cotangents type-check (the transpose of this cast sums d(values) over shards).
    leaves, tree = jax.tree.flatten(packed)
    packed = jax.tree.unflatten(tree, _ffi.make_varying(
        [jnp.asarray(a) for a in leaves], jax.typeof(x2).manual_axis_type.varying))
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.shape != (packed.n,) or not jnp.issubdtype(bias.dtype, jnp.floating):
            raise ValueError(f"bias must be a float array of shape ({packed.n},), got {bias.dtype} {bias.shape}")
        [bias] = _ffi.make_varying([bias.astype(jnp.float32)], jax.typeof(x2).manual_axis_type.varying)
    y = _matmul(x2, packed, bias, name=name, exact=exact, activation=activation,
                f32=out != x.dtype)
    return y.reshape(*lead, packed.n)
