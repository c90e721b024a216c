"""Training diagnostics computed inside the compiled step: the numbers the lectures watch while babysitting.

Per layer (a module that records activations, `dlcore.layers.record`: every Dense/Conv unit and ResNet block):
  param_norm/<layer>    ||W||, the layer's weights (kernels; `dlcore.masks.weights_mask`)
  grad_norm/<layer>     ||dL/dW||, the gradient of the step's objective
  update_ratio/<layer>  ||W_new - W|| / ||W||: the step the optimiser took (learning rate, momentum and weight
                        decay included), the ratio the lectures want near 1e-3
  dead/<layer>          relu layers: the fraction of units (features, or channels of a conv) whose output is 0
                        for every example of the batch (and every position)
  saturated/<layer>     tanh / sigmoid layers: the fraction of outputs within 0.01 of the activation's bounds
Weights outside every recording module are attributed to their own module's path. The step computes them only
when it is built with diagnostics; the trainer logs them as means over each log window, like every train metric.
"""

from collections.abc import Callable, Mapping

from flax import traverse_util
import jax
import jax.numpy as jnp

from dlcore import activations, masks, stats

__all__ = ["KINDS", "layer_activations", "step_metrics"]

# activation name -> the per-layer unit statistic it gets ('dead' or 'saturated'); others get none.
KINDS: dict[str, str] = {"relu": "dead", "tanh": "saturated", "sigmoid": "saturated"}

_SATURATED: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": lambda y: jnp.abs(y) > 0.99,
    "sigmoid": lambda y: (y < 0.01) | (y > 0.99),
}


def _activation_name(activation) -> str | None:
  if isinstance(activation, str):
    return activation.lower()
  for name in activations.NAMES:  # a callable from the registry: its name; any other callable: unknown
    if callable(activation) and activations.get(name) is activation:
      return name
  return None


def layer_activations(model, variables: Mapping, sample: jax.Array) -> dict[str, str | None]:
  """{layer name: its activation's name (None when it is an unnamed callable)} for every layer of `model` that
  records activations; traced once on `sample`'s shape, nothing is computed."""
  named: dict[str, str | None] = {}

  def spy(module, method_name):
    named["/".join(module.path)] = _activation_name(getattr(module, "activation", None))
    return False

  recorded = jax.eval_shape(lambda v: model.apply(v, sample, train=False, capture_intermediates=spy,
                                                  mutable=["intermediates"])[1]["intermediates"], variables)
  return {layer["name"]: named.get(layer["name"]) for layer in stats.layer_activations(recorded)}


def _owner(path: tuple[str, ...], layers: list[tuple[str, ...]]) -> str:
  """The deepest layer whose path prefixes `path` (else the parameter's own module)."""
  owners = [layer for layer in layers if path[:len(layer)] == layer]
  return "/".join(max(owners, key=len) if owners else path[:-1])


def _sq_norms_by_layer(tree, weights, layers) -> dict[str, jax.Array]:
  out: dict[str, jax.Array] = {}
  for path, leaf in traverse_util.flatten_dict(tree).items():
    if weights[path]:
      name = _owner(path, layers)
      out[name] = out.get(name, 0.0) + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
  return out


def step_metrics(params, grads, new_params, intermediates, layer_acts: Mapping[str, str | None]) -> dict:
  """The module docstring's per-layer metrics of one step (scalars keyed '<metric>/<layer>').

  `intermediates` is the step's training forward pass's `intermediates` collection; `layer_acts` comes from
  `layer_activations`.
  """
  layers = [tuple(name.split("/")) for name in layer_acts]
  weights = traverse_util.flatten_dict(masks.weights_mask(params))
  w2 = _sq_norms_by_layer(params, weights, layers)
  g2 = _sq_norms_by_layer(grads, weights, layers)
  u2 = _sq_norms_by_layer(jax.tree.map(jnp.subtract, new_params, params), weights, layers)
  metrics = {}
  for name in w2:
    metrics[f"param_norm/{name}"] = jnp.sqrt(w2[name])
    metrics[f"grad_norm/{name}"] = jnp.sqrt(g2[name])
    metrics[f"update_ratio/{name}"] = jnp.sqrt(u2[name]) / jnp.sqrt(w2[name])
  for layer in stats.layer_activations(intermediates):
    name, post = layer["name"], layer["post"]
    activation = layer_acts.get(name)
    if KINDS.get(activation) == "dead":
      alive = jnp.any(post != 0, axis=tuple(range(post.ndim - 1)))
      metrics[f"dead/{name}"] = 1.0 - jnp.mean(alive.astype(jnp.float32))
    elif KINDS.get(activation) == "saturated":
      metrics[f"saturated/{name}"] = jnp.mean(_SATURATED[activation](post.astype(jnp.float32)).astype(jnp.float32))
  return metrics
