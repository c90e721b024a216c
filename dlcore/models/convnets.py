"""LeNet-5 and the four-layer CIFAR-10 ConvNet of Krizhevsky et al. 2012, Figure 1."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dlcore import layers, pooling


class _ConvNet(nn.Module):
  """Shared hyperparameters; `conv` and `dense` build units that use them.

  `dtype` is the compute dtype (see `dlcore.layers`); the logits are float32 (or wider).
  """
  num_classes: int = 10
  activation: str = "relu"
  initializer: str = "he_normal"
  init_scale: float | None = None
  batchnorm: str = "none"
  keep_prob: float = 1.0
  bn_axis_name: str | None = None
  dtype: Any = None

  def conv(self, features, kernel, name, padding="SAME"):
    return layers.Conv(features=features, kernel_size=(kernel, kernel), padding=padding,
                       activation=self.activation, initializer=self.initializer, init_scale=self.init_scale,
                       batchnorm=self.batchnorm, bn_axis_name=self.bn_axis_name, dtype=self.dtype, name=name)

  def dense(self, features, name):
    return layers.Dense(features=features, activation=self.activation, initializer=self.initializer,
                        init_scale=self.init_scale, batchnorm=self.batchnorm, bn_axis_name=self.bn_axis_name,
                        dtype=self.dtype, name=name)

  def classifier(self, x, train):
    logits = layers.Dense(features=self.num_classes, initializer=self.initializer, init_scale=self.init_scale,
                          dtype=self.dtype, name="classifier")(x.reshape((x.shape[0], -1)), train)
    return layers.at_least_float32(logits)


class LeNet5(_ConvNet):
  """LeCun et al. 1998: conv5x5x6 -> pool -> conv5x5x16 -> pool -> fc120 -> fc84 -> classifier.

  28x28 inputs are zero-padded to 32x32 as in the paper; pooling is 2x2 average ('subsampling').
  """

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.shape[1] == 28:
      x = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    x = self.conv(6, 5, "conv1", padding="VALID")(x, train)
    x = pooling.avg_pool(x, (2, 2), (2, 2))
    x = self.conv(16, 5, "conv2", padding="VALID")(x, train)
    x = pooling.avg_pool(x, (2, 2), (2, 2)).reshape((x.shape[0], -1))
    x = layers.Dropout(self.keep_prob)(self.dense(120, "fc1")(x, train), train)
    x = layers.Dropout(self.keep_prob)(self.dense(84, "fc2")(x, train), train)
    return self.classifier(x, train)


class CifarConvNet(_ConvNet):
  """The four-layer net of Krizhevsky et al. 2012 Fig. 1, after cuda-convnet's CIFAR-10 example (layers-80sec):

  conv5x5x32 -> maxpool 3/2 -> conv5x5x32 -> avgpool 3/2 -> conv5x5x64 -> avgpool 3/2 -> linear classifier.
  Local response normalisation is left out: Fig. 1 compares activations, not normalisation.
  """

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = self.conv(32, 5, "conv1")(x, train)
    x = pooling.max_pool(x, (3, 3), (2, 2), padding="SAME")
    x = self.conv(32, 5, "conv2")(x, train)
    x = pooling.avg_pool(x, (3, 3), (2, 2), padding="SAME")
    x = self.conv(64, 5, "conv3")(x, train)
    x = pooling.avg_pool(x, (3, 3), (2, 2), padding="SAME")
    x = layers.Dropout(self.keep_prob)(x, train)
    return self.classifier(x, train)
