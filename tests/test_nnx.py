import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

from jax_tw import nnx as twnnx
from jax_tw import packing, patterns, prune
from jax_tw.nn import TWDense
from twcheck import (DENSE_LAYER_CONFIGS, assert_tile_structure, dense_reference, rounding_dot_general,
                     runnable_backends)

G = 8

@pytest.mark.parametrize("shape_in,features,g,kw", DENSE_LAYER_CONFIGS)
def test_unpruned_equals_nnx_linear_bit_for_bit(shape_in, features, g, kw):
    x = jax.random.normal(jax.random.key(0), shape_in)
    layer = twnnx.TWLinear(shape_in[-1], features, tile_size=g, rngs=nnx.Rngs(1), **kw)
    ref = nnx.Linear(shape_in[-1], features, rngs=nnx.Rngs(1), **kw)
    # Same params: names, shapes, dtypes and values (the same random draws).
    want, got = nnx.to_pure_dict(nnx.state(ref, nnx.Param)), nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # Random params (not the init's), set in both layers: the same output, eager and jitted.
    rng = np.random.default_rng(2)
    for var in (layer, ref):
        var.kernel[...] = jnp.asarray(rng.normal(size=(shape_in[-1], features)), var.kernel.dtype)
    if kw.get("use_bias", True):
        layer.bias[...] = ref.bias[...] = jnp.asarray(rng.normal(size=(features,)), ref.bias.dtype)
    ref.kernel[...] = layer.kernel[...]
    out, want_out = layer(x), ref(x)
    assert out.dtype == want_out.dtype and out.shape == want_out.shape
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want_out))
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, x: m(x))(layer, x)),
                                  np.asarray(nnx.jit(lambda m, x: m(x))(ref, x)))


class MLP(nnx.Module):
    def __init__(self, rngs, k_in=24, hidden=48, dtype=None):
        self.fc1 = twnnx.TWLinear(k_in, hidden, tile_size=G, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([twnnx.TWLinear(hidden, 40, tile_size=G, dtype=dtype, rngs=rngs)])
        self.head = nnx.Linear(40, 4, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.fc1(x))
        x = nnx.relu(self.blocks[0](x))
        return self.head(x)


class LinenMLP(nn.Module):
    """The same network as MLP with linen TWDense layers (for the linen-vs-NNX comparison)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(TWDense(48, tile_size=G, name="fc1")(x))
        x = nn.relu(TWDense(40, tile_size=G, name="blocks_0")(x))
        return nn.Dense(4, name="head")(x)


def test_masks_in_their_own_variable_type():
    model = MLP(nnx.Rngs(0))
    masks = nnx.to_pure_dict(nnx.state(model, twnnx.TWMask))
    assert jax.tree.map(jnp.shape, masks) == {
        "fc1": {"columns": (48,), "rows": (6, 24)}, "blocks": {0: {"columns": (40,), "rows": (5, 48)}}}
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert set(params["fc1"]) == {"kernel", "bias"} and set(params["head"]) == {"kernel", "bias"}
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    shapes = {np.shape(a) for a in jax.tree.leaves(nnx.state(optimizer))}
    assert (6, 24) not in shapes and (5, 48) not in shapes  # no optimizer state for the masks
    # The linen-format view that prune.step reads: str keys, the tile-size marker rebuilt.
    view = twnnx.masks(model)
    assert set(view) == {"fc1", "blocks"} and set(view["blocks"]) == {"0"}
    assert np.shape(view["fc1"]["tile_size"]) == (G,)


@pytest.mark.parametrize("pattern", [patterns.TW2D(), patterns.TEW(residue=0.05), patterns.EW()])
def test_pruned_layer_matches_masked_reference(pattern):
    k, n, g = 24, 20, 4
    rng = np.random.default_rng(0)
    [mask] = pattern([rng.random((k, n)).astype(np.float32)], 0.6, tile_size=g)
    mask = jax.tree.map(np.asarray, mask)
    dense = dense_reference(mask, g)
    assert 0 < dense.sum() < dense.size
    layer = twnnx.TWLinear(k, n, tile_size=g, rngs=nnx.Rngs(0))
    layer.set_mask(mask)
    x = rng.normal(size=(3, 5, k)).astype(np.float32)
    w = np.asarray(layer.kernel[...], np.float64) * dense
    want = x.astype(np.float64) @ w + np.asarray(layer.bias[...], np.float64)
    np.testing.assert_allclose(np.asarray(layer(x)), want, rtol=1e-5, atol=1e-5)
    before = np.asarray(layer(x))
    layer.kernel[...] = jnp.where(dense, layer.kernel[...], 1e6)  # pruned weights have no effect
    np.testing.assert_array_equal(np.asarray(layer(x)), before)


def _train_nnx(pattern, score, steps=12, sparsity=0.75):
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(steps, 32, 24)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 4, (steps, 32)))
    model = MLP(nnx.Rngs(0))
    init_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = optax.chain(optax.adam(1e-2), prune.step(model, prune.cubic(sparsity, 2, 8), pattern=pattern,
                                                  update_every=2, score=score))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    twnnx.set_masks(model, prune.masks(optimizer))  # the element masks a residue pattern needs

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        grads = nnx.grad(loss_fn)(model)
        optimizer.update(model, grads, taylor_grads=grads)
        twnnx.set_masks(model, prune.masks(optimizer))

    history = []
    for t in range(steps):
        train_step(model, optimizer, xs[t], ys[t])
        history.append({"/".join(p): np.asarray(patterns.dense_mask(m))
                        for p, m in patterns.layer_masks(twnnx.masks(model)).items()})
    return model, optimizer, history, init_params, (xs, ys)


@pytest.mark.parametrize("pattern,score", [(patterns.TW2D(), "magnitude"), (patterns.TW2D(), "taylor"),
                                           (patterns.TEW(residue=0.05), "taylor")])
def test_prune_with_nnx_optimizer(pattern, score):
    model, optimizer, history, _, _ = _train_nnx(pattern, score)
    report = prune.sparsity(model)
    assert report.total == pytest.approx(0.75, abs=0.01)
    assert prune.sparsity(optimizer).total == report.total
    for before, after in zip(history, history[1:]):  # masks only grow
        for name in before:
            assert not (after[name] & ~before[name]).any(), f"{name}: a pruned weight came back"
    kernels = {"fc1": model.fc1.kernel[...], "blocks/0": model.blocks[0].kernel[...]}
    for name, keep in history[-1].items():
        assert (np.asarray(kernels[name])[~keep] == 0).all(), f"{name}: a pruned weight is not zero"
    if not pattern.has_elements:
        for layer in (model.fc1, model.blocks[0]):
            assert_tile_structure(jax.tree.map(np.asarray, layer.mask()), G)


def test_nnx_training_prunes_like_linen():
    """The NNX path (TWLinear, nnx.Optimizer, set_masks) makes the masks the linen path
    (TWDense, optax, prune.masks) makes from the same weights and data, Taylor scores included."""
    model, _, _, init_params, (xs, ys) = _train_nnx(patterns.TW2D(), "taylor")
    linen = LinenMLP()
    params = {"fc1": init_params["fc1"], "blocks_0": init_params["blocks"][0], "head": init_params["head"]}
    variables = linen.init(jax.random.key(0), xs[0])
    tx = optax.chain(optax.adam(1e-2), prune.step(variables["tw_mask"], prune.cubic(0.75, 2, 8),
                                                  update_every=2, score="taylor"))
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, x, y):
        loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
            linen.apply({"params": p, "tw_mask": prune.masks(opt_state)}, x), y).mean()
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params, grads=grads)
        return optax.apply_updates(params, updates), opt_state

    for t in range(len(xs)):
        params, opt_state = train_step(params, opt_state, xs[t], ys[t])
    want = prune.masks(opt_state)
    for name, layer in (("fc1", model.fc1), ("blocks_0", model.blocks[0])):
        for key in ("columns", "rows"):
            np.testing.assert_array_equal(np.asarray(layer.mask()[key]), np.asarray(want[name][key]))
        np.testing.assert_allclose(np.asarray(layer.kernel[...]), np.asarray(params[name]["kernel"]),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", runnable_backends(base=("xla",)))
@pytest.mark.parametrize("pattern", [patterns.TW2D(), patterns.TEW(residue=0.05)])
def test_packed_nnx_model_matches_masked(backend, pattern, monkeypatch):
    monkeypatch.setenv("JAX_TW_BACKEND", backend)
    model, _, _, _, (xs, _) = _train_nnx(pattern, "magnitude", steps=9)
    packed = twnnx.pack(model)
    assert model.fc1.tiles is None and model.fc1.kernel is not None  # the model is left as it was
    assert isinstance(packed.fc1.tiles, twnnx.TWPacked) and packed.fc1.kernel is None
    assert set(nnx.to_pure_dict(nnx.state(packed, nnx.Param))["fc1"]) == {"bias"}
    assert not jax.tree.leaves(nnx.state(packed, twnnx.TWMask))
    x = jnp.asarray(xs[0])
    want = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
    with jax.transfer_guard("disallow"):  # the tiles are device arrays, read in place
        got = nnx.jit(lambda m, x: m(x))(packed, x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(packed(x)), want, rtol=1e-5, atol=1e-5)


def test_packed_nnx_bf16_and_state_round_trip():
    model, _, _, _, (xs, _) = _train_nnx(patterns.TW2D(), "magnitude", steps=9)
    ref = np.asarray(model(xs[0]), np.float64)
    bf16 = MLP(nnx.Rngs(0), dtype=jnp.bfloat16)
    nnx.update(bf16, nnx.state(model))
    packed = twnnx.pack(bf16, dtype=jnp.bfloat16)
    assert packed.fc1.tiles.get_value().dtype == jnp.bfloat16
    x = xs[0].astype(jnp.bfloat16)
    xla_bf16 = np.asarray(bf16(x), np.float64)
    got = np.asarray(packed(x), np.float64)
    assert np.abs(got - ref).max() <= 3 * np.abs(xla_bf16 - ref).max() + 1e-3
    # The packed state as arrays only and back, into a fresh model: exactly the same outputs.
    state = packing.from_arrays(packing.to_arrays(nnx.to_pure_dict(nnx.state(packed))))
    fresh = twnnx.load_packed(MLP(nnx.Rngs(7), dtype=jnp.bfloat16), state)
    call = nnx.jit(lambda m, x: m(x))
    with jax.transfer_guard("disallow"):
        restored = call(fresh, x)
    np.testing.assert_array_equal(np.asarray(restored), np.asarray(call(packed, x)))
    np.testing.assert_array_equal(np.asarray(fresh(x), np.float64), got)


def test_packed_layer_keeps_preferred_element_type():
    """TWLinear(dtype=bf16, preferred_element_type=float32) returns float32 packed as unpacked:
    the kernel's float32 sums, not a bf16 result widened."""
    rng = np.random.default_rng(4)
    layer = twnnx.TWLinear(32, 24, tile_size=G, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                           preferred_element_type=jnp.float32, rngs=nnx.Rngs(0))
    layer.kernel[...] = jnp.asarray(rng.normal(size=(32, 24)), jnp.bfloat16)
    layer.bias[...] = jnp.asarray(rng.normal(size=24), jnp.bfloat16)
    x = jnp.asarray(rng.normal(size=(5, 32)), jnp.bfloat16)
    want = np.asarray(x, np.float64) @ np.asarray(layer.kernel[...], np.float64) + np.asarray(layer.bias[...], np.float64)
    masked = layer(x)
    packed = twnnx.pack(layer)(x)
    assert masked.dtype == packed.dtype == jnp.float32
    for y in (masked, packed):
        np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-5, atol=1e-5)
    # The result's dtype is nnx.Linear's for each combination: the product's, promoted by the bias.
    x = jnp.asarray(rng.normal(size=(3, 16)), jnp.float32)
    for kw in (dict(preferred_element_type=jnp.bfloat16), dict(preferred_element_type=jnp.bfloat16, use_bias=False),
               dict(param_dtype=jnp.bfloat16, preferred_element_type=jnp.bfloat16),
               dict(dtype=jnp.bfloat16, preferred_element_type=jnp.float32)):
        ref = nnx.Linear(16, 8, rngs=nnx.Rngs(0), **kw)(x)
        layer = twnnx.TWLinear(16, 8, tile_size=4, rngs=nnx.Rngs(0), **kw)
        for y in (layer(x), twnnx.pack(layer)(x)):
            assert y.dtype == ref.dtype, kw
            np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2)


def test_custom_dot_general_masked_runs_it_packed_refuses_it():
    model = MLP(nnx.Rngs(0))
    model.fc1 = twnnx.TWLinear(24, 48, tile_size=G, dot_general=rounding_dot_general, rngs=nnx.Rngs(1))
    x = 3 * jax.random.normal(jax.random.key(0), (2, 24))
    want = np.round(np.asarray(x)) @ np.round(np.asarray(model.fc1.kernel[...])) + np.asarray(model.fc1.bias[...])
    np.testing.assert_allclose(np.asarray(model.fc1(x)), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="TWLinear fc1: this layer has its own dot_general"):
        twnnx.pack(model)
    model.fc1 = twnnx.TWLinear(24, 48, tile_size=G, promote_dtype=lambda a, dtype=None: a, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="TWLinear fc1: this layer has its own promote_dtype"):
        twnnx.pack(model)
    assert model.fc1.kernel is not None and model.fc1.tiles is None  # the model is left as it was


def test_nnx_bad_input_errors():
    with pytest.raises(ValueError, match="tile_size must be a positive integer, got 0"):
        twnnx.TWLinear(4, 6, tile_size=0, rngs=nnx.Rngs(0))
    model = MLP(nnx.Rngs(0))
    wrong = jax.tree.map(np.asarray, patterns.keep_all(24, 48, 4))  # built for tile_size=4
    with pytest.raises(ValueError, match="fc1: the mask was made for tile_size=4, got tile_size=8"):
        twnnx.set_masks(model, {"fc1": wrong})
    with pytest.raises(ValueError, match=r"names layers the model has no TWLinear at: \['head'\]"):
        twnnx.set_masks(model, {"head": wrong})
    not_bool = dict(twnnx.masks(model)["fc1"], columns=np.ones(48, np.float32))
    with pytest.raises(ValueError, match="'columns' must be boolean, got dtype float32"):
        twnnx.set_masks(model, {"fc1": not_bool})
    packed = twnnx.pack(model)
    with pytest.raises(ValueError, match="this layer is packed"):
        twnnx.set_masks(packed, twnnx.masks(model))
    with pytest.raises(ValueError, match="does not fit the model: missing"):
        twnnx.load_packed(MLP(nnx.Rngs(0)), {"fc1": {"bias": np.zeros(48, np.float32)}})
    tx = prune.step(model, prune.one_shot(0.5), score="taylor")
    optimizer = nnx.Optimizer(model, optax.chain(optax.sgd(0.1), tx), wrt=nnx.Param)
    grads = nnx.grad(lambda m: m(jnp.ones((2, 24))).sum())(model)
    with pytest.raises(ValueError, match="taylor_grads=grads"):
        optimizer.update(model, grads)


@pytest.mark.parametrize("backend", runnable_backends(base=("xla",)))
def test_nnx_activation_packed_or_not(backend, monkeypatch):
    """TWLinear(activation='gelu') is gelu(nnx.Linear) bit for bit with the same params, and
    packed it computes the same (fused into the host kernel's epilogue on 'cpu')."""
    monkeypatch.setenv("JAX_TW_BACKEND", backend)
    layer = twnnx.TWLinear(24, 40, tile_size=8, activation="gelu", rngs=nnx.Rngs(0))
    layer.bias[...] = jax.random.normal(jax.random.key(2), (40,))
    x = jax.random.normal(jax.random.key(0), (16, 24))
    plain = nnx.Linear(24, 40, rngs=nnx.Rngs(0))
    plain.bias[...] = layer.bias[...]
    want = np.asarray(nnx.gelu(plain(x), approximate=False))
    np.testing.assert_array_equal(np.asarray(layer(x)), want)
    assert (want < 0).any()
    np.testing.assert_allclose(np.asarray(twnnx.pack(layer)(x)), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="activation must be one of"):
        twnnx.TWLinear(24, 40, tile_size=8, activation="tanh", rngs=nnx.Rngs(0))


def test_vmap_stacked_layers_prune_and_refuse_packing():
    """TWLinear layers made by nnx.vmap (masks and kernels stacked over a leading axis) and run
    under nnx.scan: prune.step prunes each copy, set_masks writes the stacked masks back, the
    forward pass equals each copy's masked dense layer in turn; packing says why it cannot."""
    copies, width = 3, 24

    class Model(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=copies)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def create(rngs):
                return twnnx.TWLinear(width, width, tile_size=8, rngs=rngs)
            self.layers = create(rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            def body(layer, x):
                return jax.nn.relu(layer(x))
            return body(self.layers, x)

    model = Model(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, width))
    tx = optax.chain(optax.sgd(0.01), prune.step(model, prune.one_shot(0.6),
                                                 pattern=patterns.TEW(residue=0.05), update_every=1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train(model, optimizer):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
        optimizer.update(model, grads)
        twnnx.set_masks(model, prune.masks(optimizer))
    for _ in range(2):
        train(model, optimizer)
    masks = twnnx.masks(model)["layers"]
    assert jnp.shape(masks["elements"]) == (copies, width, width)
    assert jnp.shape(masks[patterns.TILE_KEY]) == (copies, 8)
    kernel, bias, want = np.asarray(model.layers.kernel[...]), np.asarray(model.layers.bias[...]), x
    for i in range(copies):
        dense = np.asarray(patterns.dense_mask({k: v[i] for k, v in masks.items()}))
        assert not kernel[i][~dense].any()  # pruned weights are zero
        want = jax.nn.relu(want @ (kernel[i] * dense) + bias[i])
    np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-5)
    assert abs(prune.sparsity(model).total - 0.6) < 0.03
    with pytest.raises(ValueError, match=r"TWLinear layers: the layer is stacked over leading axes \(3,\)"):
        twnnx.pack(model)
