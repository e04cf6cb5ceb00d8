import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from jax_tw import intercept, packing, patterns, prune
from twcheck import assert_tile_structure, dense_reference, rounding_dot_general, runnable_backends

G = 8


class Block(nn.Module):
    """A pre-LayerNorm transformer block built only from Flax's own layers, plus a head."""

    dtype: object = None

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(dtype=self.dtype)(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=4, dtype=self.dtype, name="attn")(h)
        h = nn.LayerNorm(dtype=self.dtype)(x)
        h = nn.gelu(nn.Dense(64, dtype=self.dtype, name="fc1")(h))
        x = x + nn.Dense(32, dtype=self.dtype, name="fc2")(h)
        return nn.Dense(3, dtype=self.dtype, name="head")(x.mean(axis=1))


def _encoder_layers(path):
    return path[-1] != "head"


LAYERS = {  # (module, input shape, (K, N)): Dense and the DenseGeneral forms attention uses
    "dense": (nn.Dense(9), (3, 5, 16), (16, 9)),
    "dense_m1": (nn.Dense(7, use_bias=False), (1, 12), (12, 7)),
    "heads_out": (nn.DenseGeneral((4, 6), axis=-1), (2, 5, 16), (16, 24)),  # Q/K/V projections
    "heads_in": (nn.DenseGeneral(10, axis=(-2, -1)), (2, 5, 4, 6), (24, 10)),  # out projection
    "middle_axis": (nn.DenseGeneral(5, axis=1), (3, 4, 2), (4, 5)),  # contracted axis not last
    # axes named out of order: Flax sorts them, so the kernel is (4, 6, 7) all the same
    "heads_in_reversed": (nn.DenseGeneral(7, axis=(-1, -2)), (2, 5, 4, 6), (24, 7)),
    "bf16": (nn.DenseGeneral((3, 4), axis=-1, dtype=jnp.bfloat16), (2, 8), (8, 12)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_unpruned_equals_the_layer_bit_for_bit(name):
    layer, shape, (k, n) = LAYERS[name]
    x = jax.random.normal(jax.random.key(0), shape)
    variables = intercept.init(layer, jax.random.key(1), x, tile_size=4)
    ref = layer.init(jax.random.key(1), x)
    for a, b in zip(jax.tree.leaves(ref["params"]), jax.tree.leaves(variables["params"])):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.map(jnp.shape, variables["tw_mask"]) == {
        "columns": (n,), "rows": (-(-n // 4), k), "tile_size": (4,)}
    got = jax.jit(lambda v, x: intercept.apply(layer, v, x))(variables, x)
    want = jax.jit(layer.apply)(ref, x)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("name", ["dense", "heads_out", "heads_in", "heads_in_reversed", "middle_axis"])
@pytest.mark.parametrize("backend", runnable_backends(base=("xla",)))
def test_pruned_layer_masked_and_packed_match_reference(name, backend, monkeypatch):
    monkeypatch.setenv("JAX_TW_BACKEND", backend)
    layer, shape, (k, n) = LAYERS[name]
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    variables = intercept.init(layer, jax.random.key(1), x, tile_size=4)
    [mask] = patterns.TEW(residue=0.05)([rng.random((k, n)).astype(np.float32)], 0.6, tile_size=4)
    mask = jax.tree.map(np.asarray, mask)
    kernel = rng.normal(size=variables["params"]["kernel"].shape).astype(np.float32)
    bias = rng.normal(size=variables["params"]["bias"].shape).astype(np.float32)
    variables = {"params": {"kernel": kernel, "bias": bias}, "tw_mask": mask}
    # Independent reference: the contracted axes moved last, flattened, times the masked matrix.
    axes = {"dense": (-1,), "heads_out": (-1,), "heads_in": (-2, -1), "heads_in_reversed": (-2, -1),
            "middle_axis": (1,)}[name]  # the kernel's leading dims, in order
    axes = tuple(a % x.ndim for a in axes)
    xm = np.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim))).astype(np.float64)
    x2 = xm.reshape(*xm.shape[:x.ndim - len(axes)], k)
    w = kernel.reshape(k, n).astype(np.float64) * dense_reference(mask, 4)
    want = (x2 @ w + bias.reshape(n)).reshape(*x2.shape[:-1], *bias.shape)
    masked = intercept.apply(layer, variables, x)
    np.testing.assert_allclose(np.asarray(masked), want, rtol=1e-5, atol=1e-5)
    packed = packing.pack_variables(variables)
    assert set(packed["params"]) == {"bias"}
    got = jax.jit(lambda v, x: intercept.apply(layer, v, x))(packed, x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _train_block(steps=10, sparsity=0.75, pattern=None):
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(steps, 8, 10, 32)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 3, (steps, 8)))
    model = Block()
    variables = intercept.init(model, jax.random.key(0), xs[0], tile_size=G, layers=_encoder_layers)
    tx = optax.chain(optax.adam(1e-2), prune.step(variables["tw_mask"], prune.cubic(sparsity, 2, 6),
                                                  pattern=pattern, update_every=2, score="taylor"))
    params, opt_state = variables["params"], tx.init(variables["params"])

    @jax.jit
    def train_step(params, opt_state, x, y):
        def loss_fn(p):
            logits = intercept.apply(model, {"params": p, "tw_mask": prune.masks(opt_state)}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params, grads=grads)
        return optax.apply_updates(params, updates), opt_state

    history = []
    for t in range(steps):
        params, opt_state = train_step(params, opt_state, xs[t], ys[t])
        history.append({p: np.asarray(patterns.dense_mask(m))
                        for p, m in patterns.layer_masks(prune.masks(opt_state)).items()})
    return model, params, opt_state, history, xs


def test_transformer_block_of_flax_layers_pruned_trained_packed():
    model, params, opt_state, history, xs = _train_block()
    masks = prune.masks(opt_state)
    assert set(patterns.layer_masks(masks)) == {
        ("attn", "query"), ("attn", "key"), ("attn", "value"), ("attn", "out"), ("fc1",), ("fc2",)}
    report = prune.sparsity(opt_state)
    assert report.total == pytest.approx(0.75, abs=0.01)
    for path, keep in history[-1].items():
        kernel = params
        for key in path + ("kernel",):
            kernel = kernel[key]
        assert kernel.ndim == (3 if path[0] == "attn" else 2)
        assert (np.asarray(kernel).reshape(keep.shape)[~keep] == 0).all(), f"{path}: pruned weight not zero"
        assert_tile_structure(jax.tree.map(np.asarray, patterns.layer_masks(masks)[path]), G)
    for before, after in zip(history, history[1:]):
        for path in before:
            assert not (after[path] & ~before[path]).any()
    variables = {"params": params, "tw_mask": masks}
    want = np.asarray(jax.jit(lambda v, x: intercept.apply(model, v, x))(variables, xs[0]))
    # Pruned weights are exactly zero, so the model run without interception agrees too.
    np.testing.assert_allclose(np.asarray(model.apply(variables, xs[0])), want, rtol=1e-5, atol=1e-5)
    for backend in runnable_backends(base=("xla",)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("JAX_TW_BACKEND", backend)
            packed = packing.pack_variables(variables)
            assert "kernel" not in packed["params"]["attn"]["query"] and "kernel" in packed["params"]["head"]
            got = jax.jit(lambda v, x: intercept.apply(model, v, x))(packed, xs[0])
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


class Sharded(nn.Module):
    """Kernels and a bias boxed by ``nn.with_partitioning``, as models written for sharding have."""

    @nn.compact
    def __call__(self, x):
        init = lambda names: nn.with_partitioning(nn.initializers.normal(1.0), names)
        x = nn.DenseGeneral((2, 8), kernel_init=init((None, "model", None)),
                            bias_init=init(("model", None)), name="heads")(x)
        x = nn.DenseGeneral(6, axis=(-2, -1), kernel_init=init(("model", None, None)), name="out")(x)
        return nn.Dense(3, kernel_init=init(("model", None)), name="head")(x)  # not pruned


def test_boxed_params_pruned_trained_and_packed(tmp_path):
    model, g, steps = Sharded(), 4, 6
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(steps, 3, 12)), jnp.float32)
    variables = intercept.init(model, jax.random.key(0), xs[0], tile_size=g, layers=lambda p: p[-1] != "head")
    assert isinstance(variables["params"]["heads"]["kernel"], nn.Partitioned)
    assert jax.tree.map(jnp.shape, variables["tw_mask"]) == {  # masks for the unboxed kernels
        "heads": {"columns": (16,), "rows": (4, 12), "tile_size": (g,)},
        "out": {"columns": (6,), "rows": (2, 16), "tile_size": (g,)}}
    tx = optax.chain(optax.adam(1e-2), prune.step(variables["tw_mask"], prune.one_shot(0.5)))
    params, opt_state = variables["params"], tx.init(variables["params"])

    @jax.jit
    def train_step(params, opt_state, x):
        loss = lambda p: jnp.sum(intercept.apply(model, {"params": p, "tw_mask": prune.masks(opt_state)}, x) ** 2)
        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for x in xs:
        params, opt_state = train_step(params, opt_state, x)
    assert isinstance(params["out"]["kernel"], nn.Partitioned)  # the boxes survive training
    masks = prune.masks(opt_state)
    assert prune.sparsity(opt_state).total == pytest.approx(0.5, abs=0.05)
    for name, (k, n) in {"heads": (12, 16), "out": (16, 6)}.items():
        keep = np.asarray(patterns.dense_mask(masks[name]))
        kernel = np.asarray(params[name]["kernel"].unbox()).reshape(k, n)
        assert (~keep).any() and (kernel[~keep] == 0).all(), f"{name}: pruned weight not zero"
    variables = {"params": params, "tw_mask": masks}
    plain = nn.meta.unbox(params)
    want = np.asarray(model.apply({"params": plain}, xs[0]), np.float64)
    w1 = np.asarray(plain["heads"]["kernel"], np.float64).reshape(12, 16)
    w2 = np.asarray(plain["out"]["kernel"], np.float64).reshape(16, 6)
    h = np.asarray(xs[0], np.float64) @ w1 + np.asarray(plain["heads"]["bias"], np.float64).reshape(16)
    h = h @ w2 + np.asarray(plain["out"]["bias"], np.float64)
    h = h @ np.asarray(plain["head"]["kernel"], np.float64) + np.asarray(plain["head"]["bias"], np.float64)
    np.testing.assert_allclose(h, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(intercept.apply(model, variables, xs[0])), want, rtol=1e-5, atol=1e-5)
    packed = packing.pack_variables(variables)
    # The params that stay (biases, the unpruned head) keep their boxes, so their sharding.
    assert isinstance(packed["params"]["heads"]["bias"], nn.Partitioned)
    assert nn.get_partition_spec(packed["params"])["head"]["kernel"] == jax.sharding.PartitionSpec("model", None)
    got = jax.jit(lambda v, x: intercept.apply(model, v, x))(packed, xs[0])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    path = str(tmp_path / "boxed.safetensors")
    packing.save(path, packed)  # values saved unboxed
    got = jax.jit(lambda v, x: intercept.apply(model, v, x))(packing.load(path), xs[0])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_init_on_existing_variables_and_tw_mask_only_changes_selected_layers():
    model = Block()
    x = jnp.ones((2, 5, 32))
    base = model.init(jax.random.key(0), x)
    variables = intercept.init(model, None, x, tile_size=G, variables=base,
                               layers=lambda p: p[-1] in ("query", "fc2"))
    assert variables["params"] is base["params"]
    assert set(patterns.layer_masks(variables["tw_mask"])) == {("attn", "query"), ("fc2",)}


class NormDrop(nn.Module):
    """Dense, BatchNorm and Dropout in training mode: applying it needs a dropout key and
    writes batch_stats."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16, name="fc1")(x)
        x = nn.BatchNorm(use_running_average=False)(x)
        x = nn.Dropout(0.5, deterministic=False)(x)
        return nn.Dense(4, name="fc2")(x)


def test_init_on_existing_variables_of_a_model_that_needs_rngs_and_updates_state():
    """Masks added to a BatchNorm + Dropout model's variables: the call that makes them gets
    the given rngs and may update batch_stats, but only the masks come back from it."""
    model, x = NormDrop(), jax.random.normal(jax.random.key(3), (6, 8))
    base = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    base = dict(base, batch_stats=jax.tree.map(lambda a: a + 0.5, base["batch_stats"]))
    variables = intercept.init(model, {"dropout": jax.random.key(2)}, x, tile_size=4, variables=base)
    assert set(variables) == {"params", "batch_stats", "tw_mask"}
    assert variables["params"] is base["params"]
    assert variables["batch_stats"] is base["batch_stats"]  # not the statistics of this call
    assert set(patterns.layer_masks(variables["tw_mask"])) == {("fc1",), ("fc2",)}
    # Masked, nothing pruned: the model's own output for the same dropout key.
    rngs = {"dropout": jax.random.key(5)}
    got, _ = intercept.apply(model, variables, x, rngs=rngs, mutable=["batch_stats"])
    want, _ = model.apply(base, x, rngs=rngs, mutable=["batch_stats"])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_custom_dot_general_masked_runs_it_packed_refuses_it():
    """A custom product runs masked; packed, the call refuses it rather than ignore it."""
    layer = nn.Dense(8, dot_general=rounding_dot_general)
    x = 3 * jax.random.normal(jax.random.key(0), (2, 8))
    variables = intercept.init(layer, jax.random.key(1), x, tile_size=4)
    want = np.round(np.asarray(x)) @ np.round(np.asarray(variables["params"]["kernel"])) + np.asarray(
        variables["params"]["bias"])
    np.testing.assert_allclose(np.asarray(intercept.apply(layer, variables, x)), want, rtol=1e-5, atol=1e-4)
    packed = packing.pack_variables(variables)
    with pytest.raises(ValueError, match="has its own dot_general .*rounding_dot_general"):
        intercept.apply(layer, packed, x)
    with pytest.raises(ValueError, match="has its own promote_dtype"):
        intercept.apply(nn.Dense(8, promote_dtype=lambda *a, **k: a), packed, x)
    # lax.dot_general itself, named explicitly, is the default product: packed runs it.
    plain = nn.Dense(8, dot_general=jax.lax.dot_general)
    np.testing.assert_allclose(np.asarray(intercept.apply(plain, packed, x)),
                               np.asarray(plain.apply(variables, x)), rtol=1e-5, atol=1e-5)


def test_intercept_bad_input_errors():
    x = jnp.ones((2, 4, 6))
    with pytest.raises(ValueError, match="tile_size must be a positive integer, got 0"):
        intercept.init(nn.Dense(4), jax.random.key(0), x, tile_size=0)
    with pytest.raises(ValueError, match="no nn.Dense or nn.DenseGeneral layer .* was selected"):
        intercept.init(nn.Dense(4), jax.random.key(0), x, layers=lambda p: False)
    with pytest.raises(ValueError, match=r"batch_dims=\(0,\) is not supported"):
        intercept.init(nn.DenseGeneral(3, axis=-1, batch_dims=(0,)), jax.random.key(0), x)
    layer = nn.DenseGeneral((2, 3), axis=-1)
    variables = intercept.init(layer, jax.random.key(0), x, tile_size=2)
    wrong = dict(jax.tree.map(np.asarray, patterns.keep_all(6, 6, 4)), tile_size=np.zeros(2, bool))
    with pytest.raises(ValueError, match=r"'rows' has shape \(2, 6\), expected \(3, 6\)"):
        intercept.apply(layer, dict(variables, tw_mask=wrong), x)
    other = jax.tree.map(np.asarray, patterns.keep_all(6, 5, 2))
    with pytest.raises(ValueError, match=r"'columns' has shape \(5,\), expected \(6,\)"):
        intercept.apply(layer, dict(variables, tw_mask=other), x)
    with pytest.raises(ValueError, match=r"does not multiply as the \(6, 5\) matrix"):
        prune.step(other, prune.one_shot(0.5)).init(variables["params"])
    packed = packing.pack_variables(variables)
    with pytest.raises(ValueError, match=r"packed tiles are for a kernel \(6, 6\), expected \(4, 6\)"):
        intercept.apply(layer, packed, jnp.ones((2, 4)))


def test_scanned_dense_layers_need_the_mask_collection_carried():
    """nn.Dense inside nn.scan: with 'tw_mask' in the scan's variable_axes, init stacks a mask
    per copy and prune.step prunes each (pruned weights zero, the masked model's output equals
    the dense model's on the pruned params); without it, init names the layers whose masks the
    scan dropped and the fix, instead of saying no layer was selected."""
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return jax.nn.relu(nn.Dense(24, name="dense")(x)), None

    def model(axes):
        class Model(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.scan(Block, variable_axes=axes, split_rngs={"params": True},
                               length=3)(name="blocks")(x, None)[0]
        return Model()

    x = jax.random.normal(jax.random.key(1), (4, 24))
    with pytest.raises(ValueError, match=r"the masks of the layers \['blocks/dense'\] were made but "
                                         r"did not come out .* add 'tw_mask': 0 to its variable_axes"):
        intercept.init(model({"params": 0}), jax.random.key(0), x, tile_size=8)
    scanned = model({"params": 0, "tw_mask": 0})
    variables = intercept.init(scanned, jax.random.key(0), x, tile_size=8)
    assert jnp.shape(variables["tw_mask"]["blocks"]["dense"]["rows"]) == (3, 3, 24)
    tx = prune.step(variables["tw_mask"], prune.one_shot(0.6))
    params, state = variables["params"], tx.init(variables["params"])
    grads = jax.grad(lambda p: jnp.sum(intercept.apply(
        scanned, {"params": p, "tw_mask": prune.masks(state)}, x) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    kernel = np.asarray(params["blocks"]["dense"]["kernel"])
    masks = prune.masks(state)["blocks"]["dense"]
    for i in range(3):
        dense = np.asarray(patterns.dense_mask({k: v[i] for k, v in masks.items()}))
        assert not kernel[i][~dense].any() and kernel[i][dense].all()
    assert abs(1 - np.mean(kernel != 0) - 0.6) < 0.03
    np.testing.assert_allclose(intercept.apply(scanned, {"params": params, "tw_mask": prune.masks(state)}, x),
                               scanned.apply({"params": params}, x), rtol=1e-5, atol=1e-5)
