"""Models by name, their options, and variable initialisation that keeps only what training needs.

Every model is a `flax.linen` module on NHWC images (the MLP flattens any input) called as
`model.apply({'params': p, 'batch_stats': s}, x, train=..., rngs={'dropout': k}, mutable=['batch_stats'] if
train else False)`; `init` returns `params` (and `batch_stats` where there is BatchNorm) and nothing else.
All take the options of `models.base.Model` by keyword; `options(name)` lists what a registered name takes.
"""

import dataclasses

import jax
import jax.numpy as jnp

from dlcore import checks, initializers
from dlcore.models.base import Model
from dlcore.models.convnets import CifarConvNet, LeNet5
from dlcore.models.mlp import MLP
from dlcore.models.resnet import SHORTCUTS, BasicBlock, ResNet

__all__ = ["DTYPES", "NAMES", "SHORTCUTS", "BasicBlock", "CifarConvNet", "LeNet5", "MLP", "Model", "ResNet",
           "compute_dtype", "get", "init_variables", "options"]

# name -> (class, options the name fixes)
_MODELS = {
    "mlp": (MLP, {}),
    "lenet5": (LeNet5, {}),
    "cifar_convnet": (CifarConvNet, {}),
    "resnet": (ResNet, {}),
    "resnet8": (ResNet, {"blocks_per_stage": 1}),
    "resnet20": (ResNet, {"blocks_per_stage": 3}),
    "resnet32": (ResNet, {"blocks_per_stage": 5}),
}

NAMES = tuple(sorted(_MODELS))
# Compute dtypes for the models' `dtype` field; params stay float32 either way ('bfloat16' = mixed precision).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def options(name: str) -> tuple[str, ...]:
  """The keyword options that `get(name, ...)` accepts, in declaration order."""
  cls, fixed = checks.lookup("model", _MODELS, name)
  return tuple(f.name for f in dataclasses.fields(cls) if f.name not in fixed and f.name not in ("parent", "name"))


def get(name: str, **kwargs):
  """Builds the model called `name` (one of NAMES) with keyword options; ValueError naming the model, the
  options it does not take and the ones it does, so no option is silently dropped."""
  cls, fixed = checks.lookup("model", _MODELS, name)
  allowed = options(name)
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ValueError(f"model {name!r} does not take {', '.join(unknown)}; it takes: {', '.join(allowed)}")
  return cls(**fixed, **kwargs)


def compute_dtype(name: str):
  """The jnp dtype called `name`, one of DTYPES (ValueError listing them otherwise)."""
  return checks.lookup("dtype", DTYPES, name)


def init_variables(model, rng: jax.Array, sample: jax.Array, *, lsuv_batch: jax.Array | None = None) -> dict:
  """`model.init` on `sample`, as {'params', 'batch_stats'} (an empty dict when the model has no BatchNorm).

  With `lsuv_batch` and a model whose `initializer` is 'lsuv', the kernels are then LSUV-rescaled on it.
  """
  variables = model.init({"params": rng, "dropout": rng}, sample, train=False)
  variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  name = getattr(model, "initializer", None)
  if lsuv_batch is not None and name is not None and initializers.is_data_dependent(name):
    variables = initializers.lsuv_rescale(model.apply, variables, lsuv_batch, train=False)
  return variables
