"""Models by name, and variable initialisation that keeps only what training needs."""

import jax
import jax.numpy as jnp

from dlcore import checks, initializers
from dlcore.models.convnets import CifarConvNet, LeNet5
from dlcore.models.mlp import MLP
from dlcore.models.resnet import ResNet

_MODELS = {
    "mlp": MLP,
    "lenet5": LeNet5,
    "cifar_convnet": CifarConvNet,
    "resnet": ResNet,
    "resnet8": lambda **kw: ResNet(blocks_per_stage=1, **kw),
    "resnet20": lambda **kw: ResNet(blocks_per_stage=3, **kw),
    "resnet32": lambda **kw: ResNet(blocks_per_stage=5, **kw),
}

NAMES = tuple(sorted(_MODELS))
# Compute dtypes for the models' `dtype` field; params stay float32 either way ('bfloat16' = mixed precision).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def get(name: str, **kwargs):
  """Builds the model called `name` with its keyword hyperparameters (ValueError listing names otherwise)."""
  return checks.lookup("model", _MODELS, name)(**kwargs)


def compute_dtype(name: str):
  """The jnp dtype called `name`, one of DTYPES (ValueError listing them otherwise)."""
  return checks.lookup("dtype", DTYPES, name)


def init_variables(model, rng: jax.Array, sample: jax.Array, *, lsuv_batch: jax.Array | None = None) -> dict:
  """`model.init` on `sample`, keeping only `params` and `batch_stats` (an empty dict when the model has none).

  With `lsuv_batch` and a model whose `initializer` is 'lsuv', the kernels are then LSUV-rescaled on it.
  """
  variables = model.init({"params": rng, "dropout": rng}, sample, train=False)
  variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  name = getattr(model, "initializer", None)
  if lsuv_batch is not None and name is not None and initializers.is_data_dependent(name):
    variables = initializers.lsuv_rescale(model.apply, variables, lsuv_batch, train=False)
  return variables
