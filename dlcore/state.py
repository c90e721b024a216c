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


class TrainState(train_state.TrainState):
  batch_stats: Any
  rng: jax.Array

  def variables(self) -> dict:
    """The model variables for `apply_fn`."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def create(model: nn.Module, tx: optax.GradientTransformation, sample: jax.Array, seed: int,
           *, lsuv_batch: jax.Array | None = None) -> TrainState:
  """Initialises `model` on `sample` (one batch of inputs) with PRNG seed `seed`; LSUV needs `lsuv_batch`."""
  init_key, step_key = jax.random.split(jax.random.key(seed))
  variables = models.init_variables(model, init_key, sample, lsuv_batch=lsuv_batch)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables["batch_stats"], rng=step_key)
