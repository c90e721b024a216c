"""TrainState: everything a training step reads and writes, in one pytree.

params, BatchNorm `batch_stats`, optimiser state, step and PRNG key; `apply_fn` and `tx` are static fields.
The dropout key of step t is `fold_in(rng, t)`, so a step is a pure function of the state and the batch.
"""

from typing import Any

import flax.linen as nn
from flax.training import train_state
import jax
import optax

from dlcore import models

__all__ = ["TrainState", "create"]


class TrainState(train_state.TrainState):
  """flax's TrainState (step, params, opt_state; static `apply_fn` and `tx`) plus BatchNorm `batch_stats` and the
  PRNG key `rng`, which stays fixed: step t draws its keys from `fold_in(rng, t)`. Build one with `create`;
  `apply_gradients(grads=g, batch_stats=s)` applies one optimiser update and increments `step`."""
  batch_stats: Any
  rng: jax.Array

  def variables(self) -> dict:
    """The model variables for `apply_fn`."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def create(model: nn.Module, tx: optax.GradientTransformation, sample: jax.Array, seed: int,
           *, lsuv_batch: jax.Array | None = None) -> TrainState:
  """A TrainState at step 0 for `model` initialised on `sample` (one batch of inputs, e.g. NHWC images) with PRNG
  seed `seed` (`models.init_variables`); given `lsuv_batch`, a model whose initializer is 'lsuv' then has its
  kernels LSUV-rescaled on it."""
  init_key, step_key = jax.random.split(jax.random.key(seed))
  variables = models.init_variables(model, init_key, sample, lsuv_batch=lsuv_batch)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables["batch_stats"], rng=step_key)
