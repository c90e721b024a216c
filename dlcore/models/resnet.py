"""A small pre-activation-free CIFAR ResNet (He et al. 2016, Sec. 4.2): 6n+2 layers, 16/32/64 channels."""

from typing import Any

import flax.linen as nn

from dlcore import activations, checks, layers


class BasicBlock(nn.Module):
  """conv3x3-BN-act -> conv3x3-BN, plus a shortcut (1x1 conv + BN when the shape changes), then act."""
  features: int
  strides: int = 1
  activation: str = "relu"
  initializer: str = "he_normal"
  bn_axis_name: str | None = None
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    unit = dict(initializer=self.initializer, batchnorm="before", bn_axis_name=self.bn_axis_name, dtype=self.dtype)
    y = layers.Conv(features=self.features, strides=(self.strides, self.strides), activation=self.activation,
                    name="conv1", **unit)(x, train)
    y = layers.Conv(features=self.features, activation="identity", name="conv2", **unit)(y, train)
    if x.shape != y.shape:
      x = layers.Conv(features=self.features, kernel_size=(1, 1), strides=(self.strides, self.strides),
                      activation="identity", name="shortcut", **unit)(x, train)
    out = activations.get(self.activation)(x + y)
    self.sow("intermediates", "pre", x + y)
    self.sow("intermediates", "post", out)
    return out


class ResNet(nn.Module):
  """CIFAR ResNet-(6n+2): conv3x3x16, three stages of n BasicBlocks (16, 32, 64 channels), global pool, linear.

  `dtype` is the compute dtype (see `dlcore.layers`); the logits are float32 (or wider).
  """
  blocks_per_stage: int = 3
  num_classes: int = 10
  activation: str = "relu"
  initializer: str = "he_normal"
  bn_axis_name: str | None = None
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    checks.positive("blocks_per_stage", self.blocks_per_stage)
    x = layers.Conv(features=16, activation=self.activation, initializer=self.initializer,
                    batchnorm="before", bn_axis_name=self.bn_axis_name, dtype=self.dtype, name="stem")(x, train)
    for stage, features in enumerate((16, 32, 64)):
      for block in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features, strides, self.activation, self.initializer, self.bn_axis_name, self.dtype,
                       name=f"stage{stage}_block{block}")(x, train)
    x = x.mean(axis=(1, 2))
    logits = layers.Dense(features=self.num_classes, initializer=self.initializer, dtype=self.dtype,
                          name="classifier")(x, train)
    return layers.at_least_float32(logits)
