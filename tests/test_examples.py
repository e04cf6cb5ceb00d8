import importlib.util
import pathlib
import re
import sys

import jax
import optax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_tw import packing, patterns, prune
from twcheck import assert_tile_structure

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # flax modules are dataclasses: they look themselves up
    spec.loader.exec_module(module)
    return module


def test_prune_mlp_example_short_run():
    example = _load(ROOT / "examples" / "prune_mlp.py")
    out = example.main(["--steps", "300", "--hidden", "64", "--tile-size", "16"])
    assert out["sparsity"] == pytest.approx(0.75, abs=0.01)
    assert out["accuracy"] > 0.3  # 10 classes: chance is 0.1
    for mask in out["masks"].values():
        assert_tile_structure(jax.tree.map(np.asarray, mask), 16)


def test_readme_snippets_train_prune_and_run_packed(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Training with pruning in ten lines\n\n```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    params, opt_state = scope["params"], scope["opt_state"]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 784)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 64))
    for step in range(201):  # the cubic ramp begins at 100; masks update every 100 steps
        params, opt_state = scope["train_step"](params, opt_state, x, y)
        if step == 199:
            assert prune.sparsity(opt_state, tile_size=32).total == 0.0
    report = prune.sparsity(opt_state, tile_size=32)
    assert set(report.layers) == {"layers_0", "layers_2"}
    want = float(scope["prune"].cubic(0.75, begin=100, end=2000)(200))
    assert report.total == pytest.approx(want, abs=0.01)
    for name in report.layers:
        mask = jax.tree.map(np.asarray, prune.masks(opt_state)[name])
        assert_tile_structure(mask, 32)
        assert (np.asarray(params[name]["kernel"])[~np.asarray(
            patterns.dense_mask(mask, 32))] == 0).all()

    # The inference snippet: pack, run the same model, save (to the working directory).
    monkeypatch.chdir(tmp_path)
    code = re.search(r"## Inference over packed tiles\n\n```python\n(.*?)```", text, re.S).group(1)
    scope.update(params=params, opt_state=opt_state, x=x)
    exec(compile(code, "README.md", "exec"), scope)
    want = scope["model"].apply({"params": params, "tw_mask": prune.masks(opt_state)}, x)
    np.testing.assert_allclose(np.asarray(scope["logits"]), np.asarray(want), rtol=1e-5, atol=1e-5)
    loaded = packing.load(str(tmp_path / "model.safetensors"))
    np.testing.assert_array_equal(np.asarray(scope["model"].apply(loaded, x)), np.asarray(scope["logits"]))


def _snippet(text, title):
    return re.search(rf"## {re.escape(title)}\n.*?```python\n(.*?)```", text, re.S).group(1)


def test_prune_nnx_example_short_run():
    example = _load(ROOT / "examples" / "prune_nnx.py")
    out = example.main(["--steps", "150", "--hidden", "128", "--tile-size", "16", "--time-batch", "64",
                        "--repeats", "2"])
    assert out["sparsity"] == pytest.approx(0.75, abs=0.01)
    assert out["accuracy"] > 0.3 and out["packed_accuracy"] == pytest.approx(out["accuracy"], abs=0.002)
    assert out["packed"].hidden[0].tiles is not None and out["speedup"] > 0


def test_readme_nnx_and_unmodified_model_snippets():
    text = (ROOT / "README.md").read_text()
    scope = {}
    exec(compile(_snippet(text, "Flax NNX in ten lines"), "README.md", "exec"), scope)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 784)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 64))
    model, optimizer = scope["model"], scope["optimizer"]
    for _ in range(201):  # the cubic ramp begins at 100; masks update every 100 steps
        scope["train_step"](model, optimizer, x, y)
    want = float(prune.cubic(0.75, begin=100, end=2000)(200))
    assert prune.sparsity(model).total == pytest.approx(want, abs=0.01)
    mask = jax.tree.map(np.asarray, model.fc1.mask())
    assert_tile_structure(mask, 32)
    assert (np.asarray(model.fc1.kernel[...])[~np.asarray(patterns.dense_mask(mask))] == 0).all()
    packed = scope["jax_tw"].nnx.pack(model)
    np.testing.assert_allclose(np.asarray(packed(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-5)

    scope = {}
    exec(compile(_snippet(text, "Models you did not write: `nn.Dense` and `nn.DenseGeneral`"),
                 "README.md", "exec"), scope)
    masks = scope["variables"]["tw_mask"]
    assert set(masks) == {"attn", "fc1", "fc2"} and set(masks["attn"]) == {"query", "key", "value", "out"}
    params, opt_state, tx, apply = scope["params"], scope["opt_state"], scope["tx"], scope["apply"]
    x = jnp.asarray(rng.normal(size=(8, 16, 64)), jnp.float32)

    @jax.jit
    def train_step(params, opt_state):
        grads = jax.grad(lambda p: jnp.mean((apply(p, opt_state, x) - x) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(201):
        params, opt_state = train_step(params, opt_state)
    assert prune.sparsity(opt_state).total == pytest.approx(want, abs=0.01)
    packed = packing.pack_variables({"params": params, "tw_mask": prune.masks(opt_state)})
    got = scope["intercept"].apply(scope["model"], packed, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(apply(params, opt_state, x)), rtol=1e-5, atol=1e-5)


def test_readme_orbax_snippet(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    scope = {}
    exec(compile(_snippet(text, "Training with pruning in ten lines"), "README.md", "exec"), scope)
    params = scope["params"]
    monkeypatch.chdir(tmp_path)
    exec(compile(_snippet(text, "Checkpoints with Orbax"), "README.md", "exec"), scope)
    for a, b in zip(jax.tree.leaves(scope["state"]["params"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 784)), jnp.float32)
    want = scope["model"].apply({"params": params, "tw_mask": prune.masks(scope["opt_state"])}, x)
    np.testing.assert_allclose(np.asarray(scope["model"].apply(scope["packed"], x)), np.asarray(want),
                               rtol=1e-5, atol=1e-5)
