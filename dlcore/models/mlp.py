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
  Dropout (keep_prob < 1) follows every hidden unit; input_keep_prob < 1 also drops input pixels (the flattened
  input) with that keep probability, in the same dropout_mode (Srivastava et al. 2014: 0.8 for inputs, 0.5 for
  hidden units). use_bias=False drops the hidden units' biases (the activation-statistics study); num_classes=0
  returns the last hidden layer's output.
  """
  hidden: Sequence[int] = (100, 100)
  _: dataclasses.KW_ONLY
  use_bias: bool = True
  input_keep_prob: float = 1.0

  def __post_init__(self):
    checks.in_range("input_keep_prob", self.input_keep_prob, 0.0, 1.0, low_open=True)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    x = layers.Dropout(keep_prob=self.input_keep_prob, mode=self.dropout_mode, name="input_dropout")(x, train)
    for i, width in enumerate(self.hidden):
      checks.positive(f"hidden[{i}] (width)", width)
      x = layers.Dense(width, use_bias=self.use_bias, **self.unit_options(), name=f"layer{i}")(x, train)
      x = self.dropout()(x, train)
    return self.head(x, train)
