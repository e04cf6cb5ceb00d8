"""Tile-wise sparsity for unmodified linen models: ``nn.Dense`` and ``nn.DenseGeneral`` layers.

A model built from Flax's own layers (``nn.Dense``, ``nn.DenseGeneral``, and so the Q/K/V/out
projections of ``nn.MultiHeadDotProductAttention``) is pruned and packed without editing its
code: the calls of those layers are intercepted (``flax.linen.intercept_methods``) and read the
same ``tw_mask`` and ``tw_packed`` collections that :class:`jax_tw.nn.TWDense` reads, at the
layers' own module paths. Everything else is shared with ``TWDense``: :func:`jax_tw.prune.step`,
:func:`jax_tw.packing.pack_variables`, :func:`jax_tw.ops.tw_matmul`.

* :func:`init` adds a ``tw_mask`` entry (keep everything) for every selected layer, chosen by
  its module path, e.g. ``layers=lambda path: path[-1] in ('query', 'key', 'value', 'out')``.
* :func:`apply` is ``model.apply`` with the interception on: given ``tw_mask``, a layer uses its
  masked kernel; given ``tw_packed`` (from ``pack_variables``), it runs ``tw_matmul``; layers
  with neither run as they are. :func:`tile_wise` is the same interception as a context manager.

A ``DenseGeneral`` kernel is pruned and packed as the (K, N) matrix it multiplies as: K the
product of the contracted input dims (``axis``), N of the output ``features``. ``batch_dims``
are not supported.

>>> import jax, jax.numpy as jnp
>>> from flax import linen as nn
>>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
>>> variables = init(model, jax.random.key(0), jnp.ones((1, 8)), tile_size=4)
>>> jax.tree.map(jnp.shape, variables['tw_mask'])['layers_0']
{'columns': (16,), 'rows': (4, 8), 'tile_size': (4,)}
>>> bool((apply(model, variables, jnp.ones((1, 8))) == model.apply(variables, jnp.ones((1, 8)))).all())
True
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Iterator

import jax.numpy as jnp
from flax import linen as nn
from flax.linen import dtypes as linen_dtypes
from jax import lax

from jax_tw import nn as twnn
from jax_tw import packing, patterns

__all__ = ["init", "apply", "tile_wise", "LAYER_TYPES"]

LAYER_TYPES = (nn.Dense, nn.DenseGeneral)
MASK = twnn.MASK_COLLECTION


def _all_layers(path: tuple) -> bool:
    return True


def init(model: nn.Module, rngs: Any, *args: Any, tile_size: int = 128,
         layers: Callable[[tuple], bool] = _all_layers, variables: Any = None,
         **kwargs: Any) -> dict:
    """``model.init(rngs, *args, **kwargs)`` plus a ``tw_mask`` collection that keeps every
    weight of the selected ``nn.Dense`` / ``nn.DenseGeneral`` layers.

    ``layers`` chooses them by module path (a tuple of str, e.g. ``('block', 'attn',
    'query')``); by default every such layer. ``variables``: an existing model's variables
    (pretrained weights, say) to add the masks to instead of initialising new params: the model
    runs once on ``args`` (``rngs``, a dict of keys such as ``{'dropout': key}``, or None, is
    passed to that call), and only the new ``tw_mask`` collection is taken from it; the other
    collections (``params``, ``batch_stats``...) come back as they were given. Raises
    ValueError when no layer is selected.
    """
    tile_size = patterns.check_tile_size(tile_size)
    if not callable(layers):
        raise ValueError(f"layers must be a callable on module paths, got {layers!r}")
    selected: set[tuple] = set()  # paths of the layers the filter chose, as the calls saw them
    with nn.intercept_methods(functools.partial(_interceptor, create=(tile_size, layers, selected))):
        if variables is None:
            out = dict(model.init(rngs, *args, **kwargs))
        else:
            # Every collection mutable, so that layers which update state in this call
            # (BatchNorm's batch_stats in training mode) run; only the masks are kept.
            _, new = model.apply(variables, *args, rngs=rngs, mutable=True, **kwargs)
            out = dict(variables)
            if MASK in new:
                out[MASK] = new[MASK]
    lost = sorted("/".join(p) for p in selected - set(patterns.layer_masks(out.get(MASK, {}))))
    if lost:
        raise ValueError(
            f"the masks of the layers {lost} were made but did not come out of the model: they "
            "run inside a lifted transform (nn.scan, nn.vmap...) that does not carry the "
            f"'{MASK}' collection; add '{MASK}': 0 to its variable_axes (prune.step then prunes "
            "each copy as a layer; stacked layers are not packed)")
    if not out.get(MASK):
        raise ValueError("no nn.Dense or nn.DenseGeneral layer of the model was selected by "
                         "the layers filter: nothing to prune")
    return out


def apply(model: nn.Module, variables: Any, *args: Any, **kwargs: Any) -> Any:
    """``model.apply(variables, *args, **kwargs)`` with its ``nn.Dense`` / ``nn.DenseGeneral``
    layers tile-wise: masked by the ``tw_mask`` collection or run over the ``tw_packed`` tiles
    of ``variables``, each at its module path."""
    with tile_wise():
        return model.apply(variables, *args, **kwargs)


@contextlib.contextmanager
def tile_wise() -> Iterator[None]:
    """Within it, ``nn.Dense`` and ``nn.DenseGeneral`` calls read ``tw_mask`` / ``tw_packed``."""
    with nn.intercept_methods(_interceptor):
        yield


def _contracted_axes(module: nn.Module) -> tuple:
    """The input axes a Dense / DenseGeneral layer contracts (its kernel's leading dims)."""
    if not isinstance(module, nn.DenseGeneral):
        return (-1,)
    if module.batch_dims:
        where = "/".join(module.path) or type(module).__name__
        raise ValueError(f"{where}: DenseGeneral with batch_dims={module.batch_dims} is not "
                         "supported by jax_tw (its kernel is not one matrix)")
    return module.axis if isinstance(module.axis, tuple) else (module.axis,)


def _matrix_shape(module: nn.Module, kernel_shape: tuple) -> tuple[int, int]:
    """(K, N) of a Dense / DenseGeneral kernel: the matrix it multiplies as."""
    n_in = len(_contracted_axes(module))
    return math.prod(kernel_shape[:n_in]), math.prod(kernel_shape[n_in:])


def _interceptor(next_fun, args, kwargs, context, create=None):
    """``create``: (tile_size, layers filter, set of the selected layers' paths) while
    :func:`init` adds masks, else None."""
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, LAYER_TYPES):
        return next_fun(*args, **kwargs)
    if module.has_variable(packing.PACKED_COLLECTION, "tiles"):
        return _packed_call(module, *args, **kwargs)
    if module.has_variable(MASK, "columns"):
        return _masked_call(module, *args, **kwargs)
    out = next_fun(*args, **kwargs)
    if create is not None and create[1](module.path):
        create[2].add(tuple(module.path))  # (a lifted transform may drop what is put here)
        if module.is_mutable_collection(MASK):
            k, n = _matrix_shape(module, jnp.shape(_param(module, "kernel")))
            for key, value in patterns.keep_all(k, n, create[0]).items():
                module.put_variable(MASK, key, value)
    return out


def _param(module: nn.Module, name: str) -> Any:
    """The layer's param ``name`` (None if it has none), unboxed where it was made with
    ``nn.with_partitioning`` or other axis metadata, as ``module.param`` reads it."""
    if not module.has_variable("params", name):
        return None
    return nn.meta.unbox(module.get_variable("params", name))


def _masked_call(module: nn.Module, inputs: Any) -> Any:
    """The layer's own computation on its masked kernel: an unbound copy of the layer applied
    to the masked params (so the result is the layer's, bit for bit, when nothing is pruned)."""
    where = "/".join(module.path) or type(module).__name__
    params = {"kernel": _param(module, "kernel")}
    if module.has_variable("params", "bias"):
        params["bias"] = _param(module, "bias")
    kernel = params["kernel"]
    k, n = _matrix_shape(module, jnp.shape(kernel))
    keys = [key for key in ("columns", "rows", patterns.TILE_KEY, "elements")
            if module.has_variable(MASK, key)]
    mask = {key: module.get_variable(MASK, key) for key in keys}
    patterns.check_layer_mask(mask, k, n, where=where)
    keep = patterns.dense_mask(mask).reshape(jnp.shape(kernel))
    params["kernel"] = jnp.where(keep, kernel, jnp.zeros((), kernel.dtype))
    return module.clone(parent=None).apply({"params": params}, inputs)


def _packed_call(module: nn.Module, inputs: Any) -> Any:
    """The layer over its packed tiles: the contracted dims of ``inputs`` moved last and
    flattened into K, the output's feature dims flattened into N."""
    where = "/".join(module.path) or type(module).__name__
    twnn.refuse_custom_hooks(where, (
        ("dot_general", module.dot_general_cls or module.dot_general, (None, lax.dot_general)),
        ("promote_dtype", getattr(module, "promote_dtype", None), (None, linen_dtypes.promote_dtype))))
    tiles = module.get_variable(packing.PACKED_COLLECTION, "tiles")
    bias = _param(module, "bias")
    inputs = jnp.asarray(inputs)
    if isinstance(module, nn.DenseGeneral):
        # Sorted, as Flax sorts them: the kernel's leading dims follow the inputs' axis order,
        # whatever order ``axis`` names them in.
        axes = tuple(sorted(a % inputs.ndim for a in _contracted_axes(module)))
        features = module.features if isinstance(module.features, tuple) else (module.features,)
        inputs = jnp.moveaxis(inputs, axes, tuple(range(inputs.ndim - len(axes), inputs.ndim)))
        lead = inputs.shape[:inputs.ndim - len(axes)]
        x2 = inputs.reshape(*lead, -1)
        n = math.prod(features)
        bias = None if bias is None else jnp.reshape(bias, (n,))
        y = twnn.packed_dense(x2, tiles, bias, n, module.dtype, where, module.precision)
        return y.reshape(*lead, *features)
    return twnn.packed_dense(inputs, tiles, bias, module.features, module.dtype, where,
                             module.precision)
