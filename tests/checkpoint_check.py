"""Orbax checkpoints of pruning runs, across processes (run by tests/test_checkpoint.py).

    python checkpoint_check.py first DIR    # full run -> DIR/full.npz; half run -> Orbax checkpoints;
                                            # packed models -> Orbax checkpoints + their outputs
    python checkpoint_check.py resume DIR   # restore, finish the run, compare with full.npz;
                                            # restore the packed models, compare their outputs

Both a linen run (TWDense, optax, TEW with Taylor scores: masks, element masks and score
accumulators in the pruning state) and an NNX run (TWLinear, nnx.Optimizer, the same pattern).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import linen as nn
from flax import nnx

from jax_tw import nnx as twnnx
from jax_tw import packing, patterns, prune
from jax_tw.nn import TWDense

G, STEPS, HALF = 8, 12, 5
PATTERN = patterns.TEW(residue=0.05)


def schedule():
    return prune.cubic(0.75, 2, 9)


def batch(t):
    rng = np.random.default_rng(100 + t)
    return (jnp.asarray(rng.normal(size=(32, 24)), jnp.float32), jnp.asarray(rng.integers(0, 4, 32)))


def flat(tree):
    """{key path: numpy array} of every leaf."""
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ----------------------------------------------------------------------------- linen

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(TWDense(48, tile_size=G, name="fc1")(x))
        x = nn.relu(TWDense(40, tile_size=G, name="fc2")(x))
        return nn.Dense(4, name="head")(x)


def linen_setup():
    model = MLP()
    variables = model.init(jax.random.key(0), batch(0)[0])
    tx = optax.chain(optax.adamw(1e-2), prune.step(variables["tw_mask"], schedule(), pattern=PATTERN,
                                                   update_every=2, score="taylor"))
    state = {"params": variables["params"], "opt_state": tx.init(variables["params"])}

    @jax.jit
    def train_step(state, x, y):
        params, opt_state = state["params"], state["opt_state"]
        loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": p, "tw_mask": prune.masks(opt_state)}, x), y).mean()
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params, grads=grads)
        return {"params": optax.apply_updates(params, updates), "opt_state": opt_state}

    return model, state, train_step


def linen_run(state, train_step, start, stop):
    for t in range(start, stop):
        state = train_step(state, *batch(t))
    return state


# ----------------------------------------------------------------------------- NNX

class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = twnnx.TWLinear(24, 48, tile_size=G, rngs=rngs)
        self.fc2 = twnnx.TWLinear(48, 40, tile_size=G, rngs=rngs)
        self.head = nnx.Linear(40, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


def nnx_setup():
    model = NNXMLP(nnx.Rngs(0))
    tx = optax.chain(optax.adamw(1e-2), prune.step(model, schedule(), pattern=PATTERN,
                                                   update_every=2, score="taylor"))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    twnnx.set_masks(model, prune.masks(optimizer))  # creates the element masks TEW uses
    return model, optimizer


@nnx.jit
def nnx_train_step(model, optimizer, x, y):
    grads = nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
    optimizer.update(model, grads, taylor_grads=grads)
    twnnx.set_masks(model, prune.masks(optimizer))


def nnx_run(model, optimizer, start, stop):
    for t in range(start, stop):
        nnx_train_step(model, optimizer, *batch(t))


def nnx_state(model, optimizer):
    return {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}


# ----------------------------------------------------------------------------- stages

def first(d):
    ckpt = ocp.StandardCheckpointer()
    model, state, train_step = linen_setup()
    full = linen_run(state, train_step, 0, STEPS)
    ckpt.save(os.path.join(d, "linen"), linen_run(state, train_step, 0, HALF))
    m, opt = nnx_setup()
    nnx_run(m, opt, 0, STEPS)
    out = {f"linen{k}": v for k, v in flat(full).items()}
    out.update({f"nnx{k}": v for k, v in flat(nnx.as_pure(nnx_state(m, opt))).items()})
    m2, opt2 = nnx_setup()
    nnx_run(m2, opt2, 0, HALF)
    ckpt.save(os.path.join(d, "nnx"), nnx_state(m2, opt2))
    # Packed inference variables, linen and NNX, as arrays only (no target needed to restore).
    x = batch(STEPS)[0]
    packed = packing.pack_variables({"params": full["params"], "tw_mask": prune.masks(full["opt_state"])})
    ckpt.save(os.path.join(d, "linen_packed"), packing.to_arrays(packed))
    out["linen_packed_y"] = np.asarray(model.apply(packed, x))
    packed_nnx = twnnx.pack(m)
    ckpt.save(os.path.join(d, "nnx_packed"), packing.to_arrays(nnx.to_pure_dict(nnx.state(packed_nnx))))
    out["nnx_packed_y"] = np.asarray(packed_nnx(x))
    ckpt.wait_until_finished()
    np.savez(os.path.join(d, "full.npz"), **out)


def assert_equal(got, want, what):
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want)))
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f"{what} {key}")


def resume(d):
    want = dict(np.load(os.path.join(d, "full.npz")))
    ckpt = ocp.StandardCheckpointer()
    model, state, train_step = linen_setup()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = ckpt.restore(os.path.join(d, "linen"), abstract)
    assert int(restored["opt_state"][1].count) == HALF
    got = flat(linen_run(restored, train_step, HALF, STEPS))
    assert_equal(got, {k[5:]: v for k, v in want.items() if k.startswith("linen[")}, "linen")

    m, opt = nnx_setup()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx_state(m, opt))
    restored = ckpt.restore(os.path.join(d, "nnx"), abstract)
    nnx.update(m, restored["model"])
    nnx.update(opt, restored["optimizer"])
    nnx_run(m, opt, HALF, STEPS)
    got = flat(nnx.as_pure(nnx_state(m, opt)))
    assert_equal(got, {k[3:]: v for k, v in want.items() if k.startswith("nnx[")}, "nnx")

    x = batch(STEPS)[0]
    packed = packing.from_arrays(ckpt.restore(os.path.join(d, "linen_packed")))
    assert isinstance(packed["tw_packed"]["fc1"]["tiles"], packing.PackedTiles)
    np.testing.assert_array_equal(np.asarray(model.apply(packed, x)), want["linen_packed_y"])
    packed_nnx = twnnx.load_packed(NNXMLP(nnx.Rngs(1)), ckpt.restore(os.path.join(d, "nnx_packed")))
    np.testing.assert_array_equal(np.asarray(packed_nnx(x)), want["nnx_packed_y"])


if __name__ == "__main__":
    stage, directory = sys.argv[1], sys.argv[2]
    {"first": first, "resume": resume}[stage](directory)
    print(f"checkpoint_check {stage} ok")
