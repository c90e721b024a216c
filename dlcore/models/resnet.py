"""CIFAR ResNets (He et al. 2016, Sec. 4.2): 6n+2 layers, 16/32/64 channels, shortcut option A or B."""

from collections.abc import Callable
import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dlcore import activations, checks, layers
from dlcore.models.base import Model

__all__ = ["SHORTCUTS", "BasicBlock", "ResNet"]

# 'zero_pad' is He et al.'s option A (strided identity, new channels zero: no parameters; their CIFAR nets),
# 'projection' option B (1x1 strided convolution + BatchNorm when the shape changes).
SHORTCUTS = ("zero_pad", "projection")


class BasicBlock(nn.Module):
  """conv3x3-BN-act -> conv3x3-BN, plus the shortcut, then act; records the block output as a layer.

  `unit` holds the keyword options of its `layers.Conv` units (initializer, batchnorm, dtype, ...).
  """
  features: int
  strides: int = 1
  _: dataclasses.KW_ONLY
  activation: str | Callable = "relu"
  shortcut: str = "projection"
  unit: dict = dataclasses.field(default_factory=dict)

  @nn.compact
  def __call__(self, x, train: bool = False):
    s = (self.strides, self.strides)
    y = layers.Conv(self.features, 3, strides=s, activation=self.activation, **self.unit, name="conv1")(x, train)
    y = layers.Conv(self.features, 3, activation="identity", **self.unit, name="conv2")(y, train)
    if x.shape != y.shape:
      if self.shortcut == "projection":
        x = layers.Conv(self.features, 1, strides=s, activation="identity", **self.unit, name="shortcut")(x, train)
      else:
        extra = self.features - x.shape[-1]
        if extra < 0:
          raise ValueError(f"shortcut 'zero_pad' cannot reduce {x.shape[-1]} channels to {self.features}; use "
                           "'projection'")
        x = x[:, ::self.strides, ::self.strides, :]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return layers.record(self, x + y, activations.get(self.activation)(x + y))


class ResNet(Model):
  """CIFAR ResNet-(6n+2), n = `blocks_per_stage`: conv3x3x16, three stages of n BasicBlocks (16, 32, 64
  channels; the first block of stages 2 and 3 strides by 2), global average pool, [dropout], linear classifier.

  NHWC input. BatchNorm comes before each nonlinearity ('before', the default) or nowhere ('none'; 'after' is
  refused). `shortcut`: 'projection' (option B, the default) or 'zero_pad' (option A, as He et al. trained
  ResNet-20/32 with 0.27M/0.46M parameters). Other options: `models.base.Model`, by keyword.
  """
  blocks_per_stage: int = 3
  _: dataclasses.KW_ONLY
  batchnorm: str = "before"
  shortcut: str = "projection"

  def __post_init__(self):
    checks.positive("blocks_per_stage", self.blocks_per_stage)
    checks.one_of("batchnorm (ResNet)", self.batchnorm, ("before", "none"))
    checks.one_of("shortcut", self.shortcut, SHORTCUTS)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    unit = self.unit_options()
    activation = unit.pop("activation")
    x = layers.Conv(16, 3, activation=activation, **unit, name="stem")(x, train)
    for stage, features in enumerate((16, 32, 64)):
      for block in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features, strides, activation=activation, shortcut=self.shortcut, unit=unit,
                       name=f"stage{stage}_block{block}")(x, train)
    x = self.dropout()(x.mean(axis=(1, 2)), train)
    return self.head(x, train)
