"""Pure training and evaluation steps.

`make_train_step` returns `train_step(state, batch) -> (state, metrics)`: the same inputs give the same outputs
bit for bit. Compile it with `jax.jit(step, donate_argnums=0)` (or `dlcore.parallel` for several devices).
Batches are dicts {'image': [N, ...], 'label': [N]} with an optional float 'mask' [N] (0 marks padding) that
eval steps honour, so a padded last batch is counted exactly.
"""

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from dlcore import checks, diagnostics as diagnostics_lib, losses
from dlcore.state import TrainState

__all__ = ["Metrics", "make_eval_step", "make_train_step", "summarize"]

Metrics = dict[str, jax.Array]


def make_train_step(loss: str = "cross_entropy", penalty: str = "none", penalty_strength: float = 0.0,
                    l1_ratio: float = 0.5, augment: Callable | None = None,
                    diagnostics: Mapping[str, str | None] | None = None,
                    **loss_kwargs) -> Callable[[TrainState, dict], tuple[TrainState, Metrics]]:
  """Builds the step for data loss `loss` plus `penalty_strength` * penalty (on weights only).

  `augment(key, images) -> images` (see dlcore.data.augment) runs inside the compiled step, on device, with a
  key folded from the state's, so augmentation is as reproducible as dropout.
  Metrics: 'loss' (data loss), 'penalty', 'total_loss', 'accuracy', 'grad_norm' -- means over the batch.
  `diagnostics` ({layer: activation name}, from `dlcore.diagnostics.layer_activations`) adds the per-layer
  metrics of `dlcore.diagnostics` (norms, update/weight ratios, dead or saturated units); None leaves them out
  of the compiled step.
  """
  loss_fn = losses.get(loss)
  checks.one_of("penalty", penalty, losses.PENALTIES)
  checks.non_negative("penalty_strength", penalty_strength)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, Metrics]:
    dropout_key, augment_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
    images = batch["image"] if augment is None else augment(augment_key, batch["image"])

    mutable = ["batch_stats"] + (["intermediates"] if diagnostics is not None else [])

    def objective(params):
      logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, images,
                                       train=True, rngs={"dropout": dropout_key}, mutable=mutable)
      data_loss = loss_fn(logits, batch["label"], **loss_kwargs)
      reg = losses.penalty(penalty, params, penalty_strength, l1_ratio)
      return data_loss + reg, (logits, updates, data_loss, reg)

    grads, (logits, updates, data_loss, reg) = jax.grad(objective, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
    metrics = {"loss": data_loss, "penalty": reg, "total_loss": data_loss + reg,
               "accuracy": losses.accuracy(logits, batch["label"]), "grad_norm": optax.tree.norm(grads)}
    if diagnostics is not None:
      metrics.update(diagnostics_lib.step_metrics(state.params, grads, new_state.params, updates["intermediates"],
                                                  diagnostics))
    return new_state, metrics

  return train_step


def make_eval_step(loss: str = "cross_entropy", **loss_kwargs) -> Callable[[TrainState, dict], Metrics]:
  """Builds `eval_step(state, batch) -> sums` with running statistics and no dropout.

  Returns sums, not means ('loss_sum', 'correct', 'count'), so batches of any padding add up exactly;
  `summarize` turns accumulated sums into 'loss' and 'accuracy'.
  """
  loss_fn = losses.get(loss)

  def eval_step(state: TrainState, batch: dict) -> Metrics:
    logits = state.apply_fn(state.variables(), batch["image"], train=False)
    mask = batch.get("mask", jnp.ones(logits.shape[0], jnp.float32))
    per_example = jax.vmap(lambda l, y: loss_fn(l[None], y[None], **loss_kwargs))(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    real = mask > 0  # padded rows contribute nothing, even if their label makes the loss NaN
    return {"loss_sum": jnp.sum(jnp.where(real, per_example, 0.0)), "correct": jnp.sum(jnp.where(real, correct, 0.0)),
            "count": jnp.sum(real.astype(jnp.float32))}

  return eval_step


def summarize(sums: Metrics) -> dict[str, float]:
  """Mean loss and accuracy from eval sums accumulated over batches."""
  count = float(sums["count"])
  return {"loss": float(sums["loss_sum"]) / count, "accuracy": float(sums["correct"]) / count}
