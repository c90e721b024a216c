"""Activation and gradient statistics per layer (the cs231n 'activation statistics' questions).

Layers are the modules that `sow` 'pre' (the nonlinearity's input) and 'post' (its output) into
`intermediates`; every dlcore unit does. They are listed in call order.
"""

from collections.abc import Sequence

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["PERCENTILES", "activations", "gradients", "layer_activations", "saturation", "summarize"]

PERCENTILES = (1, 15, 50, 85, 99)


def layer_activations(intermediates) -> list[dict]:
  """[{'name': 'layer0', 'pre': array, 'post': array}, ...] in call order, from an `intermediates` tree."""
  layers: dict[tuple, dict] = {}
  for path, value in traverse_util.flatten_dict(intermediates).items():
    *module, kind = path
    if kind in ("pre", "post"):
      layers.setdefault(tuple(module), {"name": "/".join(module)})[kind] = value[-1]
  return list(layers.values())


def saturation(post: np.ndarray, activation: str) -> float:
  """Fraction of saturated units: |tanh| > 0.99, sigmoid outside (0.01, 0.99), relu-family exactly 0 (dead)."""
  post = np.asarray(post)
  if activation == "tanh":
    return float(np.mean(np.abs(post) > 0.99))
  if activation == "sigmoid":
    return float(np.mean((post < 0.01) | (post > 0.99)))
  return float(np.mean(post <= 0.0))


def summarize(x, percentiles: Sequence[float] = PERCENTILES) -> dict:
  """Mean, std, min, max and percentiles of all entries of x (float64 on the host)."""
  x = np.asarray(x, np.float64).ravel()
  out = {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max())}
  out.update({f"p{p:g}": float(v) for p, v in zip(percentiles, np.percentile(x, percentiles))})
  return out


def activations(model, variables, inputs, *, train: bool = False, rngs=None) -> list[dict]:
  """Runs `model` on `inputs` and returns `layer_activations` (batch statistics are not updated)."""
  mutable = ["intermediates"] + (["batch_stats"] if train else [])
  _, state = model.apply(variables, inputs, train=train, rngs=rngs, mutable=mutable)
  return layer_activations(state["intermediates"])


def gradients(model, variables, inputs, upstream_key, *, train: bool = False) -> list[dict]:
  """Backpropagates a unit-Gaussian upstream gradient g from the output (loss = sum(output * g)).

  Returns, per layer in call order, {'name', 'grad': dL/d(post-activation), 'weight_grad': dL/d(kernel), or
  None when the layer owns no single kernel (a ResNet block)}. dL/d(post) is the gradient with respect to a
  zero 'perturbations' entry that `layers.record` adds to each layer's output (flax `perturb`); the
  perturbations are built here from the recorded shapes, so the model's own variables never carry them.
  """
  def recorded(v):
    return model.apply(v, inputs, train=train, mutable=["intermediates", "batch_stats"])[1]["intermediates"]

  shapes = traverse_util.flatten_dict(jax.eval_shape(recorded, variables))
  perturbations = traverse_util.unflatten_dict(
      {path[:-1] + ("post",): jnp.zeros(s[-1].shape, s[-1].dtype) for path, s in shapes.items()
       if path[-1] == "post"})
  out_shape = jax.eval_shape(lambda: model.apply(variables, inputs, train=train, mutable=["batch_stats"])[0])
  upstream = jax.random.normal(upstream_key, out_shape.shape, out_shape.dtype)

  def loss(params, perturbations):
    out, _ = model.apply({**variables, "params": params, "perturbations": perturbations}, inputs, train=train,
                         mutable=["batch_stats"])
    return jnp.sum(out * upstream)

  param_grads, act_grads = jax.grad(loss, argnums=(0, 1))(variables["params"], perturbations)
  flat_params = traverse_util.flatten_dict(param_grads)
  by_name = {}
  for path, grad in traverse_util.flatten_dict(act_grads).items():
    module = path[:-1]
    kernels = [g for p, g in flat_params.items() if p[:len(module)] == module and p[-1] == "kernel"]
    by_name["/".join(module)] = {"name": "/".join(module), "grad": grad,
                                 "weight_grad": kernels[0] if len(kernels) == 1 else None}
  call_order = [layer["name"] for layer in activations(model, variables, inputs, train=train)]
  return [by_name[name] for name in call_order if name in by_name]
