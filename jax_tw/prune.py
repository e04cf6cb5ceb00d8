"""Pruning during training: schedules and an optax transform that owns the tile-wise masks.

>>> import jax, jax.numpy as jnp, optax
>>> from jax_tw import nn, prune
>>> model = nn.TWDense(features=64, tile_size=16)
>>> variables = model.init(jax.random.key(0), jnp.ones((1, 32)))
>>> tx = optax.chain(
...     optax.adamw(1e-3),
...     prune.step(variables['tw_mask'], prune.cubic(0.75, begin=0, end=100),
...                tile_size=16, update_every=10))
>>> opt_state = tx.init(variables['params'])
>>> # in the train step: updates, opt_state = tx.update(grads, opt_state, params)
>>> masks = prune.masks(opt_state)  # shaped like variables['tw_mask']

How the transform works, each step:

1. Taylor scores (``score='taylor'``) accumulate ``(g * w)^2`` from the *true* gradients, which the
   caller passes as an extra argument: ``tx.update(grads, opt_state, params, grads=grads)``
   (``taylor_grads=grads`` is the same; ``nnx.Optimizer.update`` reserves the name ``grads``,
   so there it is ``optimizer.update(model, grads, taylor_grads=grads)``)
   (``optax.chain`` hands extra arguments to every transform). The ``updates`` that reach this
   transform have been through the optimizer (Adam's normalisation, learning rate...), so they
   are never used as gradients. Magnitude scores use ``|params + updates|``, the weights as they
   will be after this step.
2. When ``count % update_every == 0`` or ``count`` is one of the schedule's ``boundaries`` (a
   stage start, a cubic ramp's end), and the schedule's sparsity rose above the last applied one,
   the masks are recomputed (inside ``jax.lax.cond``, so the step stays one jitted function) from
   the scores, with the previous masks as ``previous`` (masks only grow), and the Taylor
   accumulators are reset.
3. The outgoing updates of every pruned weight are ``-params``, so ``optax.apply_updates`` leaves
   it exactly zero: no separate call after ``apply_updates`` is needed.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from flax.core import meta

from jax_tw import patterns

__all__ = [
    "Cubic", "Stages", "cubic", "stages", "one_shot", "PruneState", "step", "masks",
    "sparsity", "SparsityReport",
]

Path = tuple  # a tuple of str keys into a params / tw_mask tree


# ----------------------------------------------------------------------------- schedules

def _check_step(value: Any, name: str) -> int:
    """A step as an int; the step count is int32, so steps end below 2**31."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2 ** 31:
        raise ValueError(f"{name} must be an integer step in [0, 2**31), got {value!r}")
    return int(value)


class Cubic(NamedTuple):
    """Cubic ramp (Zhu and Gupta, 2017): ``initial`` before ``begin``, ``final`` from ``end``.

    ``s(t) = final + (initial - final) * (1 - (t - begin) / (end - begin)) ** 3`` in between.
    Build it with :func:`cubic`, which validates the arguments.
    """

    final: float
    begin: int
    end: int
    initial: float = 0.0

    def __call__(self, step: Any) -> jax.Array:
        t = jnp.asarray(step, jnp.float32)
        span = max(self.end - self.begin, 1)
        progress = jnp.clip((t - self.begin) / span, 0.0, 1.0)
        ramp = self.final + (self.initial - self.final) * (1.0 - progress) ** 3
        return jnp.where(t < self.begin, self.initial, jnp.where(t >= self.end, self.final, ramp))

    @property
    def boundaries(self) -> tuple[int, ...]:
        """Steps where the schedule jumps or settles; :func:`step` updates masks there too."""
        return (self.begin, self.end)


class Stages(NamedTuple):
    """Piecewise constant: sparsity ``sparsities[i]`` from step ``steps[i]`` on (0 before)."""

    steps: tuple[int, ...]
    sparsities: tuple[float, ...]

    @property
    def final(self) -> float:
        return self.sparsities[-1]

    @property
    def boundaries(self) -> tuple[int, ...]:
        """The stage starts; :func:`step` updates masks there too."""
        return self.steps

    def __call__(self, step: Any) -> jax.Array:
        t = jnp.asarray(step, jnp.int32)
        reached = t >= jnp.asarray(self.steps, jnp.int32)
        values = jnp.asarray(self.sparsities, jnp.float32)
        return jnp.max(jnp.where(reached, values, 0.0))


def cubic(final: float, begin: int, end: int, initial: float = 0.0) -> Cubic:
    """A cubic sparsity ramp from ``initial`` at step ``begin`` to ``final`` at step ``end``.

    >>> s = cubic(0.75, begin=100, end=1100)
    >>> [round(float(s(t)), 4) for t in (0, 100, 600, 1100, 5000)]
    [0.0, 0.0, 0.6562, 0.75, 0.75]
    """
    patterns.check_sparsity(final, "final sparsity")
    patterns.check_sparsity(initial, "initial sparsity")
    begin, end = _check_step(begin, "begin"), _check_step(end, "end")
    if end < begin:
        raise ValueError(f"the schedule's end must not precede its begin, got end={end} < begin={begin}")
    if final < initial:
        raise ValueError(f"final sparsity must be >= initial, got final={final!r} < initial={initial!r}")
    return Cubic(float(final), begin, end, float(initial))


def stages(pairs: Sequence[tuple[int, float]]) -> Stages:
    """Sparsity stages like the paper's: ``[(step, sparsity), ...]``, steps increasing.

    >>> s = stages([(0, 0.25), (100, 0.5), (200, 0.75)])
    >>> [float(s(t)) for t in (0, 99, 100, 250)]
    [0.25, 0.25, 0.5, 0.75]
    """
    pairs = list(pairs)
    if not pairs:
        raise ValueError("stages needs at least one (step, sparsity) pair, got none")
    steps = [_check_step(t, "stage step") for t, _ in pairs]
    for _, s in pairs:
        patterns.check_sparsity(s, "stage sparsity")
    values = [float(s) for _, s in pairs]
    for a, b in zip(steps, steps[1:]):
        if b <= a:
            raise ValueError(f"stage steps must increase, got {b} after {a}")
    for a, b in zip(values, values[1:]):
        if b < a:
            raise ValueError(f"stage sparsities must not decrease, got {b!r} after {a!r}")
    return Stages(tuple(steps), tuple(values))


def one_shot(sparsity: float, at: int = 0) -> Stages:
    """Prune once, to ``sparsity``, at step ``at``."""
    return stages([(at, sparsity)])


# ----------------------------------------------------------------------------- tree helpers

def _path_key(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _kernel_path(layer: Path) -> Path:
    return tuple(layer) + ("kernel",)


# ----------------------------------------------------------------------------- the transform

class PruneState(NamedTuple):
    """State of :func:`step`."""

    count: jax.Array  # int32 (), steps seen
    sparsity: jax.Array  # float32 (), target of the last mask update
    masks: Any  # tw_mask tree: {layer path...: {'columns', 'rows', 'elements'}}
    scores: Any  # {layer name: (K, N) float32} Taylor accumulators of pruned layers, or {}


def _default_layers(path: Path) -> bool:
    return True


def _mask_tree(tw_mask: Any) -> Any:
    """A ``tw_mask`` tree as plain dicts: an NNX model or ``nnx.state(model, TWMask)`` becomes
    the same layer masks a linen model's ``tw_mask`` collection holds (see jax_tw.nnx.masks)."""
    from flax import nnx

    from jax_tw import nnx as twnnx
    if isinstance(tw_mask, nnx.Module) or any(
            isinstance(v, twnnx.TWMask) for v in jax.tree_util.tree_leaves(
                tw_mask, is_leaf=lambda x: isinstance(x, nnx.Variable))):
        return twnnx.masks(tw_mask)
    return tw_mask


def _with_elements(mask: dict, has_elements: bool, where: str) -> dict:
    """A layer mask with an element mask exactly when the pattern makes one: tile-wise patterns
    have none, so the state holds no (K, N) mask for them (one byte per weight saved)."""
    mask = dict(mask)
    if has_elements and "elements" not in mask:
        k, n = jnp.shape(mask["rows"])[1], jnp.shape(mask["columns"])[0]
        mask["elements"] = jnp.zeros((k, n), bool)
    elif not has_elements and "elements" in mask:
        elements = mask.pop("elements")
        if not isinstance(elements, jax.core.Tracer) and np.asarray(elements).any():
            raise ValueError(f"tw_mask {where} keeps weights in 'elements', which this tile-wise "
                             "pattern has no place for; prune it with a pattern that has a residue "
                             "(TEW, EW, VW, BW)")
    return mask


def _layer_name(layer: tuple[Path, tuple]) -> str:
    path, index = layer
    return "/".join(path) + (f"[{','.join(map(str, index))}]" if index else "")


def _unstack(mask_layers: dict[Path, Any]) -> dict[tuple[Path, tuple], Any]:
    """{(path, index): layer mask}: one entry per copy of a stacked layer (index into its
    leading axes), one with index () for a single layer."""
    out = {}
    for path, mask in mask_layers.items():
        stack = patterns.check_stack(mask, f"tw_mask {'/'.join(path)}")
        for index in np.ndindex(stack):
            out[path, index] = {key: v[index] for key, v in mask.items()} if index else dict(mask)
    return out


def _restack(layers: dict[tuple[Path, tuple], Any], stacks: dict[Path, tuple]) -> dict[Path, Any]:
    """The inverse of :func:`_unstack`: {path: value}, the values (dicts of arrays, or arrays)
    of each layer stacked back over its leading axes ``stacks[path]`` (C order, as np.ndindex
    walks them)."""
    groups: dict[Path, list] = {}
    for (path, _), value in layers.items():
        groups.setdefault(path, []).append(value)
    out = {}
    for path, values in groups.items():
        stack = stacks[path]

        def stacked(vs):
            return jnp.stack(vs).reshape(stack + tuple(jnp.shape(vs[0]))) if stack else vs[0]
        out[path] = ({key: stacked([v[key] for v in values]) for key in values[0]}
                     if hasattr(values[0], "keys") else stacked(values))
    return out


def step(tw_mask: Any, schedule: Callable[[Any], Any], *, pattern: patterns.Pattern | None = None,
         tile_size: int | None = None, update_every: int = 100, score: str = "magnitude",
         layers: Callable[[Path], bool] = _default_layers, per_layer: bool = False,
         min_keep: float = 0.05) -> optax.GradientTransformationExtraArgs:
    """An optax transform that prunes TWDense kernels during training.

    Put it last in an ``optax.chain``, after the optimizer (and after clipping): a transform
    after it would rescale the updates that zero pruned weights. Its state holds the masks;
    read them with :func:`masks` and pass them as the model's ``tw_mask`` collection.

    Args:
      tw_mask: the model's ``tw_mask`` collection (from ``model.init``; for the layers of an
        unmodified linen model, from :func:`jax_tw.intercept.init`): which layers exist and
        their starting masks. For Flax NNX, the model itself or ``nnx.state(model,
        jax_tw.nnx.TWMask)``. A kernel may have more than two dims (``DenseGeneral``): it is
        pruned as the (K, N) matrix it multiplies as, K its leading dims.
      schedule: step -> total sparsity, e.g. :func:`cubic`, :func:`stages`, :func:`one_shot`;
        must have a ``final`` attribute (the sparsity it ends at).
      pattern: a :mod:`jax_tw.patterns` pattern (default ``TW2D()``).
      tile_size: G of the TWDense layers; by default the one their masks carry (given, it must
        equal it). All pruned layers share one G.
      update_every: recompute masks every this many steps (when the schedule's sparsity rose),
        and at the schedule's ``boundaries`` (if it has that attribute: stage starts, a cubic
        ramp's begin and end) whatever ``update_every`` is.
      score: ``'magnitude'`` (``|w|``) or ``'taylor'`` (``(g * w)^2`` summed over the steps since
        the last update; needs ``grads=`` (or ``taylor_grads=``) passed to ``update``, see the
        module docstring).
      layers: filter on the kernel's param path (a tuple of str, e.g.
        ``('encoder', 'query', 'kernel')``): True to prune it. Default: every TWDense kernel.
      per_layer: rank each layer alone instead of one global ranking.
      min_keep: per-layer floor on the kept fraction (see :mod:`jax_tw.patterns`).
    """
    pattern = patterns.TW2D() if pattern is None else pattern
    if not isinstance(pattern, patterns.Pattern):
        raise ValueError(f"pattern must be a jax_tw.patterns.Pattern such as TW2D(), got {pattern!r}")
    update_every = patterns.check_positive_int(update_every, "update_every")
    boundaries = tuple(_check_step(b, "schedule boundary") for b in getattr(schedule, "boundaries", ()))
    if score not in ("magnitude", "taylor"):
        raise ValueError(f"score must be 'magnitude' or 'taylor', got {score!r}")
    final = getattr(schedule, "final", None)
    if final is None:
        raise ValueError(f"schedule must have a 'final' sparsity (use prune.cubic, prune.stages or "
                         f"prune.one_shot), got {schedule!r}")
    patterns.check_sparsity(final, "the schedule's final sparsity")
    min_keep = patterns.check_fraction(min_keep, "min_keep")
    model_masks = patterns.layer_masks(_mask_tree(tw_mask))
    if not model_masks:
        raise ValueError("tw_mask holds no layer masks: pass the model's variables['tw_mask']")
    stacks = {p: patterns.stack_axes(m) for p, m in model_masks.items()}
    # Each copy of a layer that nn.scan or nnx.vmap stacked is pruned as a layer of its own:
    # (path, index) keys the layers below, index () for an unstacked one.
    mask_layers = _unstack({p: m for p, m in model_masks.items() if layers(_kernel_path(p))})
    pruned = list(mask_layers)
    if not pruned:
        raise ValueError("the layers filter selects none of the tw_mask layers "
                         f"{['/'.join(p) for p in model_masks]}")
    names = {p: _layer_name(p) for p in pruned}
    sizes = {p: patterns.mask_tile_size(mask_layers[p], tile_size, f"tw_mask {names[p]}") for p in pruned}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"the pruned layers have different tile sizes {sorted(set(sizes.values()))} "
                         "(from their masks); one prune.step ranks layers of one tile size: give "
                         "the pruned TWDense layers the same tile_size, or leave the others out "
                         "with the layers filter")
    tile_size = sizes[pruned[0]]
    matrix = {p: patterns.mask_matrix_shape(mask_layers[p]) for p in pruned}  # (K, N) of each
    for p in pruned:
        patterns.check_layer_mask(mask_layers[p], *matrix[p], tile_size, where=f"tw_mask {names[p]}")
    for p in pruned:  # the structure the pattern returns: the marker, elements if it has them
        mask_layers[p] = dict(_with_elements(mask_layers[p], pattern.has_elements, names[p]),
                              **{patterns.TILE_KEY: jnp.asarray(patterns.tile_marker(tile_size))})
    initial_masks = traverse_util.unflatten_dict(
        {path + (key,): jnp.asarray(v)
         for path, m in {**model_masks, **_restack(mask_layers, stacks)}.items() for key, v in m.items()})

    def kernels(tree: Any, what: str) -> dict[Path, jax.Array]:
        """The pruned layers' kernels in ``tree`` as (K, N) matrices (a DenseGeneral kernel's
        leading dims are K), each shape checked against its mask."""
        flat = traverse_util.flatten_dict(patterns.plain_dict(tree))
        out = {}
        for p in pruned:
            (path, index), kp = p, _kernel_path(p[0])
            if kp not in flat:
                raise ValueError(f"{what} has no kernel at {'/'.join(kp)} for the tw_mask layer "
                                 f"{'/'.join(path)}: the mask tree doesn't match the params")
            kernel = meta.unbox(flat[kp])
            stack = stacks[path]
            if tuple(jnp.shape(kernel))[:len(stack)] != stack:
                raise ValueError(
                    f"{what} of tw_mask {'/'.join(path)}: the kernel has shape "
                    f"{tuple(jnp.shape(kernel))}, but its mask stacks the layer over leading axes "
                    f"{stack} (as nn.scan or nnx.vmap do), which the kernel must lead with too")
            out[p] = patterns.kernel_matrix(kernel[index] if index else kernel, mask_layers[p],
                                            tile_size, where=f"{what} of tw_mask {names[p]}")
        return out

    def init_fn(params: Any) -> PruneState:
        weights = kernels(params, "params")  # (each kernel's shape checked against its mask)
        scores = {}
        if score == "taylor":
            scores = {names[p]: jnp.zeros(jnp.shape(w), jnp.float32) for p, w in weights.items()}
        return PruneState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32),
                          initial_masks, scores)

    def update_fn(updates: Any, state: PruneState, params: Any = None, *, grads: Any = None,
                  taylor_grads: Any = None,
                  **extra_args: Any) -> tuple[Any, PruneState]:
        del extra_args
        if params is None:
            raise ValueError("jax_tw.prune.step needs params: call tx.update(grads, opt_state, params)")
        if not isinstance(state, PruneState):
            raise ValueError(f"expected a PruneState, got {type(state).__name__}: make sure you "
                             "have called init first")
        w = kernels(params, "params")
        u = kernels(updates, "updates")
        acc = dict(state.scores)
        if score == "taylor":
            if grads is not None and taylor_grads is not None:
                raise ValueError("pass the true gradients once: grads= or taylor_grads=, not both")
            grads = taylor_grads if grads is None else grads
            if grads is None:
                raise ValueError(
                    "score='taylor' needs the true gradients: call "
                    "tx.update(grads, opt_state, params, grads=grads) (with nnx.Optimizer: "
                    "optimizer.update(model, grads, taylor_grads=grads))")
            g = kernels(grads, "grads")
            for p in pruned:
                acc[names[p]] = acc[names[p]] + jnp.square(
                    g[p].astype(jnp.float32) * w[p].astype(jnp.float32))
        target = jnp.asarray(schedule(state.count), jnp.float32)
        on_time = state.count % update_every == 0
        for b in boundaries:
            on_time = on_time | (state.count == b)
        due = on_time & (target > state.sparsity)
        state_masks = patterns.layer_masks(state.masks)
        layer_masks = _unstack({p: state_masks[p] for p in {path for path, _ in pruned}})

        def recompute(_):
            if score == "taylor":
                scores = [acc[names[p]] for p in pruned]
            else:
                scores = [jnp.abs((w[p] + u[p]).astype(jnp.float32)) for p in pruned]
            new = pattern(scores, target, tile_size=tile_size,
                          previous=[layer_masks[p] for p in pruned], final_sparsity=final,
                          per_layer=per_layer, min_keep=min_keep)
            fresh = {names[p]: jnp.zeros_like(a) for p, a in zip(pruned, scores)} if acc else {}
            return new, fresh

        def keep(_):
            return [layer_masks[p] for p in pruned], acc

        new_masks, acc = jax.lax.cond(due, recompute, keep, None)
        new_masks = dict(zip(pruned, new_masks))
        flat_masks = {path + (key,): v for path, m in {**state_masks, **_restack(new_masks, stacks)}.items()
                      for key, v in m.items()}
        dense = {_kernel_path(path): m for path, m in _restack(  # (..., K, N)
            {p: patterns.dense_mask(m, tile_size) for p, m in new_masks.items()}, stacks).items()}

        def mask_update(path, upd, param):
            key = tuple(_path_key(e) for e in path)
            if key not in dense:
                return upd
            if isinstance(upd, meta.AxisMetadata):  # a boxed param (nn.with_partitioning)
                return upd.replace_boxed(mask_update(path, upd.unbox(), param))
            return jnp.where(dense[key].reshape(jnp.shape(upd)), upd, -meta.unbox(param)).astype(upd.dtype)

        updates = jax.tree_util.tree_map_with_path(
            mask_update, updates, params, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))
        new_state = PruneState(
            count=optax.safe_increment(state.count),
            sparsity=jnp.where(due, target, state.sparsity),
            masks=traverse_util.unflatten_dict(flat_masks),
            scores=acc)
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- reading the state

def masks(opt_state: Any) -> Any:
    """The masks held by the :func:`step` inside ``opt_state`` (or an ``nnx.Optimizer``),
    shaped like the ``tw_mask`` collection:
    ``model.apply({'params': params, 'tw_mask': prune.masks(opt_state)}, x)``; for NNX,
    ``jax_tw.nnx.set_masks(model, prune.masks(optimizer))``."""
    found = [s for s in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(x, PruneState)) if isinstance(s, PruneState)]
    if not found:
        raise ValueError("opt_state holds no jax_tw.prune.step state: was the optimizer built "
                         "with jax_tw.prune.step in its chain?")
    if len(found) > 1:
        raise ValueError(f"opt_state holds {len(found)} jax_tw.prune.step states; expected one")
    return patterns.plain_dict(found[0].masks)  # nnx.Optimizer wraps the leaves in Variables


class SparsityReport(NamedTuple):
    """Sparsity (fraction of weights pruned) of each layer and of all of them together."""

    layers: dict[str, float]
    total: float

    def __str__(self) -> str:
        width = max([len(k) for k in self.layers] + [5])
        lines = [f"{name:<{width}}  {s:7.2%}" for name, s in self.layers.items()]
        lines.append(f"{'total':<{width}}  {self.total:7.2%}")
        return "\n".join(lines)


def sparsity(tw_mask: Any, tile_size: int | None = None,
             layers: Callable[[Path], bool] = _default_layers) -> SparsityReport:
    """Measures the sparsity of a ``tw_mask`` tree (or the masks in an ``opt_state``).

    Only layers whose kernel path passes ``layers`` count, as in :func:`step`. ``tile_size``
    defaults to each mask's own; given, it must equal it.
    """
    if any(isinstance(s, PruneState) for s in jax.tree_util.tree_leaves(
            tw_mask, is_leaf=lambda x: isinstance(x, PruneState))):
        tw_mask = masks(tw_mask)
    per_layer, kept, total = {}, 0, 0
    tw_mask = _mask_tree(tw_mask)
    selected = {p: m for p, m in patterns.layer_masks(tw_mask).items() if layers(_kernel_path(p))}
    for layer, m in _unstack(selected).items():  # each copy of a stacked layer on its own
        k, n = patterns.mask_matrix_shape(m)
        where = f"tw_mask {_layer_name(layer)}"
        g = patterns.check_layer_mask(m, k, n, tile_size, where=where)
        layer_kept = int(np.asarray(patterns.dense_mask(m, g)).sum())
        per_layer[_layer_name(layer)] = 1.0 - layer_kept / (k * n)
        kept += layer_kept
        total += k * n
    return SparsityReport(per_layer, 1.0 - kept / total if total else 0.0)
