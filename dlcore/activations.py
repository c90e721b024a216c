"""Activation functions by name."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dlcore import checks

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


def get(name: str) -> Activation:
  """Returns the activation called `name` (ValueError listing the valid names otherwise)."""
  return checks.lookup("activation", _ACTIVATIONS, name)
