"""jax_tw: tile-wise sparsity for JAX.

Modules, in the order data flows: :mod:`jax_tw.patterns` (scores -> masks), :mod:`jax_tw.nn`
(Flax layers that carry masks), :mod:`jax_tw.prune` (the optax transform that prunes during
training).
"""

from jax_tw import nn, patterns, prune

__all__ = ["nn", "patterns", "prune"]
__version__ = "0.1.0"
