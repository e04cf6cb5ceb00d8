"""Prune a Flax NNX model while it trains, pack it, and time it against the dense model.

The network is an NNX MLP whose hidden layers are ``jax_tw.nnx.TWLinear`` (a drop-in for
``nnx.Linear``); the task is synthetic (a fixed random teacher network labels Gaussian inputs
into 10 classes), so it runs anywhere in under a minute on a 2-core CPU:

    python examples/prune_nnx.py                      # TW-2D to 75%, G = 64
    python examples/prune_nnx.py --sparsity 0.9 --score taylor

It prints the per-layer sparsity, the test accuracy of the dense start, of the pruned model
and of its packed version, and the packed model's inference time against the same model with
dense layers (median of repeats, measured side by side).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import jax_tw
from jax_tw import prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_mlp import make_data  # noqa: E402  (the same synthetic task)


class MLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, classes: int, tile_size: int, rngs: nnx.Rngs):
        self.hidden = nnx.List([
            jax_tw.nnx.TWLinear(dim, hidden, tile_size=tile_size, rngs=rngs),
            jax_tw.nnx.TWLinear(hidden, hidden, tile_size=tile_size, rngs=rngs),
            jax_tw.nnx.TWLinear(hidden, hidden, tile_size=tile_size, rngs=rngs)])
        self.head = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x):
        for layer in self.hidden:
            x = nnx.gelu(layer(x))
        return self.head(x)


def median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--tile-size", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--score", default="magnitude", choices=["magnitude", "taylor"])
    ap.add_argument("--time-batch", type=int, default=2048, help="rows of the timed inference batch")
    ap.add_argument("--repeats", type=int, default=7, help="timing repeats (median)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    dim, classes = 256, 10
    x_train, y_train = make_data(args.seed, args.seed + 1, 20_000, dim, classes)
    x_test, y_test = make_data(args.seed, args.seed + 2, 4_000, dim, classes)

    model = MLP(dim, args.hidden, classes, args.tile_size, nnx.Rngs(args.seed))
    begin, end = args.steps // 5, (args.steps * 3) // 5
    tx = optax.chain(
        optax.adamw(1e-3, weight_decay=1e-4),
        prune.step(model, prune.cubic(args.sparsity, begin=begin, end=end),
                   update_every=max(1, args.steps // 60), score=args.score))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads, taylor_grads=grads)
        jax_tw.nnx.set_masks(model, prune.masks(optimizer))
        return loss

    @nnx.jit
    def accuracy(model, x, y):
        return jnp.mean(jnp.argmax(model(x), -1) == y)

    rng = np.random.default_rng(args.seed + 3)
    dense_acc = None
    bar = tqdm(range(args.steps), desc=f"tw2d -> {args.sparsity:.0%}")
    for step in bar:
        idx = rng.integers(0, x_train.shape[0], args.batch)
        loss = train_step(model, optimizer, x_train[idx], y_train[idx])
        if step == begin - 1:
            dense_acc = float(accuracy(model, x_test, y_test))
        if step % 50 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{float(loss):.3f}", sparsity=f"{prune.sparsity(model).total:.1%}")
    report = prune.sparsity(model)
    final_acc = float(accuracy(model, x_test, y_test))

    packed = jax_tw.nnx.pack(model)
    packed_acc = float(accuracy(packed, x_test, y_test))
    # The dense baseline: the same network with nnx.Linear layers and the same (pruned) weights.
    dense = MLP(dim, args.hidden, classes, args.tile_size, nnx.Rngs(args.seed))
    nnx.update(dense, nnx.state(model, nnx.Param))
    dense.hidden = nnx.List([nnx.Linear(layer.in_features, layer.out_features, rngs=nnx.Rngs(0))
                             for layer in model.hidden])
    for src, dst in zip(model.hidden, dense.hidden):
        dst.kernel[...], dst.bias[...] = src.kernel[...], src.bias[...]
    forward = nnx.jit(lambda m, x: m(x))
    x_time = jnp.asarray(np.random.default_rng(0).normal(size=(args.time_batch, dim)), jnp.float32)
    np.testing.assert_allclose(np.asarray(forward(packed, x_time)), np.asarray(forward(dense, x_time)),
                               rtol=1e-3, atol=1e-3)
    t_dense, t_packed = [], []
    for _ in range(3):  # interleaved, so both see the same machine load
        t_dense.append(median_seconds(forward, dense, x_time, repeats=args.repeats))
        t_packed.append(median_seconds(forward, packed, x_time, repeats=args.repeats))
    t_dense, t_packed = float(np.median(t_dense)), float(np.median(t_packed))
    speedup = t_dense / t_packed

    print(report)
    print(f"test accuracy: dense (step {begin}) {dense_acc:.2%}, pruned {final_acc:.2%}, "
          f"packed {packed_acc:.2%}")
    print(f"inference, {args.time_batch} rows: dense {1e3 * t_dense:.2f} ms, packed "
          f"{1e3 * t_packed:.2f} ms: {speedup:.2f}x (backend {jax_tw.ops.backend_for()})")
    return {"dense_accuracy": dense_acc, "accuracy": final_acc, "packed_accuracy": packed_acc,
            "sparsity": report.total, "speedup": speedup, "model": model, "packed": packed}


if __name__ == "__main__":
    main()
