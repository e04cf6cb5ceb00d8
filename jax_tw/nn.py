"""Flax layers that carry a tile-wise mask."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn
from flax.linen import initializers
from flax.linen.dtypes import promote_dtype
from flax.typing import Dtype, Initializer, PrecisionLike
from jax import lax

from jax_tw import ops, packing, patterns

__all__ = ["TWDense", "MASK_COLLECTION", "packed_dense"]

MASK_COLLECTION = "tw_mask"

default_kernel_init = initializers.lecun_normal()


class TWDense(nn.Module):
    """A :class:`flax.linen.Dense` whose kernel carries a tile-wise mask.

    The mask lives in the ``tw_mask`` variable collection as a layer mask (see
    :mod:`jax_tw.patterns`): ``columns`` (N,), ``rows`` (ceil(N / tile_size), K) and
    ``tile_size`` (an all-False (tile_size,) array that carries G in its shape), initialised to keep every
    weight; an ``elements`` (K, N) mask joins them where a pattern with a residue (TEW, EW, VW,
    BW) prunes the layer. The forward pass uses only kept
    weights: a pruned weight has no effect on the output, whatever its stored value. Unpruned,
    the layer equals ``nn.Dense`` bit for bit with the same params.

    Given the ``tw_packed`` collection instead (from :func:`jax_tw.packing.pack_variables`), the
    same layer runs over packed tiles with :func:`jax_tw.ops.tw_matmul` (its kernel param is
    then neither needed nor read).

    >>> import jax, jax.numpy as jnp
    >>> layer = TWDense(features=6, tile_size=4)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 5)))
    >>> jax.tree.map(jnp.shape, variables)
    {'params': {'bias': (6,), 'kernel': (5, 6)}, 'tw_mask': {'columns': (6,), 'rows': (2, 5), 'tile_size': (4,)}}
    >>> y = layer.apply(variables, jnp.ones((2, 5)))  # pass both collections

    Attributes:
      features: the number of output features (N).
      use_bias: whether to add a bias to the output.
      dtype: the dtype of the computation (default: inferred from input and params).
      param_dtype: the dtype passed to parameter initializers.
      precision: numerical precision of the computation, see ``jax.lax.Precision``.
      kernel_init: initializer for the (K, N) kernel.
      bias_init: initializer for the bias.
      tile_size: G, the number of kept output columns per tile (default 128).
      activation: None, ``'relu'`` or ``'gelu'`` (exact, erf: ``nn.gelu(approximate=False)``),
        applied to the output (see :func:`jax_tw.ops.activate`). Over packed tiles the host
        kernel applies it as it writes the output, instead of a pass of XLA over it.
    """

    features: int
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = initializers.zeros_init()
    tile_size: int = 128
    activation: str | None = None

    @nn.compact
    def __call__(self, inputs: Any) -> Any:
        """Applies ``activation(inputs @ (kernel * mask) + bias)`` along the last dimension of ``inputs``."""
        tile_size = patterns.check_tile_size(self.tile_size)
        ops.check_activation(self.activation)
        k, n = jnp.shape(inputs)[-1], self.features
        packed = self.has_variable(packing.PACKED_COLLECTION, "tiles")
        if not packed:  # created before the bias, as in nn.Dense (params draw rngs in order)
            kernel = self.param("kernel", self.kernel_init, (k, n), self.param_dtype)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (n,), self.param_dtype)
        else:
            bias = None
        if packed:
            return self._packed(inputs, bias)
        mask = self.layer_mask(k)
        kernel = jnp.where(patterns.dense_mask(mask, tile_size), kernel, jnp.zeros((), kernel.dtype))
        inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = lax.dot_general(
            inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return ops.activate(y, self.activation)

    def _packed(self, inputs: Any, bias: Any) -> Any:
        """Inference over packed tiles (the variables came from ``packing.pack_variables``)."""
        tiles = self.get_variable(packing.PACKED_COLLECTION, "tiles")
        where = "/".join(self.path) or type(self).__name__
        return packed_dense(inputs, tiles, bias, self.features, self.dtype, where, self.precision,
                            self.activation)

    def layer_mask(self, k: int) -> patterns.LayerMask:
        """Reads (or, when initialising, creates) this layer's ``tw_mask`` entry."""
        where = "/".join(self.path) or type(self).__name__
        if not self.is_initializing() and not self.has_variable(MASK_COLLECTION, "columns"):
            raise ValueError(
                f"{where}: TWDense needs its '{MASK_COLLECTION}' collection; apply the model with "
                f"model.apply({{'params': params, '{MASK_COLLECTION}': masks}}, x), where masks come "
                "from model.init(...) or jax_tw.prune.masks(opt_state)")
        init = lambda key: patterns.keep_all(k, self.features, self.tile_size)[key]
        keys = ("columns", "rows", patterns.TILE_KEY)
        if not self.is_initializing() and not self.has_variable(MASK_COLLECTION, patterns.TILE_KEY):
            keys = keys[:2]  # a mask built without its tile-size marker: checked against ours
        mask = {key: self.variable(MASK_COLLECTION, key, init, key).value for key in keys}
        if self.has_variable(MASK_COLLECTION, "elements"):  # a pattern with a residue made it
            mask["elements"] = self.get_variable(MASK_COLLECTION, "elements")
        patterns.check_layer_mask(mask, k, self.features, self.tile_size, where=where)
        return mask


def refuse_custom_hooks(where: str, hooks: Any) -> None:
    """Raises a ValueError naming the first of a layer's product hooks that is not a default:
    ``hooks`` are (name, hook, defaults) triples, e.g. ``('dot_general', hook, (None,
    lax.dot_general))``. A packed call runs tw_matmul, which does the product and its dtypes
    itself, so a custom hook (a quantized product, say) would otherwise be ignored."""
    for name, hook, defaults in hooks:
        if not any(hook is d for d in defaults):
            raise ValueError(
                f"{where}: this layer has its own {name} ({hook!r}), which packed tiles cannot "
                "run: tw_matmul does the product and its dtypes itself. Keep it masked, or drop "
                f"the custom {name}")


def packed_dense(inputs: Any, tiles: Any, bias: Any, features: int, dtype: Any, where: str,
                 precision: Any = None, activation: str | None = None,
                 preferred_element_type: Any = None) -> Any:
    """``activation(inputs @ W + bias)`` over the packed tiles of a (K, ``features``) kernel W, for a dense
    layer of dtype ``dtype`` (None: the promoted dtype of ``inputs``, the packed weights and
    ``bias``, as ``nn.Dense`` promotes its inputs, kernel and bias): the packed path shared by
    :class:`TWDense`, :class:`jax_tw.nnx.TWLinear` and :mod:`jax_tw.intercept`. ``inputs`` is
    ``(..., K)``, ``bias`` (features,) or None; ``precision``, ``activation`` and
    ``preferred_element_type`` (the result's dtype, if given) are the layer's (see
    :func:`jax_tw.ops.tw_matmul`).

    The inputs are cast to the tiles' dtype: bfloat16 tiles (a model whose params were cast to
    bfloat16, or ``pack_variables(dtype=jnp.bfloat16)``) compute in bfloat16 also where the
    inputs are float32, and the result is then cast to the promoted float32 (``nn.Dense``
    with bfloat16 params and float32 inputs and no ``dtype`` would compute in float32)."""
    k = jnp.shape(inputs)[-1]
    if not isinstance(tiles, packing.PackedTiles) or (tiles.k, tiles.n) != (k, features):
        got = (tiles.k, tiles.n) if isinstance(tiles, packing.PackedTiles) else type(tiles).__name__
        raise ValueError(f"{where}: packed tiles are for a kernel {got}, expected {(k, features)}")
    out_dtype = dtype or jnp.result_type(inputs, tiles.dtype, *(() if bias is None else (bias,)))
    if preferred_element_type is not None:  # the product's dtype; the bias then promotes it
        out_dtype = jnp.result_type(preferred_element_type, *(() if bias is None else (out_dtype,)))
    # The bias goes into tw_matmul, which adds it in float32 before the one rounding (fused into
    # the kernel on the cpu, cuda and pallas backends), to float32 where the result is float32.
    f32 = jnp.dtype(out_dtype) == jnp.float32
    return ops.tw_matmul(jnp.asarray(inputs).astype(tiles.dtype), tiles, bias, precision=precision,
                         activation=activation,
                         preferred_element_type=jnp.float32 if f32 else None).astype(out_dtype)
