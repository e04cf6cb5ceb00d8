"""How long a pattern takes to compute the masks of a whole model's pruned layers.

    python -P scripts/pattern_speed.py                     # MiniLM-L6 shapes (384 / 1536, 6 layers)
    python -P scripts/pattern_speed.py --hidden 768 --layers 12 --patterns tew
                                                           # BERT-base shapes

Every encoder layer has four (H, H) matrices and the (H, 4H) and (4H, H) FFN ones. The
patterns run eagerly on random scores at 75%, one global ranking, G = 64: the first call
compiles the masks' computation for these shapes, the later ones reuse it (a mask update
during training, where the sparsity changes but the shapes do not). Prints seconds per call.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from jax_tw import patterns

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--hidden", type=int, default=384)
ap.add_argument("--layers", type=int, default=6)
ap.add_argument("--patterns", default="tw2d,tew,ew", help="comma-separated pattern names")
ap.add_argument("--calls", type=int, default=3)
args = ap.parse_args()

h = args.hidden
shapes = ([(h, h)] * 4 + [(h, 4 * h), (4 * h, h)]) * args.layers
key = jax.random.key(0)
scores = [jnp.abs(jax.random.normal(jax.random.fold_in(key, i), s)) for i, s in enumerate(shapes)]
weights = sum(a * b for a, b in shapes)
for name in args.patterns.split(","):
    pattern = patterns.get(name)
    times = []
    for i in range(args.calls):
        t = time.perf_counter()
        jax.block_until_ready(pattern(scores, 0.75 - 0.01 * i, tile_size=64))
        times.append(time.perf_counter() - t)
    print(f"{name}: {len(shapes)} matrices, {weights / 1e6:.1f}M weights: first call "
          f"{times[0]:.2f} s, then " + ", ".join(f"{t:.2f}" for t in times[1:]) + " s")
