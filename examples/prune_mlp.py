"""Train a small TWDense network and prune it during training with jax_tw.prune.step.

The task is synthetic (a fixed random teacher network labels Gaussian inputs into 10 classes), so
it runs anywhere in under a minute on a 2-core CPU:

    python examples/prune_mlp.py                      # TW-2D to 75%, G = 32
    python examples/prune_mlp.py --pattern ew --sparsity 0.9

It prints a progress bar (loss, sparsity), then the per-layer sparsity and the test
accuracy of the dense start and of the pruned model.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from tqdm import tqdm

import jax_tw
from jax_tw import patterns, prune


class MLP(nn.Module):
    hidden: int
    classes: int
    tile_size: int

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = nn.gelu(jax_tw.nn.TWDense(self.hidden, tile_size=self.tile_size, name=f"fc{i}")(x))
        return nn.Dense(self.classes, name="head")(x)


def make_data(teacher_seed: int, data_seed: int, n: int, dim: int, classes: int):
    """Gaussian inputs labelled by a fixed random two-layer teacher."""
    teacher = np.random.default_rng(teacher_seed)
    w1 = teacher.normal(size=(dim, 4 * classes)) / np.sqrt(dim)
    w2 = teacher.normal(size=(4 * classes, classes))
    x = np.random.default_rng(data_seed).normal(size=(n, dim)).astype(np.float32)
    y = np.argmax(np.tanh(x @ w1) @ w2, axis=1)
    return jnp.asarray(x), jnp.asarray(y)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pattern", default="tw2d", help="tw2d, tw1d, tew, ew, vw or bw")
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--tile-size", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--score", default="magnitude", choices=["magnitude", "taylor"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    dim, classes = 64, 10
    x_train, y_train = make_data(args.seed, args.seed + 1, 20_000, dim, classes)
    x_test, y_test = make_data(args.seed, args.seed + 2, 4_000, dim, classes)

    model = MLP(args.hidden, classes, args.tile_size)
    variables = model.init(jax.random.key(args.seed), x_train[:1])
    begin, end = args.steps // 5, (args.steps * 3) // 5
    pattern_options = {"block_size": args.tile_size} if args.pattern == "bw" else {}
    tx = optax.chain(
        optax.adamw(2e-3, weight_decay=1e-4),
        prune.step(variables["tw_mask"], prune.cubic(args.sparsity, begin=begin, end=end),
                   pattern=patterns.get(args.pattern, **pattern_options),
                   tile_size=args.tile_size, update_every=max(1, args.steps // 60),
                   score=args.score))
    params, opt_state = variables["params"], tx.init(variables["params"])

    @jax.jit
    def train_step(params, opt_state, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p, "tw_mask": prune.masks(opt_state)}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params, grads=grads)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def accuracy(params, masks, x, y):
        logits = model.apply({"params": params, "tw_mask": masks}, x)
        return jnp.mean(jnp.argmax(logits, -1) == y)

    rng = np.random.default_rng(args.seed + 3)
    dense_acc = None
    bar = tqdm(range(args.steps), desc=f"{args.pattern} -> {args.sparsity:.0%}")
    for step in bar:
        idx = rng.integers(0, x_train.shape[0], args.batch)
        params, opt_state, loss = train_step(params, opt_state, x_train[idx], y_train[idx])
        if step == begin - 1:
            dense_acc = float(accuracy(params, prune.masks(opt_state), x_test, y_test))
        if step % 50 == 0 or step == args.steps - 1:
            sp = prune.sparsity(opt_state, args.tile_size).total
            bar.set_postfix(loss=f"{float(loss):.3f}", sparsity=f"{sp:.1%}")
    masks = prune.masks(opt_state)
    report = prune.sparsity(masks, args.tile_size)
    final_acc = float(accuracy(params, masks, x_test, y_test))
    print(report)
    print(f"test accuracy: dense (step {begin}) {dense_acc:.2%}, pruned {final_acc:.2%}")
    return {"dense_accuracy": dense_acc, "accuracy": final_acc, "sparsity": report.total,
            "params": params, "masks": masks}


if __name__ == "__main__":
    main()
