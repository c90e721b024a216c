"""dlcore: a JAX/Flax (linen) codebase for studying how deep networks train.

The public modules, each with its names in `__all__`; they load on first use (`dlcore.layers`, or
`from dlcore import layers`), so `import dlcore` stays cheap:

  activations, initializers   by name, or any callable
  layers                      Dense(features), Conv(features, kernel_size), BatchNorm, Dropout(rate= | keep_prob=)
  models                      mlp, lenet5, cifar_convnet, resnet8/20/32 by name; `models.get`, `models.options`
  losses, masks               data losses; weight penalties and which parameters are weights
  optim                       optimisers and learning-rate schedules as optax transformations, by name
  state, train                TrainState; pure train_step(state, batch) -> (state, metrics) and eval_step
  diagnostics                 per-layer norms, update/weight ratios, dead and saturated units, in the step
  loop                        fit(): progress, evaluation, checkpoints, exact resume, early stopping, NaN guard
  checkpoint, summaries       orbax checkpoints; metrics.jsonl and TensorBoard
  parallel                    data parallelism over a 'data' mesh; jax.distributed
  population                  K models trained by one vmapped step, per-member hyperparameters ('pop' mesh axis)
  search                      random-search spaces: parse, sample, narrow around the best, find edges
  data                        datasets, seeded batching (host or device-resident), preprocessing, augmentation
  stats, gradcheck, ensemble  activation/gradient statistics; float64 gradient checks; ensembles
  sanity                      cs231n's checks before a long run: initial loss, penalty, overfitting, gradients
  embedding                   2-D embeddings of features for pictures: PCA, exact t-SNE
  transfer                    start from another model: re-initialise, freeze, smaller learning rate by layer
  pooling, checks             pooling with CPU-friendly gradients; argument validation
  ops                         convolution on oneDNN on CPU (default; DLCORE_CPU_CONV=xla), on XLA elsewhere

Conventions: images are NHWC; dropout is given as keep_prob (probability of keeping a unit) or, in
`layers.Dropout`, as flax's rate; model variables are {'params', 'batch_stats'}.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["activations", "checkpoint", "checks", "data", "diagnostics", "embedding", "ensemble", "gradcheck",
           "initializers", "layers", "loop", "losses", "masks", "models", "ops", "optim", "parallel", "pooling",
           "population", "sanity", "search", "state", "stats", "summaries", "train", "transfer"]

if TYPE_CHECKING:
  from dlcore import (activations, checkpoint, checks, data, diagnostics, embedding, ensemble, gradcheck,
                      initializers, layers, loop, losses, masks, models, ops, optim, parallel, pooling, population,
                      sanity, search, state, stats, summaries, train, transfer)


def __getattr__(name: str):
  if name in __all__:
    return importlib.import_module(f"dlcore.{name}")
  raise AttributeError(f"module 'dlcore' has no attribute {name!r}; public modules: {', '.join(__all__)}")


def __dir__():
  return sorted([*globals(), *__all__])
