"""Multi-layer perceptron with per-layer initialiser, activation, BatchNorm placement and dropout."""

from collections.abc import Sequence
import dataclasses

import flax.linen as nn

from dlcore import checks, layers
from dlcore.models.base import Model

__all__ = ["MLP"]


class MLP(Model):
  """Flatten -> one Dense unit per entry of `hidden` (its width) -> linear classifier of `num_classes`.

  `MLP((512, 512))`: the widths come first, every other option (see `models.base.Model`) by keyword.
  Dropout (keep_prob < 1) follows every hidden unit. use_bias=False drops the hidden units' biases (the
  activation-statistics study); num_classes=0 returns the last hidden layer's output.
  """
  hidden: Sequence[int] = (100, 100)
  _: dataclasses.KW_ONLY
  use_bias: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden):
      checks.positive(f"hidden[{i}] (width)", width)
      x = layers.Dense(width, use_bias=self.use_bias, **self.unit_options(), name=f"layer{i}")(x, train)
      x = self.dropout()(x, train)
    return self.head(x, train)
