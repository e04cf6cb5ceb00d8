"""Tile-wise sparsity for Flax NNX: :class:`TWLinear`, a drop-in for ``flax.nnx.Linear``.

A :class:`TWLinear` holds the ``kernel`` and ``bias`` params of ``nnx.Linear`` (same names,
shapes and initial values) plus its layer mask (see :mod:`jax_tw.patterns`) in
:class:`TWMask` variables: ``columns`` (N,), ``rows`` (T, K) and, once a pattern with a residue
prunes it, ``elements`` (K, N). ``nnx.state(model, TWMask)`` selects the masks,
``nnx.state(model, nnx.Param)`` the weights, so ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and
``nnx.grad`` never touch the masks. Each mask variable carries the tile size as metadata.

Pruning during training: :func:`jax_tw.prune.step` takes the model (or ``nnx.state(model,
TWMask)``) and, in an ``optax.chain`` driven by ``nnx.Optimizer``, prunes exactly as for linen;
after each ``optimizer.update``, :func:`set_masks` copies the masks it holds into the model::

    tx = optax.chain(optax.adamw(1e-3), prune.step(model, prune.cubic(0.75, 100, 2000)))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        grads = nnx.grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)     # taylor_grads=grads too for score='taylor'
        jax_tw.nnx.set_masks(model, prune.masks(optimizer))

:func:`pack` turns a trained model into one whose ``TWLinear`` layers run
:func:`jax_tw.ops.tw_matmul` over packed tiles (a :class:`TWPacked` variable replaces the
kernel and the masks). :func:`load_packed` rebuilds such a model from a checkpoint of its state
(:func:`jax_tw.packing.to_arrays` makes that state savable by Orbax).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from flax.nnx.nn import dtypes as nnx_dtypes

from jax_tw import nn as twnn
from jax_tw import ops, packing, patterns

__all__ = ["TWLinear", "TWMask", "TWPacked", "masks", "set_masks", "pack", "load_packed"]

_MASK_KEYS = ("columns", "rows", "elements")


class TWMask(nnx.Variable):
    """A tile-wise mask entry of a :class:`TWLinear` (boolean; metadata ``tile_size`` = G)."""


class TWPacked(nnx.Variable):
    """The packed tiles (:class:`jax_tw.packing.PackedTiles`) of a packed :class:`TWLinear`."""


class TWLinear(nnx.Linear):
    """``flax.nnx.Linear`` whose kernel carries a tile-wise mask.

    Takes the arguments of ``nnx.Linear`` plus ``tile_size`` (G, default 128) and ``activation``
    (None, ``'relu'`` or ``'gelu'``, applied to the output as :class:`jax_tw.nn.TWDense` does), and creates the
    same params with the same values (the same random draws); unpruned it computes exactly what
    ``nnx.Linear`` does. The forward pass uses only kept weights: a pruned weight has no effect
    on the output, whatever its stored value.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = TWLinear(5, 6, tile_size=4, rngs=nnx.Rngs(0))
    >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(layer, TWMask)))
    {'columns': (6,), 'rows': (2, 5)}
    >>> bool((layer(jnp.ones((2, 5))) == nnx.Linear(5, 6, rngs=nnx.Rngs(0))(jnp.ones((2, 5)))).all())
    True
    """

    def __init__(self, in_features: int, out_features: int, *, tile_size: int = 128,
                 activation: str | None = None, **kwargs: Any):
        super().__init__(in_features, out_features, **kwargs)
        self.tile_size = patterns.check_tile_size(tile_size)
        self.activation = ops.check_activation(activation)
        mask = patterns.keep_all(in_features, out_features, self.tile_size)
        self.columns = TWMask(mask["columns"], tile_size=self.tile_size)
        self.rows = TWMask(mask["rows"], tile_size=self.tile_size)
        self.elements = nnx.data(None)  # a TWMask once a pattern with a residue prunes the layer
        self.tiles = nnx.data(None)  # a TWPacked once packed (the kernel and masks are then None)

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        """``activation(inputs @ (kernel * mask) + bias)`` along the last dimension of ``inputs``."""
        bias = self.bias[...] if self.bias is not None else None
        if self.tiles is not None:
            return twnn.packed_dense(inputs, self.tiles.get_value(), bias, self.out_features,
                                     self.dtype, type(self).__name__, self.precision, self.activation,
                                     self.preferred_element_type)
        mask = self.mask()
        kernel = self.kernel[...]
        kernel = jnp.where(patterns.dense_mask(mask), kernel, jnp.zeros((), kernel.dtype))
        # From here on as nnx.Linear.__call__ (flax 0.12).
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        dot_general_kwargs = {"out_sharding": out_sharding}
        if self.preferred_element_type is not None:
            dot_general_kwargs["preferred_element_type"] = self.preferred_element_type
        y = self.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                             precision=self.precision, **dot_general_kwargs)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return ops.activate(y, self.activation)

    def mask(self) -> patterns.LayerMask:
        """This layer's mask as a layer mask (with its ``tile_size`` marker)."""
        if self.tiles is not None:
            raise ValueError("TWLinear: this layer is packed; it has tiles, not a mask")
        mask = {key: getattr(self, key)[...] for key in _MASK_KEYS if getattr(self, key) is not None}
        mask[patterns.TILE_KEY] = _marker(self.tile_size, self._stack())
        return mask

    def _stack(self) -> tuple:
        """The leading axes over which ``nnx.vmap`` stacked copies of this layer (its masks are
        then (..., N) and (..., T, K)); () for a single layer."""
        return patterns.stack_axes({"columns": self.columns[...]})

    def set_mask(self, mask: patterns.LayerMask, where: str = "TWLinear") -> None:
        """Replaces this layer's mask (checked against its kernel shape and tile size)."""
        if self.tiles is not None:
            raise ValueError(f"{where}: this layer is packed; its mask can no longer change")
        stack, own = patterns.check_stack(mask, where), self._stack()
        if stack != own:
            raise ValueError(f"{where}: the mask stacks the layer over leading axes {stack}, but "
                             f"this layer is stacked over {own} (nnx.vmap)")
        first = (0,) * len(stack)  # every copy has the first one's shapes
        patterns.check_layer_mask({key: mask[key][first] for key in mask.keys()} if stack else mask,
                                  self.in_features, self.out_features, self.tile_size, where)
        for key in ("columns", "rows"):
            getattr(self, key)[...] = mask[key]
        if "elements" not in mask:
            self.elements = nnx.data(None)
        elif self.elements is None:
            self.elements = TWMask(jnp.asarray(mask["elements"]), tile_size=self.tile_size)
        else:
            self.elements[...] = mask["elements"]

    def set_packed(self, tiles: packing.PackedTiles, where: str = "TWLinear") -> None:
        """Makes this layer run over ``tiles`` (dropping its kernel and mask)."""
        twnn.refuse_custom_hooks(where, (
            ("dot_general", self.dot_general, (None, jax.lax.dot_general)),
            ("promote_dtype", self.promote_dtype, (None, nnx_dtypes.promote_dtype))))
        packing.check_shapes(tiles)
        if (tiles.k, tiles.n) != (self.in_features, self.out_features):
            raise ValueError(f"{where}: packed tiles are for a kernel {(tiles.k, tiles.n)}, "
                             f"expected {(self.in_features, self.out_features)}")
        self.tiles = TWPacked(tiles)
        self.kernel = nnx.data(None)
        self.columns = self.rows = self.elements = nnx.data(None)


def _name(path: tuple) -> str:
    """A layer's path as error messages name it."""
    return "/".join(path) or "(the root module)"


def _layers(model: nnx.Module):
    """(path as a tuple of str, layer) of every TWLinear in ``model``."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, TWLinear):
            yield tuple(str(p) for p in path), node


def masks(model: Any) -> dict:
    """The masks of an NNX model (or of ``nnx.state(model, TWMask)``) as the layer masks a linen
    ``tw_mask`` collection holds: ``{layer path...: {'columns', 'rows', 'tile_size'[,
    'elements']}}``, plain dicts with str keys, the ``tile_size`` marker rebuilt from the
    variables' metadata. What :func:`jax_tw.prune.step` and :func:`jax_tw.prune.sparsity` read."""
    state = nnx.state(model, TWMask) if isinstance(model, nnx.Module) else model
    flat = {}
    for path, var in nnx.to_flat_state(state):
        if not isinstance(var, TWMask):
            continue
        layer = tuple(str(p) for p in path[:-1])
        g = var.get_metadata().get("tile_size")
        if g is None:
            raise ValueError(f"TWMask {'/'.join(map(str, path))} has no tile_size metadata")
        flat[layer + (str(path[-1]),)] = var.get_value()
        if str(path[-1]) == "columns":  # (..., N): leading axes where nnx.vmap stacked the layer
            flat[layer + (patterns.TILE_KEY,)] = _marker(g, jnp.shape(var.get_value())[:-1])
    return traverse_util.unflatten_dict(flat)


def _marker(tile_size: int, stack: tuple = ()) -> jax.Array:
    """The ``tile_size`` marker of a layer mask, stacked over ``stack`` like the layer."""
    return jnp.broadcast_to(jnp.asarray(patterns.tile_marker(tile_size)), tuple(stack) + (tile_size,))


def set_masks(model: nnx.Module, tw_mask: Any) -> None:
    """Copies layer masks (``prune.masks(optimizer)``, or a :func:`masks` tree) into the model's
    ``TWLinear`` layers, in place; works inside ``nnx.jit``. Layers the tree does not name keep
    their masks; a tree naming a layer the model does not have is refused."""
    given = patterns.layer_masks(tw_mask)
    layers = dict(_layers(model))
    unknown = sorted("/".join(p) for p in set(given) - set(layers))
    if unknown:
        raise ValueError(f"tw_mask names layers the model has no TWLinear at: {unknown}; "
                         f"its TWLinear layers are {sorted('/'.join(p) for p in layers)}")
    for path, mask in given.items():
        layers[path].set_mask(mask, where=f"tw_mask {_name(path)}")


def pack(model: nnx.Module, dtype: Any = None, keep_dense: bool | None = None) -> nnx.Module:
    """A copy of a trained model whose ``TWLinear`` layers run over packed tiles.

    On the host, outside ``jit`` (like :func:`jax_tw.packing.pack`); the model itself is left
    as it is. ``dtype`` (e.g. ``jnp.bfloat16``) casts the packed weights; ``keep_dense`` is
    passed to :func:`jax_tw.packing.pack`. The packed model gives the masked model's
    predictions (up to float rounding).
    """
    packed = nnx.clone(model)
    for path, layer in _layers(packed):
        if layer.tiles is not None:
            continue
        where = f"TWLinear {_name(path)}"
        patterns.check_not_stacked(layer._stack(), where)
        kernel = np.asarray(layer.kernel[...])
        if dtype is not None:
            kernel = kernel.astype(dtype)
        mask = {key: np.asarray(v) for key, v in layer.mask().items()}
        try:
            tiles = packing.pack(kernel, mask, keep_dense=keep_dense)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        layer.set_packed(tiles, where)
    return packed


def load_packed(model: nnx.Module, state: Any) -> nnx.Module:
    """Restores a packed model into ``model`` (a fresh instance of the same class), in place,
    from the pure state of a :func:`pack` result: ``nnx.to_pure_dict(nnx.state(packed))`` or
    what Orbax restores of :func:`jax_tw.packing.to_arrays` of it. Returns ``model``.

    >>> import jax.numpy as jnp
    >>> layer = TWLinear(5, 6, tile_size=4, rngs=nnx.Rngs(0))
    >>> packed = pack(layer)
    >>> state = packing.from_arrays(packing.to_arrays(nnx.to_pure_dict(nnx.state(packed))))
    >>> fresh = load_packed(TWLinear(5, 6, tile_size=4, rngs=nnx.Rngs(1)), state)
    >>> bool((fresh(jnp.ones((1, 5))) == packed(jnp.ones((1, 5)))).all())
    True
    """
    state = packing.from_arrays(state)
    flat = traverse_util.flatten_dict(patterns.plain_dict(state),
                                      is_leaf=lambda _, v: isinstance(v, packing.PackedTiles))
    for path, layer in _layers(model):
        if path + ("tiles",) in flat:
            layer.set_packed(flat[path + ("tiles",)], f"TWLinear {_name(path)}")
    graph_state = nnx.state(model)
    wanted = {tuple(str(p) for p in path) for path, _ in nnx.to_flat_state(graph_state)}
    missing = sorted("/".join(p) for p in wanted - set(flat))
    extra = sorted("/".join(p) for p in set(flat) - wanted)
    if missing or extra:
        raise ValueError(f"the state does not fit the model: missing {missing}, unexpected {extra}")
    for path, var in nnx.to_flat_state(graph_state):
        value = flat[tuple(str(p) for p in path)]
        var.set_value(value if isinstance(value, packing.PackedTiles) else jnp.asarray(value))
    nnx.update(model, graph_state)
    return model
