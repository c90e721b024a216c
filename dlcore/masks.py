"""Which parameters are 'weights': the targets of L1/L2 penalties and weight decay.

Kernels of Dense and Conv layers are weights; biases and BatchNorm scale/offset are not (they set location and
scale, and penalising them only fights the normalisation).
"""

import jax
from flax import traverse_util

__all__ = ["weights", "weights_mask"]


def weights_mask(params):
  """A pytree like `params` holding True at every leaf named 'kernel' and False elsewhere."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({path: path[-1] == "kernel" for path in flat})


def weights(params) -> list[jax.Array]:
  """The kernel arrays of `params`, in tree order."""
  return [leaf for path, leaf in traverse_util.flatten_dict(params).items() if path[-1] == "kernel"]
