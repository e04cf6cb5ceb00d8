"""Loads the compiled extensions and registers their XLA FFI targets (once, at import)."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np

CPU_TARGET = "jax_tw_tw_matmul_cpu_v3"
# Still registered, for modules exported before v3 (v2: no activation) and v2 (v1: no bias).
CPU_TARGET_V2 = "jax_tw_tw_matmul_cpu_v2"
CPU_TARGET_V1 = "jax_tw_tw_matmul_cpu_v1"
CUDA_TARGET = "jax_tw_tw_matmul_cuda_v2"
# The host custom call's `activation` attribute per activation (Activation in cpu/tw_kernel.h).
ACTIVATION_CODES = {None: 0, "relu": 1, "gelu": 2}

def _load(name: str, platform: str, why: str):
    """Imports the extension ``jax_tw.<name>`` and registers its FFI targets for ``platform``;
    returns (module or None, the import error prefixed with ``why``)."""
    try:
        module = importlib.import_module(f"jax_tw.{name}")
    except ImportError as e:
        return None, f"{why}: {e}"
    for target, capsule in module.registrations().items():
        jax.ffi.register_ffi_target(target, capsule, platform=platform)
    return module, ""


# The CPU module is missing where jax_tw was built without it, or runs from a source tree.
_cpu, _cpu_error = _load("_cpu", "cpu", "jax_tw._cpu failed to import")
# The CUDA module is built only where nvcc was found; it links the CUDA runtime statically, so
# it imports on machines without a GPU (registering a CUDA target there is harmless).
_cuda, _cuda_error = _load("_cuda", "CUDA", "jax_tw._cuda is not built (it needs nvcc and the "
                           "nvidia-cutlass headers)")


def cuda_available() -> bool:
    return _cuda is not None


def cuda_import_error() -> str:
    return _cuda_error


def cpu_available() -> bool:
    return _cpu is not None


def cpu_import_error() -> str:
    return _cpu_error


def cpu_isa() -> str | None:
    """The instruction-set variant the host kernel dispatched to ('generic', 'avx2', 'avx512',
    'avx512-bf16': bf16 by VDPBF16PS, 'avx512-amx': bf16 on AMX tiles), or None without the CPU
    module."""
    return _cpu.isa() if _cpu is not None else None


def make_varying(arrays, axes):
    """Inside shard_map: marks replicated operands as varying over ``axes`` like x, so that the
    custom call's inputs agree (XLA's FFI rule wants one varying-axes type for all of them)."""
    if not axes:
        return list(arrays)
    out = []
    for a in arrays:
        missing = tuple(sorted(axes - jax.typeof(a).manual_axis_type.varying))
        out.append(jax.lax.pcast(a, missing, to="varying") if missing else a)
    return out


def fold_batch(call):
    """Wraps ``call(x2, *operands)`` for ``jax.vmap``: rows of x2 are independent, so batch
    dimensions of x2 fold into its M (one custom call) while the operands are not batched;
    batched operands (different tiles per batch element) run one call per element."""

    @jax.custom_batching.custom_vmap
    def folded(x2, *operands):
        return call(x2, *operands)

    @folded.def_vmap
    def rule(axis_size, in_batched, x2, *operands):
        if not any(in_batched[1:]):
            b, m, k = x2.shape
            y = folded(x2.reshape(b * m, k), *operands)
            return y.reshape(b, m, y.shape[-1]), True
        args = [a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
                for a, batched in zip((x2,) + operands, in_batched)]
        return jax.lax.map(lambda a: folded(*a), tuple(args)), True

    return folded


def cpu_tw_matmul(x2: jax.Array, p, bias: jax.Array | None, out_dtype, activation: str | None = None) -> jax.Array:
    """The host custom call: activation((M, K) x packed tiles (residue included) + bias (N,) f32
    or None) -> (M, N) in ``out_dtype`` (x's dtype, or float32), accumulated in float32;
    ``activation`` is a key of ACTIVATION_CODES.

    Under ``jax.shard_map`` the result carries x's varying manual axes (an ``ffi_call`` result
    would otherwise claim to be replicated, and a wrong ``out_specs=P()`` would silently return
    one shard's rows).
    """
    bias = jnp.zeros((0,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    operands = [x2] + [jnp.asarray(a, jnp.int32) for a in (p.columns, p.row_offsets, p.rows)] + [
        jnp.asarray(p.values), jnp.asarray(p.residue_rows, jnp.int32),
        jnp.asarray(p.residue_cols, jnp.int32), jnp.asarray(p.residue_values), bias]
    axes = jax.typeof(x2).manual_axis_type.varying
    operands = make_varying(operands, axes)
    n, g = np.int64(p.n), np.int64(p.tile_size)
    act = np.int64(ACTIVATION_CODES[activation])

    def call(x2, *operands):
        return jax.ffi.ffi_call(CPU_TARGET, result_type(x2, (x2.shape[0], p.n), out_dtype),
                                vmap_method="sequential")(x2, *operands, n=n, tile_size=g, activation=act)

    return fold_batch(call)(*operands)


def result_type(x2, shape, dtype):
    """A custom call's result typed like x under shard_map (see cpu_tw_matmul)."""
    x_type = jax.typeof(x2)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=x_type.sharding,
                                manual_axis_type=x_type.manual_axis_type)


def cuda_tw_matmul(x2: jax.Array, p, bias: jax.Array, out_dtype, exact_f32: bool = False) -> jax.Array:
    """The CUDA custom call: (M, K) x packed tiles + bias (N,) f32 -> (M, N) in ``out_dtype``
    (x's dtype, or float32). The residue is not part of it. float32 x runs on TF32 tensor cores,
    or with ``exact_f32`` in IEEE f32 on the CUDA cores.

    The call asks XLA for x in column-major layout (each input feature one contiguous M-vector),
    so the kernel's K gather is a contiguous 16-byte load. It needs M and the weight rows in
    whole 16-byte runs: M is padded to a multiple of 8 (bf16) or 4 (f32) rows and the weight
    rows to such a multiple of columns; the padding is sliced off again. x also gains one zero
    column (K + 1 in all), read by the Hopper kernel for a corrupt kept K index. The kernel reads the
    packed format's schedule (tile order, pruned columns and their spans); a layer without
    tiles is its bias, with no call.
    """
    if np.shape(p.columns)[0] == 0:
        return jnp.broadcast_to(jnp.asarray(bias, jnp.float32), (x2.shape[0], p.n)).astype(out_dtype)
    vec = 16 // jnp.dtype(x2.dtype).itemsize
    m = x2.shape[0]
    m_pad = max(vec, -(-m // vec) * vec)
    # One zero feature appended (x has K + 1 columns): the Hopper kernel reads it in place of a
    # kept K index out of range. XLA fuses the padding into the transpose to column-major.
    x2 = jnp.pad(x2, ((0, m_pad - m), (0, 1)))
    values = jnp.asarray(p.values)
    g_pad = -(-p.tile_size // vec) * vec
    if g_pad != p.tile_size:
        values = jnp.pad(values, ((0, 0), (0, g_pad - p.tile_size)))
    pruned = jnp.asarray(p.pruned, jnp.int32)
    if pruned.shape[0] == 0:  # no pruned column: one dummy entry, never read (empty spans)
        pruned = jnp.full((1,), p.n, jnp.int32)
    operands = [x2] + [jnp.asarray(a, jnp.int32) for a in (p.columns, p.row_offsets, p.rows)] + [
        values, jnp.asarray(p.tile_order, jnp.int32), pruned,
        jnp.asarray(p.pruned_offsets, jnp.int32), jnp.asarray(bias, jnp.float32)]
    operands = make_varying(operands, jax.typeof(x2).manual_axis_type.varying)
    n, g, exact = np.int64(p.n), np.int64(p.tile_size), np.int64(bool(exact_f32))

    def call(x2, *operands):
        return jax.ffi.ffi_call(
            CUDA_TARGET, result_type(x2, (x2.shape[0], p.n), out_dtype), vmap_method="sequential",
            # major-to-minor: (1, 0) is column-major for x; the rest in their default layouts
            input_layouts=[(1, 0)] + [None] * len(operands))(x2, *operands, n=n, tile_size=g,
                                                               exact_f32=exact)

    y = fold_batch(call)(*operands)
    return y[:m] if m_pad != m else y
