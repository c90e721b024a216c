"""Transfer learning: start from another model's variables, re-initialise some layers, freeze others, and train
the transferred ones at a smaller learning rate.

A *layer* is a top-level entry of the params tree (`layer_names`): 'layer0'... and 'classifier' for the MLP,
'conv1', 'fc1'... for the conv nets, 'stem', 'stage1_block0'... for the ResNets (every model's linear
classifier is 'classifier'). Each layer of the new model gets one label (`labels`):

  frozen       copied from the source and never updated: `optax.set_to_zero()` for the whole optimiser chain, so
               neither the gradient nor weight decay (L2 or decoupled, which live inside the chain) moves it;
  transferred  copied from the source and trained at `lr_scale` times the learning rate (decoupled weight decay,
               being lr_t * wd * x, scales with it);
  new          re-initialised (the fresh initialisation of the new model, from its own seed) and trained at the
               full learning rate.

`optimizer` builds the `optax.multi_transform` over those labels; `transfer_variables` copies params and
BatchNorm statistics (never optimiser state) with a check of every shape. BatchNorm in a frozen layer: its
running statistics stay the source's (`keep_frozen_stats` after each step), so the frozen layer computes at
evaluation exactly what it did in the source model; in training mode it still normalises with the batch's own
statistics, as every BatchNorm does.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import optax

from dlcore import checks

__all__ = ["LABELS", "check_layers", "keep_frozen_stats", "labels", "layer_names", "optimizer",
           "transfer_variables"]

LABELS = ("frozen", "transferred", "new")


def layer_names(params: Mapping[str, Any]) -> tuple[str, ...]:
  """The top-level layer names of a params tree, in the model's order."""
  return tuple(params)


def check_layers(arg: str, names: Sequence[str], params: Mapping[str, Any]) -> tuple[str, ...]:
  """`names` as a tuple when every one is a layer of `params`; ValueError naming `arg`, the unknown names and
  the valid ones otherwise."""
  valid = layer_names(params)
  unknown = [n for n in names if n not in valid]
  if unknown:
    raise ValueError(f"{arg}: no layer {', '.join(map(repr, unknown))} in the model; its layers: {', '.join(valid)}")
  return tuple(names)


def labels(params: Mapping[str, Any], *, reinit: Sequence[str] = ("classifier",),
           freeze: Sequence[str] = ()) -> dict:
  """A tree like `params` holding each leaf's label (`LABELS`): 'new' in the `reinit` layers, 'frozen' in the
  `freeze` layers, 'transferred' elsewhere. A layer both re-initialised and frozen is a ValueError."""
  check_layers("reinit", reinit, params)
  check_layers("freeze", freeze, params)
  both = [n for n in freeze if n in reinit]
  if both:
    raise ValueError(f"freeze and reinit both name {', '.join(map(repr, both))}: a re-initialised layer is "
                     "trained, a frozen one keeps the source's values")
  label = lambda name: "new" if name in reinit else "frozen" if name in freeze else "transferred"
  return {name: jax.tree.map(lambda _, n=name: label(n), tree) for name, tree in params.items()}


def _scaled(learning_rate, scale: float):
  if callable(learning_rate):
    return lambda count: learning_rate(count) * scale
  return learning_rate * scale


def optimizer(make: Callable[[Any], optax.GradientTransformation], learning_rate,
              label_tree: dict | Callable[[Any], dict], *, lr_scale: float = 1.0,
              clip_norm: float | None = None) -> optax.GradientTransformation:
  """The optimiser `make(learning_rate)` per label: zero updates for 'frozen', `make(lr_scale * learning_rate)`
  for 'transferred' and `make(learning_rate)` for 'new' (`learning_rate` a float or a schedule; `label_tree` a
  tree of `labels`, or a function of the params returning one).

  `make` should not clip: with `clip_norm` the whole gradient, frozen layers' gradients set to zero first, is
  clipped to that global norm once, before the per-label optimisers.
  """
  checks.positive("lr_scale", lr_scale)
  inner = optax.multi_transform({"frozen": optax.set_to_zero(),
                                 "transferred": make(_scaled(learning_rate, lr_scale)),
                                 "new": make(learning_rate)}, label_tree)
  if clip_norm is None:
    return inner
  checks.positive("clip_norm", clip_norm)
  zero_frozen = optax.multi_transform({"frozen": optax.set_to_zero(), "transferred": optax.identity(),
                                       "new": optax.identity()}, label_tree)
  return optax.chain(zero_frozen, optax.clip_by_global_norm(clip_norm), inner)


def _path(keys) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in keys)


def transfer_variables(source: Mapping[str, Any], target: Mapping[str, Any],
                       reinit: Sequence[str] = ("classifier",)) -> dict:
  """`target` ({'params', 'batch_stats'}) with every layer not in `reinit` replaced by the source's.

  The layers must match: a layer missing from the source, or an array whose shape differs, is a ValueError naming
  the layer's path and both shapes. Arrays take the target's dtype.
  """
  out = {}
  for collection in ("params", "batch_stats"):
    src, tgt = source.get(collection, {}), target.get(collection, {})
    merged = {}
    for name, tree in tgt.items():
      if name in reinit:
        merged[name] = tree
        continue
      if name not in src:
        raise ValueError(f"layer {name!r} ({collection}) is not in the source model (its layers: "
                         f"{', '.join(src) or 'none'}); re-initialise it (reinit) or use a source that has it")
      src_leaves = dict((_path(k), v) for k, v in jax.tree_util.tree_flatten_with_path(src[name])[0])
      tgt_leaves = jax.tree_util.tree_flatten_with_path(tree)
      values = []
      for keys, leaf in tgt_leaves[0]:
        path = _path(keys)
        value = src_leaves.get(path)
        if value is None or tuple(value.shape) != tuple(leaf.shape):
          shape = "missing" if value is None else tuple(value.shape)
          raise ValueError(f"layer {name!r}: {collection} {name}/{path} has shape {shape} in the source and "
                           f"{tuple(leaf.shape)} in this model; re-initialise the layer (reinit) or match the model")
        values.append(jax.numpy.asarray(value, leaf.dtype))
      merged[name] = jax.tree_util.tree_unflatten(tgt_leaves[1], values)
    out[collection] = merged
  return out


def keep_frozen_stats(old: Mapping[str, Any], new: Mapping[str, Any], freeze: Sequence[str]) -> dict:
  """BatchNorm statistics `new` with the `freeze` layers' entries taken from `old` (jittable)."""
  return {name: old[name] if name in freeze else tree for name, tree in new.items()}
