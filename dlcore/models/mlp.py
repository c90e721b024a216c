"""Multi-layer perceptron with per-layer initialiser, activation, BatchNorm placement and dropout."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn

from dlcore import checks, layers


class MLP(nn.Module):
  """Flatten -> len(hidden) Dense units (hidden[i] wide) -> optional linear classifier of `num_classes`.

  num_classes=0 gives the hidden stack alone (the activation-statistics study). keep_prob < 1 adds dropout
  after every hidden unit. `dtype` is the compute dtype (see `dlcore.layers`); the output is float32 (or wider).
  """
  hidden: Sequence[int] = (100, 100)
  num_classes: int = 10
  activation: str = "relu"
  initializer: str = "he_normal"
  init_scale: float | None = None
  use_bias: bool = True
  batchnorm: str = "none"
  keep_prob: float = 1.0
  dropout_mode: str = "inverted"
  bn_axis_name: str | None = None
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    checks.non_negative("num_classes", self.num_classes)
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden):
      checks.positive(f"hidden[{i}] (width)", width)
      x = layers.Dense(features=width, activation=self.activation, initializer=self.initializer,
                       init_scale=self.init_scale, use_bias=self.use_bias, batchnorm=self.batchnorm,
                       bn_axis_name=self.bn_axis_name, dtype=self.dtype, name=f"layer{i}")(x, train)
      x = layers.Dropout(self.keep_prob, self.dropout_mode)(x, train)
    if self.num_classes:
      x = layers.Dense(features=self.num_classes, initializer=self.initializer, init_scale=self.init_scale,
                       use_bias=True, dtype=self.dtype, name="classifier")(x, train)
    return layers.at_least_float32(x)
