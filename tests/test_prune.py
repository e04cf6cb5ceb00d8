import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from jax_tw import patterns, prune
from jax_tw.nn import TWDense
from twcheck import assert_tile_structure, dense_reference

G = 8


class MLP(nn.Module):
    hidden: int = 48

    @nn.compact
    def __call__(self, x):
        x = nn.relu(TWDense(self.hidden, tile_size=G, name="fc1")(x))
        x = nn.relu(TWDense(self.hidden, tile_size=G, name="fc2")(x))
        return nn.Dense(4, name="head")(x)


def _setup(seed=0, n=256, k_in=24):
    kx, kw, ki = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (n, k_in))
    y = jnp.tanh(x @ jax.random.normal(kw, (k_in, 4)))
    model = MLP()
    variables = model.init(ki, x)
    return model, variables, x, y


# ----------------------------------------------------------------------------- schedules

def test_cubic_matches_formula():
    s = prune.cubic(0.8, begin=10, end=110, initial=0.1)
    for t in [0, 9, 10, 11, 50, 109, 110, 111, 1000]:
        if t < 10:
            want = 0.1
        elif t >= 110:
            want = 0.8
        else:
            want = 0.8 + (0.1 - 0.8) * (1 - (t - 10) / 100) ** 3
        assert float(s(t)) == pytest.approx(want, abs=1e-6)
    assert float(prune.cubic(0.5, begin=7, end=7)(7)) == 0.5  # begin == end: one shot
    assert float(prune.cubic(0.5, begin=7, end=7)(6)) == 0.0


def test_stages_and_one_shot():
    s = prune.stages([(0, 0.25), (100, 0.35), (200, 0.5)])
    assert [float(s(t)) for t in (0, 99, 100, 199, 200, 10**6)] == pytest.approx(
        [0.25, 0.25, 0.35, 0.35, 0.5, 0.5])
    assert s.final == 0.5
    o = prune.one_shot(0.9, at=5)
    assert float(o(4)) == 0.0 and float(o(5)) == pytest.approx(0.9)


@pytest.mark.parametrize("make,match", [
    (lambda: prune.cubic(0.5, begin=100, end=50), "end must not precede its begin, got end=50 < begin=100"),
    (lambda: prune.cubic(1.0, 0, 10), r"final sparsity must be in \[0, 1\), got 1.0"),
    (lambda: prune.cubic(-0.2, 0, 10), r"final sparsity must be in \[0, 1\), got -0.2"),
    (lambda: prune.cubic(0.5, -1, 10), r"begin must be an integer step in \[0, 2\*\*31\), got -1"),
    (lambda: prune.stages([(0, 0.5), (0, 0.6)]), "stage steps must increase, got 0 after 0"),
    (lambda: prune.stages([(0, 0.5), (10, 0.4)]), "must not decrease, got 0.4 after 0.5"),
    (lambda: prune.stages([(0, 1.2)]), r"stage sparsity must be in \[0, 1\), got 1.2"),
    (lambda: prune.one_shot(0.5, at=2.5), r"must be an integer step in \[0, 2\*\*31\), got 2.5"),
    (lambda: prune.one_shot(0.5, at=2 ** 31), r"must be an integer step in \[0, 2\*\*31\), got 2147483648"),
    (lambda: prune.stages([(0, None)]), "stage sparsity must be a number in \\[0, 1\\), got None"),
    (lambda: prune.step(patterns.keep_all(8, 8, 4), prune.one_shot(0.5), min_keep=None),
     r"min_keep must be a number in \[0, 1\), got None"),
    (lambda: patterns.TW2D(column_share="a"), r"column_share must be a number in \[0, 1\], got 'a'"),
    (lambda: patterns.TEW(residue=float("nan")), r"residue must be in \[0, 1\), got nan"),
])
def test_schedule_errors_name_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_fractions_may_be_zero_dimensional_arrays():
    masks = {"fc": patterns.keep_all(8, 8, 4)}
    for value in (np.array(0.05), jnp.asarray(0.05), np.float32(0.05), 0):
        prune.step(masks, prune.one_shot(0.5), min_keep=value)
        patterns.TW2D()([np.ones((8, 8), np.float32)], 0.5, tile_size=4, min_keep=value)
    for pattern in (patterns.TW2D(column_share=np.float32(0.5)), patterns.TEW(residue=jnp.asarray(0.05))):
        prune.step(masks, prune.one_shot(0.5), pattern=pattern).init({"fc": {"kernel": jnp.ones((8, 8))}})
        assert pattern([np.ones((8, 8), np.float32)], 0.5, tile_size=4)[0]["columns"].shape == (8,)


# ----------------------------------------------------------------------------- the transform

def _train(model, variables, x, y, tx, steps, taylor=False):
    params = variables["params"]
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state):
        def loss_fn(p):
            out = model.apply({"params": p, "tw_mask": prune.masks(opt_state)}, x)
            return jnp.mean((out - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        extra = {"grads": grads} if taylor else {}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state, loss

    history = []
    for _ in range(steps):
        params, opt_state, loss = train_step(params, opt_state)
        history.append((params, opt_state, float(loss)))
    return history


def test_pruned_weights_are_zero_stay_zero_and_masks_only_grow():
    model, variables, x, y = _setup()
    tx = optax.chain(optax.adam(1e-2),
                     prune.step(variables["tw_mask"], prune.cubic(0.7, begin=2, end=20),
                                tile_size=G, update_every=3))
    history = _train(model, variables, x, y, tx, 30)
    previous = None
    seen_sparsities = set()
    for params, opt_state, _ in history:
        masks = prune.masks(opt_state)
        # The masks tree is shaped exactly like the model's tw_mask collection.
        assert jax.tree.structure(masks) == jax.tree.structure(variables["tw_mask"])
        for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(variables["tw_mask"])):
            assert a.shape == b.shape and a.dtype == b.dtype
        dense = {name: dense_reference(jax.tree.map(np.asarray, masks[name]), G)
                 for name in ("fc1", "fc2")}
        for name, d in dense.items():
            assert_tile_structure(jax.tree.map(np.asarray, masks[name]), G)
            kernel = np.asarray(params[name]["kernel"])
            assert (kernel[~d] == 0).all(), f"{name}: a pruned weight is not exactly zero"
            if previous is not None:
                assert not (d & ~previous[name]).any(), f"{name}: a pruned weight came back"
        previous = dense
        seen_sparsities.add(round(prune.sparsity(opt_state, G).total, 3))
    assert len(seen_sparsities) > 3  # gradual: several distinct levels on the way
    total = prune.sparsity(history[-1][1], G).total
    assert total == pytest.approx(0.7, abs=G * 48 / 2 / (24 * 48 + 48 * 48))


def test_taylor_scores_come_from_true_gradients():
    """Adam before the step turns grads into very different updates; the scores must still be
    (g * w)^2 from the grads passed as the extra argument."""
    model, variables, x, y = _setup(seed=1)
    schedule = prune.one_shot(0.5, at=3)
    step = prune.step(variables["tw_mask"], schedule, tile_size=G, update_every=1, score="taylor")
    tx = optax.chain(optax.adam(1e-2), step)
    params = variables["params"]
    opt_state = tx.init(params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, grads=g))

    def loss_fn(p):
        return jnp.mean((model.apply({"params": p, "tw_mask": variables["tw_mask"]}, x) - y) ** 2)

    expected = {name: np.zeros_like(np.asarray(params[name]["kernel"])) for name in ("fc1", "fc2")}
    for i in range(3):
        grads = jax.grad(loss_fn)(params)
        for name in expected:
            expected[name] += (np.asarray(grads[name]["kernel"], np.float64)
                               * np.asarray(params[name]["kernel"], np.float64)) ** 2
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        state = opt_state[1]
        for name in expected:
            np.testing.assert_allclose(state.scores[name], expected[name], rtol=1e-5)
    # Step 3 prunes with the accumulated scores (including step 3's) and resets them.
    grads = jax.grad(loss_fn)(params)
    for name in expected:
        expected[name] += (np.asarray(grads[name]["kernel"], np.float64)
                           * np.asarray(params[name]["kernel"], np.float64)) ** 2
    _, opt_state = update(grads, opt_state, params)
    want = patterns.TW2D()([jnp.asarray(expected[n], jnp.float32) for n in ("fc1", "fc2")], 0.5,
                           tile_size=G, final_sparsity=0.5)
    got = prune.masks(opt_state)
    for name, w in zip(("fc1", "fc2"), want):
        np.testing.assert_array_equal(dense_reference(jax.tree.map(np.asarray, got[name]), G),
                                      dense_reference(jax.tree.map(np.asarray, w), G))
    assert all(not np.asarray(v).any() for v in opt_state[1].scores.values())
    # Without grads= the step refuses instead of scoring optimizer updates.
    with pytest.raises(ValueError, match="score='taylor' needs the true gradients"):
        tx.update(grads, opt_state, params)


def test_layer_filter_and_sparsity_report():
    model, variables, x, y = _setup()
    only_fc1 = lambda path: path[0] == "fc1"
    tx = optax.chain(optax.adam(1e-2),
                     prune.step(variables["tw_mask"], prune.one_shot(0.75), tile_size=G,
                                layers=only_fc1))
    history = _train(model, variables, x, y, tx, 3)
    params, opt_state, _ = history[-1]
    masks = prune.masks(opt_state)
    assert dense_reference(jax.tree.map(np.asarray, masks["fc2"]), G).all()
    assert (np.asarray(params["fc2"]["kernel"]) != 0).all()
    report = prune.sparsity(masks, G, layers=only_fc1)
    assert list(report.layers) == ["fc1"]
    assert report.total == pytest.approx(0.75, abs=24 / 2 / (24 * 48))
    full = prune.sparsity(opt_state, G)
    assert full.layers["fc2"] == 0.0
    assert full.total == pytest.approx(report.total * 24 * 48 / (24 * 48 + 48 * 48))
    assert "fc1" in str(full) and "total" in str(full)


@pytest.mark.parametrize("pattern", [patterns.TW1D(), patterns.TEW(residue=0.05), patterns.EW(),
                                     patterns.VW(), patterns.BW(block_size=8)])
def test_every_pattern_runs_in_the_same_model(pattern):
    model, variables, x, y = _setup()
    tx = optax.chain(optax.adam(1e-2),
                     prune.step(variables["tw_mask"], prune.cubic(0.6, begin=0, end=6),
                                pattern=pattern, tile_size=G, update_every=2))
    params, opt_state, _ = _train(model, variables, x, y, tx, 8)[-1]
    masks = prune.masks(opt_state)
    for name in ("fc1", "fc2"):
        d = dense_reference(jax.tree.map(np.asarray, masks[name]), G)
        assert (np.asarray(params[name]["kernel"])[~d] == 0).all()
    assert prune.sparsity(opt_state, G).total == pytest.approx(0.6, abs=0.03)


def test_training_reaches_target_keeps_structure_and_keeps_learning():
    model, variables, x, y = _setup(seed=2, n=512)
    tx = optax.chain(optax.adam(3e-3),
                     prune.step(variables["tw_mask"], prune.cubic(0.75, begin=50, end=250),
                                tile_size=G, update_every=10, score="taylor"))
    history = _train(model, variables, x, y, tx, 500, taylor=True)
    params, opt_state, final_loss = history[-1]
    loss_after_pruning = history[250][2]
    assert final_loss < 0.8 * loss_after_pruning, (loss_after_pruning, final_loss)
    assert final_loss < 0.5 * history[0][2]
    report = prune.sparsity(opt_state, G)
    assert report.total == pytest.approx(0.75, abs=G * 48 / 2 / (24 * 48 + 48 * 48))
    for name in ("fc1", "fc2"):
        assert_tile_structure(jax.tree.map(np.asarray, prune.masks(opt_state)[name]), G)


def test_bad_input_errors():
    model, variables, x, y = _setup()
    masks = variables["tw_mask"]
    sched = prune.cubic(0.5, 0, 10)
    with pytest.raises(ValueError, match="tile_size must be a positive integer, got 0"):
        prune.step(masks, sched, tile_size=0)
    with pytest.raises(ValueError, match="update_every must be a positive integer, got 0"):
        prune.step(masks, sched, tile_size=G, update_every=0)
    with pytest.raises(ValueError, match="score must be 'magnitude' or 'taylor', got 'grad'"):
        prune.step(masks, sched, tile_size=G, score="grad")
    with pytest.raises(ValueError, match="schedule must have a 'final' sparsity"):
        prune.step(masks, lambda t: 0.5, tile_size=G)
    with pytest.raises(ValueError, match="holds no layer masks"):
        prune.step({}, sched, tile_size=G)
    # A mask tree that doesn't match the params: other tile size, other shapes, missing layer.
    with pytest.raises(ValueError, match=r"tw_mask fc1: the mask was made for tile_size=8, got tile_size=16"):
        prune.step(masks, sched, tile_size=16)
    other = MLP(hidden=40).init(jax.random.key(0), x)["tw_mask"]
    with pytest.raises(ValueError, match=r"'columns' has shape \(40,\), expected \(48,\)"):
        prune.step(other, sched, tile_size=G).init(variables["params"])
    extra = dict(masks, fc3=masks["fc2"])
    with pytest.raises(ValueError, match="no kernel at fc3/kernel"):
        prune.step(extra, sched, tile_size=G).init(variables["params"])
    with pytest.raises(ValueError, match="opt_state holds no jax_tw.prune.step state"):
        prune.masks(optax.adam(1e-3).init(variables["params"]))
    tx = prune.step(masks, sched, tile_size=G)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(variables["params"], tx.init(variables["params"]))
    # Params of another shape at update time (a square kernel transposed would even fit).
    state = tx.init(variables["params"])
    k, n = variables["params"]["fc1"]["kernel"].shape
    swapped = jax.tree.map(lambda a: a, variables["params"])
    swapped["fc1"]["kernel"] = jnp.zeros((n, k))
    with pytest.raises(ValueError, match=rf"params of tw_mask fc1: tw_mask 'columns' has shape \({n},\), "
                       rf"expected \({k},\) for a kernel of shape \({n}, {k}\)"):
        tx.update(variables["params"], state, swapped)


# ----------------------------------------------------------------------------- correctness round

@pytest.mark.parametrize("pattern", [patterns.TW2D(), patterns.TW1D(), patterns.TEW(residue=0.005),
                                     patterns.EW(), patterns.VW(), patterns.BW(block_size=4)],
                         ids=lambda p: p.name)
def test_every_float32_sparsity_works_eager_and_jitted(pattern):
    """Python floats such as 0.8 round up in float32: the schedule's float32 value must not be
    taken for a sparsity above the final one, eager or jitted, for any pattern."""
    layer = TWDense(24, tile_size=G)
    variables = layer.init(jax.random.key(0), jnp.ones((1, 16)))
    params = variables["params"]
    cases = [(prune.one_shot(s), 0) for s in (0.1, 0.3, 0.8, 0.99)] + [(prune.cubic(0.6, 0, 1), 1)]
    for i, (schedule, steps) in enumerate(cases):
        tx = prune.step(variables["tw_mask"], schedule, pattern=pattern, min_keep=0.0)
        state = tx.init(params)
        for update in (tx.update, jax.jit(tx.update)) if i == 2 else (tx.update,):
            st = state
            for _ in range(steps + 1):  # the cubic case: step 1, past the ramp's end
                _, st = update(params, st, params)
            got = prune.sparsity(st).total
            assert got == pytest.approx(schedule.final, abs=0.03), (schedule, got)


def test_schedule_boundaries_are_not_delayed_by_update_every():
    """one_shot(at=5), a stage start and a cubic end that are not multiples of update_every
    update the masks on that very step."""
    model, variables, x, y = _setup()
    params = variables["params"]
    zeros = jax.tree.map(jnp.zeros_like, params)

    def sparsities(schedule, steps):
        tx = prune.step(variables["tw_mask"], schedule, update_every=100)
        state, out = tx.init(params), []
        update = jax.jit(tx.update)
        for _ in range(steps):
            _, state = update(zeros, state, params)
            out.append(round(prune.sparsity(state).total, 2))
        return out

    assert sparsities(prune.one_shot(0.5, at=5), 7) == [0, 0, 0, 0, 0, 0.5, 0.5]
    assert sparsities(prune.stages([(0, 0.25), (3, 0.5)]), 5) == [0.25, 0.25, 0.25, 0.5, 0.5]
    # cubic: step 0 is due (a multiple of 100) but at 0%, steps 1-6 not due, step 7 = end.
    assert sparsities(prune.cubic(0.6, begin=0, end=7), 8) == [0] * 7 + [0.6]


def test_tile_size_travels_with_the_mask():
    """Masks carry their G: every API reads it from them, and a different G is a clear error
    (N = 200 makes two tiles with G = 128 and with G = 100 alike, so the shapes can't tell)."""
    from jax_tw import packing

    layer = TWDense(200, tile_size=128)
    variables = layer.init(jax.random.key(0), jnp.ones((1, 32)))
    params = variables["params"]
    tx = prune.step(variables["tw_mask"], prune.one_shot(0.5))
    _, state = tx.update(params, tx.init(params), params)
    masked = {"params": params, "tw_mask": prune.masks(state)}
    assert prune.sparsity(state).total == prune.sparsity(state, 128).total == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="the mask was made for tile_size=128, got tile_size=100"):
        packing.pack_variables(masked, tile_size=100)
    with pytest.raises(ValueError, match="the mask was made for tile_size=128, got tile_size=100"):
        prune.sparsity(state, 100)
    with pytest.raises(ValueError, match="the mask was made for tile_size=128, got tile_size=100"):
        prune.step(variables["tw_mask"], prune.one_shot(0.5), tile_size=100)
    with pytest.raises(ValueError, match="the mask was made for tile_size=128, got tile_size=100"):
        TWDense(200, tile_size=100).apply(masked, jnp.ones((1, 32)))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32)), jnp.float32)
    packed = packing.pack_variables(masked)
    np.testing.assert_allclose(layer.apply(packed, x), layer.apply(masked, x), rtol=1e-5, atol=1e-5)


def test_tile_wise_state_holds_no_element_mask():
    """A pure tile-wise pattern keeps no (K, N) mask in the state (one byte per weight saved);
    patterns with a residue add theirs."""
    model, variables, x, y = _setup()
    params = variables["params"]
    weights = sum(np.size(params[n]["kernel"]) for n in ("fc1", "fc2"))
    mask_bytes = lambda t: sum(np.asarray(a).nbytes for a in jax.tree.leaves(t))
    for pattern, has in ((patterns.TW2D(), False), (patterns.TW1D(), False), (patterns.TEW(), True),
                         (patterns.EW(), True)):
        tx = prune.step(variables["tw_mask"], prune.one_shot(0.5), pattern=pattern)
        _, state = jax.jit(tx.update)(params, tx.init(params), params)
        masks = prune.masks(state)
        assert ("elements" in masks["fc1"]) == has
        assert (mask_bytes(masks) >= weights) == has, mask_bytes(masks)
        # The model takes either kind of mask.
        out = model.apply({"params": params, "tw_mask": masks}, x)
        assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("pattern", [patterns.TW2D(), patterns.TEW(residue=0.05)], ids=lambda p: p.name)
def test_hand_built_masks_without_the_marker_prune(pattern):
    """Masks built by hand (or saved before masks carried G) prune when tile_size is given: the
    state takes the structure the pattern returns."""
    rng = np.random.default_rng(0)
    params = {"l": {"kernel": jnp.asarray(rng.normal(size=(8, 12)), jnp.float32)}}
    mask = {"l": {"columns": np.ones(12, bool), "rows": np.ones((3, 8), bool), "elements": np.zeros((8, 12), bool)}}
    tx = prune.step(mask, prune.one_shot(0.5), pattern=pattern, tile_size=4, update_every=1)
    _, state = jax.jit(tx.update)(params, tx.init(params), params)
    assert prune.sparsity(state).total == pytest.approx(0.5, abs=0.1)
    assert patterns.mask_tile_size(prune.masks(state)["l"]) == 4


# ----------------------------------------------------------------------------- stacked layers

_STACK, _WIDTH = 3, 24


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jax.nn.relu(TWDense(_WIDTH, tile_size=8, name="dense")(x)), None


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        blocks = nn.scan(_Block, variable_axes={"params": 0, "tw_mask": 0},
                         split_rngs={"params": True}, length=_STACK)
        return blocks(name="blocks")(x, None)[0]


class _Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(_STACK):
            x = _Block(name=f"b{i}")(x, None)[0]
        return x


def _train_pruned(model, params, tw_mask, x, pattern, steps=2):
    tx = optax.chain(optax.sgd(0.01), prune.step(tw_mask, prune.one_shot(0.6), pattern=pattern,
                                                 update_every=1))
    state = tx.init(params)

    @jax.jit
    def train(params, state):
        grads = jax.grad(lambda p: jnp.sum(model.apply(
            {"params": p, "tw_mask": prune.masks(state)}, x) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state
    for _ in range(steps):
        params, state = train(params, state)
    return params, prune.masks(state)


@pytest.mark.parametrize("pattern", [patterns.TW2D(), patterns.TEW(residue=0.05)])
def test_scan_stacked_layers_prune_as_the_unrolled_model(pattern):
    """nn.scan stacks a layer's params and masks over a leading axis: prune.step prunes each
    copy as a layer of its own, in one global ranking, exactly as the same model unrolled with
    the same weights (masks, trained weights, outputs); the report names each copy."""
    x = jax.random.normal(jax.random.key(1), (4, _WIDTH))
    stacked = _Scanned().init(jax.random.key(0), x)
    assert jnp.shape(stacked["tw_mask"]["blocks"]["dense"]["columns"]) == (_STACK, _WIDTH)
    copy = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
    unrolled = _Unrolled().init(jax.random.key(0), x)
    unrolled_params = {f"b{i}": copy(stacked["params"]["blocks"], i) for i in range(_STACK)}
    ps, ms = _train_pruned(_Scanned(), stacked["params"], stacked["tw_mask"], x, pattern)
    pu, mu = _train_pruned(_Unrolled(), unrolled_params, unrolled["tw_mask"], x, pattern)
    for i in range(_STACK):
        a, b = copy(ms["blocks"]["dense"], i), mu[f"b{i}"]["dense"]
        assert sorted(a) == sorted(b) == sorted(["columns", "rows", "tile_size"] + (
            ["elements"] if pattern.has_elements else []))
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_allclose(ps["blocks"]["dense"]["kernel"][i],
                                   pu[f"b{i}"]["dense"]["kernel"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_Scanned().apply({"params": ps, "tw_mask": ms}, x),
                               _Unrolled().apply({"params": pu, "tw_mask": mu}, x), rtol=1e-5, atol=1e-5)
    report = prune.sparsity(ms)
    assert abs(report.total - 0.6) < 0.03
    for i in range(_STACK):
        assert report.layers[f"blocks/dense[{i}]"] == pytest.approx(
            prune.sparsity(mu).layers[f"b{i}/dense"])


def test_stacked_layers_refuse_packing_and_mismatched_kernels():
    from jax_tw import packing
    x = jnp.ones((2, _WIDTH))
    variables = _Scanned().init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"tw_mask blocks/dense: the layer is stacked over leading axes \(3,\)"):
        packing.pack_variables(variables)
    tx = prune.step(variables["tw_mask"], prune.one_shot(0.5))
    params = jax.tree.map(lambda a: a[:2], variables["params"])  # two copies, masks for three
    with pytest.raises(ValueError, match=r"kernel has shape \(2, 24, 24\), but its mask stacks the "
                                         r"layer over leading axes \(3,\)"):
        tx.init(params)
    bad = jax.tree.map(lambda a: a, variables["tw_mask"])
    bad["blocks"]["dense"]["tile_size"] = bad["blocks"]["dense"]["tile_size"][0]  # one marker
    with pytest.raises(ValueError, match=r"'tile_size' has shape \(8,\), but its 'columns' stack"):
        prune.step(bad, prune.one_shot(0.5))
    one = patterns.keep_all(16, 16, 8)  # 8 copies (as many as G) with one unstacked marker
    eight = dict({key: jnp.stack([v] * 8) for key, v in one.items()}, tile_size=one["tile_size"])
    with pytest.raises(ValueError, match=r"'tile_size' has shape \(8,\), .* then have its own one dim"):
        prune.sparsity({"l": eight})
    with pytest.raises(ValueError, match=r"leading axes \(0,\): no copy to prune"):
        prune.step({"l": {key: v[:0] for key, v in eight.items()}}, prune.one_shot(0.5))
