import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jax_tw import patterns
from jax_tw.nn import TWDense
from twcheck import DENSE_LAYER_CONFIGS, dense_reference

def _random_params(shape_in, features, use_bias, dtype, seed):
    rng = np.random.default_rng(seed)
    p = {"kernel": jnp.asarray(rng.normal(size=(shape_in[-1], features)), dtype)}
    if use_bias:
        p["bias"] = jnp.asarray(rng.normal(size=(features,)), dtype)
    return p


@pytest.mark.parametrize("shape_in,features,g,kw", DENSE_LAYER_CONFIGS)
def test_unpruned_equals_dense_bit_for_bit(shape_in, features, g, kw):
    x = jax.random.normal(jax.random.key(0), shape_in)
    layer = TWDense(features, tile_size=g, **kw)
    variables = layer.init(jax.random.key(1), x)
    dense = nn.Dense(features, **kw)
    ref_vars = dense.init(jax.random.key(1), x)
    # Same initialisers, same param names and shapes, same values.
    assert jax.tree.structure(ref_vars["params"]) == jax.tree.structure(variables["params"])
    for a, b in zip(jax.tree.leaves(ref_vars["params"]), jax.tree.leaves(variables["params"])):
        np.testing.assert_array_equal(a, b)
    params = _random_params(shape_in, features, kw.get("use_bias", True),
                            kw.get("param_dtype", jnp.float32), 2)
    got = layer.apply({"params": params, "tw_mask": variables["tw_mask"]}, x)
    want = dense.apply({"params": params}, x)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    got_jit = jax.jit(layer.apply)({"params": params, "tw_mask": variables["tw_mask"]}, x)
    want_jit = jax.jit(dense.apply)({"params": params}, x)
    np.testing.assert_array_equal(np.asarray(got_jit), np.asarray(want_jit))


def _pruned_layer(k, n, g, sparsity, pattern, seed=0):
    rng = np.random.default_rng(seed)
    [mask] = pattern([rng.random((k, n)).astype(np.float32)], sparsity, tile_size=g)
    return jax.tree.map(np.asarray, mask)


@pytest.mark.parametrize("pattern", [patterns.TW2D(), patterns.TEW(residue=0.05), patterns.EW(),
                                     patterns.BW(block_size=4)])
@pytest.mark.parametrize("k,n,g,m", [(24, 20, 8, 6), (13, 7, 3, 1), (16, 40, 16, 3)])
def test_pruned_matches_masked_reference(pattern, k, n, g, m):
    mask = _pruned_layer(k, n, g, 0.6, pattern)
    dense = dense_reference(mask, g)
    assert 0 < dense.sum() < dense.size
    rng = np.random.default_rng(1)
    params = {"kernel": jnp.asarray(rng.normal(size=(k, n)), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=(n,)), jnp.float32)}
    x = rng.normal(size=(2, m, k)).astype(np.float32)
    layer = TWDense(n, tile_size=g)
    got = jax.jit(layer.apply)({"params": params, "tw_mask": mask}, x)
    w = np.asarray(params["kernel"], np.float64) * dense
    want = x.astype(np.float64) @ w + np.asarray(params["bias"], np.float64)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # Pruned weights have no effect whatever their stored value.
    poisoned = dict(params, kernel=jnp.where(dense, params["kernel"], 1e6 * rng.normal(size=(k, n))))
    got2 = jax.jit(layer.apply)({"params": poisoned, "tw_mask": mask}, x)
    np.testing.assert_array_equal(np.asarray(got2), np.asarray(got))


def test_grad_vmap_remat_under_jit():
    k, n, g = 16, 12, 4
    mask = _pruned_layer(k, n, g, 0.5, patterns.TW2D())
    dense = dense_reference(mask, g)
    rng = np.random.default_rng(3)
    params = {"kernel": jnp.asarray(rng.normal(size=(k, n)), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=(n,)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(5, k)), jnp.float32)
    layer = TWDense(n, tile_size=g)
    variables = {"params": params, "tw_mask": mask}

    def loss(p, module=layer):
        return jnp.sum(jnp.sin(module.apply({"params": p, "tw_mask": mask}, x)))

    def ref_loss(p):
        return jnp.sum(jnp.sin(x @ (p["kernel"] * dense) + p["bias"]))

    g_tw = jax.jit(jax.grad(loss))(params)
    g_ref = jax.grad(ref_loss)(params)
    np.testing.assert_allclose(g_tw["kernel"], g_ref["kernel"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_tw["bias"], g_ref["bias"], rtol=1e-5, atol=1e-6)
    assert not np.asarray(g_tw["kernel"])[~dense].any(), "a pruned weight got a gradient"

    # remat: same values and gradients.
    g_remat = jax.jit(jax.grad(lambda p: loss(p, nn.remat(TWDense)(n, tile_size=g))))(params)
    np.testing.assert_allclose(g_remat["kernel"], g_tw["kernel"], rtol=1e-6, atol=1e-7)

    # vmap over a batch of inputs and over a batch of masks.
    xs = jnp.asarray(rng.normal(size=(3, 5, k)), jnp.float32)
    ys = jax.jit(jax.vmap(lambda xi: layer.apply(variables, xi)))(xs)
    np.testing.assert_allclose(ys, np.einsum("bmk,kn->bmn", xs, params["kernel"] * dense)
                               + params["bias"], rtol=1e-5, atol=1e-5)
    masks = jax.tree.map(lambda *a: jnp.stack(a), mask,
                         jax.tree.map(np.asarray, patterns.keep_all(k, n, g)))
    both = jax.vmap(lambda m: layer.apply({"params": params, "tw_mask": m}, x))(masks)
    np.testing.assert_allclose(both[0], layer.apply(variables, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both[1], x @ params["kernel"] + params["bias"], rtol=1e-5, atol=1e-5)


def test_mask_in_its_own_collection_in_a_model():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(TWDense(32, tile_size=8, name="up")(x))
            return nn.Dense(3, name="head")(x)

    variables = Model().init(jax.random.key(0), jnp.ones((1, 16)))
    assert set(variables) == {"params", "tw_mask"}
    assert set(variables["tw_mask"]) == {"up"}
    shapes = jax.tree.map(jnp.shape, variables["tw_mask"]["up"])
    # No (K, N) element mask until a pattern with a residue prunes the layer; G in a marker.
    assert shapes == {"columns": (32,), "rows": (4, 16), "tile_size": (8,)}
    assert variables["tw_mask"]["up"]["columns"].dtype == jnp.bool_


def test_bad_input_errors():
    x = jnp.ones((2, 6))
    with pytest.raises(ValueError, match="tile_size must be a positive integer, got 0"):
        TWDense(4, tile_size=0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="tile_size must be a positive integer, got -2"):
        TWDense(4, tile_size=-2).init(jax.random.key(0), x)
    layer = TWDense(8, tile_size=4)
    variables = layer.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="needs its 'tw_mask' collection"):
        layer.apply({"params": variables["params"]}, x)
    wrong = jax.tree.map(np.asarray, patterns.keep_all(6, 8, 2))  # built for tile_size=2
    with pytest.raises(ValueError, match="the mask was made for tile_size=2, got tile_size=4"):
        layer.apply({"params": variables["params"], "tw_mask": wrong}, x)
    del wrong["tile_size"]  # a mask without its marker: the shapes still give it away
    with pytest.raises(ValueError, match=r"'rows' has shape \(4, 6\), expected \(2, 6\)"):
        layer.apply({"params": variables["params"], "tw_mask": wrong}, x)
    not_bool = dict(variables["tw_mask"], columns=jnp.ones((8,), jnp.float32))
    with pytest.raises(ValueError, match="'columns' must be boolean, got dtype float32"):
        layer.apply({"params": variables["params"], "tw_mask": not_bool}, x)
