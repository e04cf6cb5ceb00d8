"""jax_tw: tile-wise sparsity for JAX.

Modules, in the order data flows: :mod:`jax_tw.patterns` (scores -> masks), :mod:`jax_tw.nn`
(Flax layers that carry masks), :mod:`jax_tw.prune` (the optax transform that prunes during
training); :mod:`jax_tw.nnx` (the same for Flax NNX) and :mod:`jax_tw.intercept` (for unmodified
linen models built from ``nn.Dense`` / ``nn.DenseGeneral``).
"""

from jax_tw import intercept, nn, nnx, patterns, prune

__all__ = ["intercept", "nn", "nnx", "patterns", "prune"]
__version__ = "0.1.0"
