import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from jax_tw import _ffi, packing, patterns, prune
from jax_tw.nn import TWDense
from twcheck import runnable_backends

G = 8
BACKENDS = runnable_backends(base=("xla",))


class Model(nn.Module):
    dtype: object = None

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(TWDense(48, tile_size=G, dtype=self.dtype, name="fc1")(x))
        x = nn.gelu(TWDense(40, tile_size=G, dtype=self.dtype, name="fc2")(x))
        return nn.Dense(3, dtype=self.dtype, name="head")(x)


def _pruned_variables(pattern, sparsity=0.7):
    x = jax.random.normal(jax.random.key(0), (16, 24))
    model = Model()
    variables = model.init(jax.random.key(1), x)
    tx = prune.step(variables["tw_mask"], prune.one_shot(sparsity), pattern=pattern, tile_size=G)
    state = tx.init(variables["params"])
    updates, state = tx.update(variables["params"], state, variables["params"])
    params = optax.apply_updates(variables["params"], updates)
    # Pruned weights keep garbage on purpose: packing must use the mask, not the zeros.
    params = jax.tree.map(lambda p: p + 0.01, params)
    return model, {"params": params, "tw_mask": prune.masks(state)}, x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", [patterns.TW2D(), patterns.TEW(residue=0.05), patterns.EW()])
def test_packed_model_matches_masked_dense_model(backend, pattern, monkeypatch):
    monkeypatch.setenv("JAX_TW_BACKEND", backend)
    model, variables, x = _pruned_variables(pattern)
    packed = packing.pack_variables(variables, tile_size=G)
    assert "kernel" not in packed["params"]["fc1"] and "kernel" in packed["params"]["head"]
    want = jax.jit(model.apply)(variables, x)
    got = jax.jit(model.apply)(packed, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_packed_variables_are_read_in_place_under_jit(tmp_path):
    """pack_variables, load and from_arrays give device arrays: a jitted model reads them where
    they are. Host arrays would be copied to the device on every call (the transfer guard
    refuses such copies)."""
    model, variables, x = _pruned_variables(patterns.TEW(residue=0.05))
    packed = packing.pack_variables(variables, tile_size=G)
    path = str(tmp_path / "packed.safetensors")
    packing.save(path, packed)
    f = jax.jit(model.apply)
    want = np.asarray(f(packed, x))
    for tree in (packed, packing.load(path), packing.from_arrays(packing.to_arrays(packed))):
        leaves = jax.tree.leaves(tree)
        assert leaves and all(isinstance(a, jax.Array) for a in leaves), {type(a) for a in leaves}
        with jax.transfer_guard("disallow"):
            got = f(tree, x)
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_bf16_model_within_bf16_error(backend, monkeypatch):
    monkeypatch.setenv("JAX_TW_BACKEND", backend)
    model, variables, x = _pruned_variables(patterns.TW2D())
    ref = np.asarray(model.apply(variables, x), np.float64)  # f32 reference
    bf16_model = Model(dtype=jnp.bfloat16)
    xla_bf16 = np.asarray(bf16_model.apply(variables, x.astype(jnp.bfloat16)), np.float64)
    packed = packing.pack_variables(variables, tile_size=G, dtype=jnp.bfloat16)
    got = np.asarray(bf16_model.apply(packed, x.astype(jnp.bfloat16)), np.float64)
    assert np.abs(got - ref).max() <= 3 * np.abs(xla_bf16 - ref).max() + 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_cast_to_bf16_compute_in_bf16_packed_or_not(backend, monkeypatch):
    """A trained model cast to bfloat16 for inference (every param, the usual
    ``jax.tree.map(lambda a: a.astype(bf16), params)``): nn.Dense and the masked TWDense promote
    their actual kernel and bias, so the model computes in bfloat16; packed, it must too (it had
    taken the declared param_dtype, float32, and returned float32)."""
    monkeypatch.setenv("JAX_TW_BACKEND", backend)
    model, variables, x = _pruned_variables(patterns.TW2D())
    ref = np.asarray(model.apply(variables, x), np.float64)
    cast = {"params": jax.tree.map(lambda a: a.astype(jnp.bfloat16), variables["params"]),
            "tw_mask": variables["tw_mask"]}
    xb = x.astype(jnp.bfloat16)
    want = jax.jit(model.apply)(cast, xb)
    got = jax.jit(model.apply)(packing.pack_variables(cast, tile_size=G), xb)
    assert want.dtype == got.dtype == jnp.bfloat16
    err = np.abs(np.asarray(got, np.float64) - ref).max()
    assert err <= 3 * np.abs(np.asarray(want, np.float64) - ref).max() + 1e-3


def test_packed_variables_save_and_load_exactly(tmp_path):
    model, variables, x = _pruned_variables(patterns.TEW(residue=0.05))
    for dtype in (None, jnp.bfloat16):
        packed = packing.pack_variables(variables, tile_size=G, dtype=dtype)
        path = str(tmp_path / "model.safetensors")
        packing.save(path, packed)
        loaded = packing.load(path)
        assert jax.tree.structure(loaded) == jax.tree.structure(jax.tree.map(np.asarray, packed))
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(packed)):
            assert np.asarray(a).dtype == np.asarray(b).dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        xin = x.astype(dtype) if dtype else x
        m = Model(dtype=dtype)
        np.testing.assert_array_equal(np.asarray(m.apply(loaded, xin)), np.asarray(m.apply(packed, xin)))


def test_packed_errors(tmp_path):
    model, variables, x = _pruned_variables(patterns.TW2D())
    with pytest.raises(ValueError, match="variables must hold 'params' and 'tw_mask'"):
        packing.pack_variables({"params": variables["params"]}, tile_size=G)
    packed = packing.pack_variables(variables, tile_size=G)
    swapped = dict(packed, tw_packed={"fc1": packed["tw_packed"]["fc2"], "fc2": packed["tw_packed"]["fc1"]})
    with pytest.raises(ValueError, match=r"fc1: packed tiles are for a kernel \(48, 40\), expected \(24, 48\)"):
        model.apply(swapped, x)
    bad = tmp_path / "other.safetensors"
    from safetensors.numpy import save_file
    save_file({"a": np.ones(2, np.float32)}, str(bad))
    with pytest.raises(ValueError, match="not written by jax_tw.packing.save"):
        packing.load(str(bad))


@pytest.mark.skipif(not _ffi.cpu_available(), reason="jax_tw._cpu not built")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_packed_layer_fuses_bias_and_dtype_into_the_host_call(dtype, monkeypatch):
    """TWDense's packed path hands its bias to tw_matmul, and the host kernel adds it and writes
    the layer's dtype itself: the lowered layer is the custom call and nothing after it."""
    monkeypatch.setenv("JAX_TW_BACKEND", "cpu")
    layer = TWDense(40, tile_size=G, dtype=dtype, param_dtype=dtype)
    x = jax.random.normal(jax.random.key(0), (16, 24), dtype)
    variables = layer.init(jax.random.key(1), x)
    variables["params"]["bias"] = jax.random.normal(jax.random.key(2), (40,), dtype)
    packed = packing.pack_variables(variables)
    f = jax.jit(lambda v, x: layer.apply(v, x))
    text = f.lower(packed, x).as_text()
    assert f"custom_call @{_ffi.CPU_TARGET}" in text
    ops_after = text.split(f"custom_call @{_ffi.CPU_TARGET}")[1]
    assert "stablehlo.add" not in ops_after and "stablehlo.convert" not in ops_after, ops_after
    want = np.asarray(layer.apply(variables, x), np.float64)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(f(packed, x), np.float64), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_packed_layer_fuses_its_activation(backend, activation, dtype, monkeypatch):
    """TWDense(activation=a) is a(nn.Dense) with the same params (bit for bit, masked); packed
    and pruned it matches the masked layer, and on the host kernel the activation is part of
    the custom call: nothing of it is left for XLA after the call."""
    monkeypatch.setenv("JAX_TW_BACKEND", backend)
    plain = {"relu": nn.relu, "gelu": lambda y: nn.gelu(y, approximate=False)}[activation]
    layer = TWDense(40, tile_size=G, dtype=dtype, param_dtype=dtype, activation=activation)
    x = jax.random.normal(jax.random.key(0), (16, 24), dtype)
    variables = layer.init(jax.random.key(1), x)
    variables["params"]["bias"] = jax.random.normal(jax.random.key(2), (40,), dtype)
    dense = plain(nn.Dense(40, dtype=dtype, param_dtype=dtype).apply({"params": variables["params"]}, x))
    np.testing.assert_array_equal(np.asarray(layer.apply(variables, x)), np.asarray(dense))
    tx = prune.step(variables["tw_mask"], prune.one_shot(0.6), pattern=patterns.TW2D(), tile_size=G)
    state = tx.init(variables["params"])
    updates, state = tx.update(variables["params"], state, variables["params"])
    variables = {"params": optax.apply_updates(variables["params"], updates), "tw_mask": prune.masks(state)}
    packed = packing.pack_variables(variables)
    f = jax.jit(lambda v, x: layer.apply(v, x))
    want = np.asarray(layer.apply(variables, x), np.float64)
    assert (want < 0).any() == (activation == "gelu") and (want > 0).mean() > 0.3
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(f(packed, x), np.float64), want, rtol=tol, atol=tol)
    if backend == "cpu":
        text = f.lower(packed, x).as_text()
        ops_after = text.split(f"custom_call @{_ffi.CPU_TARGET}")[1]
        assert not any(op in ops_after for op in ("stablehlo.maximum", "erf", "stablehlo.multiply")), ops_after


def test_activation_errors_name_the_value():
    x = jnp.ones((2, 6))
    with pytest.raises(ValueError, match=r"activation must be one of \[None, 'relu', 'gelu'\], got 'swish'"):
        TWDense(4, tile_size=2, activation="swish").init(jax.random.key(0), x)
