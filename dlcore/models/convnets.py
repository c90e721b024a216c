"""LeNet-5 and the four-layer CIFAR-10 ConvNet of Krizhevsky et al. 2012, Figure 1."""

import flax.linen as nn
import jax.numpy as jnp

from dlcore import layers, pooling
from dlcore.models.base import Model

__all__ = ["CifarConvNet", "LeNet5"]


class LeNet5(Model):
  """LeCun et al. 1998: conv5x5x6 -> avg pool 2/2 -> conv5x5x16 -> avg pool 2/2 -> fc120 -> fc84 -> classifier.

  NHWC input; 28x28 inputs are zero-padded to 32x32 as in the paper; pooling is 2x2 average ('subsampling').
  Dropout (keep_prob < 1) follows fc120 and fc84. Options: `models.base.Model`, all by keyword.
  """

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.shape[1] == 28:
      x = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    unit = self.unit_options()
    x = layers.Conv(6, 5, padding="VALID", **unit, name="conv1")(x, train)
    x = pooling.avg_pool(x, (2, 2), (2, 2))
    x = layers.Conv(16, 5, padding="VALID", **unit, name="conv2")(x, train)
    x = pooling.avg_pool(x, (2, 2), (2, 2)).reshape((x.shape[0], -1))
    x = self.dropout()(layers.Dense(120, **unit, name="fc1")(x, train), train)
    x = self.dropout()(layers.Dense(84, **unit, name="fc2")(x, train), train)
    return self.head(x, train)


class CifarConvNet(Model):
  """The four-layer CIFAR-10 net of Krizhevsky et al. 2012, Fig. 1: cuda-convnet's layers-18pct without its two
  local response normalisation layers (Fig. 1 compares activations, not normalisation):

  conv5x5x32 -> max pool 3/2 -> conv5x5x32 -> avg pool 3/2 -> conv5x5x64 -> avg pool 3/2 -> linear classifier;
  4 weight layers, 89,578 parameters for 32x32x3 inputs and 10 classes. NHWC input, SAME padding. Dropout
  (keep_prob < 1) comes before the classifier. Options: `models.base.Model`, all by keyword.
  """

  @nn.compact
  def __call__(self, x, train: bool = False):
    unit = self.unit_options()
    x = layers.Conv(32, 5, **unit, name="conv1")(x, train)
    x = pooling.max_pool(x, (3, 3), (2, 2), padding="SAME")
    x = layers.Conv(32, 5, **unit, name="conv2")(x, train)
    x = pooling.avg_pool(x, (3, 3), (2, 2), padding="SAME")
    x = layers.Conv(64, 5, **unit, name="conv3")(x, train)
    x = pooling.avg_pool(x, (3, 3), (2, 2), padding="SAME")
    x = self.dropout()(x, train)
    return self.head(x, train)
