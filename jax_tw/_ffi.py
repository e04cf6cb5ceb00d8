"""Loads the compiled extensions and registers their XLA FFI targets (once, at import)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CPU_TARGET = "jax_tw_tw_matmul_cpu_v1"

try:
    from jax_tw import _cpu
except ImportError as e:  # built without the extension, or running from a source tree
    _cpu = None
    _cpu_error = f"jax_tw._cpu failed to import: {e}"
else:
    _cpu_error = ""
    for _name, _capsule in _cpu.registrations().items():
        jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")


def cpu_available() -> bool:
    return _cpu is not None


def cpu_import_error() -> str:
    return _cpu_error


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


def cpu_tw_matmul(x2: jax.Array, p) -> jax.Array:
    """The host custom call: (M, K) x packed tiles -> (M, N) float32.

    Under ``jax.shard_map`` the result carries x's varying manual axes (an ``ffi_call`` result
    would otherwise claim to be replicated, and a wrong ``out_specs=P()`` would silently return
    one shard's rows).
    """
    operands = [x2] + [jnp.asarray(a, jnp.int32) for a in (p.columns, p.row_offsets, p.rows)] + [
        jnp.asarray(p.values), jnp.asarray(p.residue_rows, jnp.int32),
        jnp.asarray(p.residue_cols, jnp.int32), jnp.asarray(p.residue_values)]
    axes = jax.typeof(x2).manual_axis_type.varying
    operands = make_varying(operands, axes)
    x_type = jax.typeof(x2)
    out = jax.ShapeDtypeStruct((x2.shape[0], p.n), jnp.float32, sharding=x_type.sharding,
                               manual_axis_type=x_type.manual_axis_type)
    call = jax.ffi.ffi_call(CPU_TARGET, out, vmap_method="sequential")
    return call(*operands, n=np.int64(p.n), tile_size=np.int64(p.tile_size))
