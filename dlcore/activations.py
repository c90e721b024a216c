"""Activation functions by name; `get` also passes a callable through (`jax.nn.silu`, a lambda)."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dlcore import checks

__all__ = ["NAMES", "Activation", "get"]

Activation = Callable[[jax.Array], jax.Array]

_ACTIVATIONS: dict[str, Activation] = {
    "identity": lambda x: x,
    "linear": lambda x: x,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, negative_slope=0.01),
    "elu": jax.nn.elu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "softplus": jax.nn.softplus,
    "swish": jax.nn.swish,
}

NAMES = tuple(sorted(_ACTIVATIONS))


def get(name_or_fn: str | Activation) -> Activation:
  """The activation called `name_or_fn`, or `name_or_fn` itself when it is a callable (ValueError listing the
  valid names otherwise). 'gelu' is the exact erf form; 'leaky_relu' has slope 0.01."""
  if callable(name_or_fn):
    return name_or_fn
  if not isinstance(name_or_fn, str):
    raise ValueError(f"activation must be a name ({', '.join(NAMES)}) or a callable; got {name_or_fn!r}")
  return checks.lookup("activation", _ACTIVATIONS, name_or_fn)
