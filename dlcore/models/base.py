"""Options every dlcore model takes, keyword-only and with one meaning everywhere (`dlcore.models.options`)."""

from collections.abc import Callable
import dataclasses
from typing import Any

import flax.linen as nn

from dlcore import checks, layers

__all__ = ["Model"]


class Model(nn.Module):
  """Base of dlcore's classifiers: the options below, the units they build and the classifier layer.

  num_classes: width of the linear classifier (logits are float32, or wider); 0 leaves the classifier out and
  returns the flattened penultimate features (what a t-SNE of learned codes or a transfer study reads).
  activation, initializer and init_scale: as in `dlcore.layers` (a name or a callable). batchnorm: 'none',
  'before' or 'after' the nonlinearity of every hidden unit, with `bn_momentum`, `bn_running_var` ('biased'
  or 'unbiased', see `layers.BatchNorm`) and `bn_axis_name`. keep_prob (probability of keeping a unit; 1 means
  no dropout) and dropout_mode ('inverted' or 'original'): where each model says it drops. dtype: the compute
  dtype.
  """
  _: dataclasses.KW_ONLY
  num_classes: int = 10
  activation: str | Callable = "relu"
  initializer: str | Callable = "he_normal"
  init_scale: float | None = None
  batchnorm: str = "none"
  bn_momentum: float = 0.9
  bn_running_var: str = "biased"
  keep_prob: float = 1.0
  dropout_mode: str = "inverted"
  bn_axis_name: str | None = None
  dtype: Any = None

  def __post_init__(self):
    checks.non_negative("num_classes", self.num_classes)
    checks.one_of("batchnorm", self.batchnorm, layers.BATCHNORM_PLACES)
    checks.one_of("bn_running_var", self.bn_running_var, layers.RUNNING_VARS)
    checks.in_range("keep_prob", self.keep_prob, 0.0, 1.0, low_open=True)
    checks.one_of("dropout_mode", self.dropout_mode, layers.DROPOUT_MODES)
    super().__post_init__()

  def unit_options(self) -> dict:
    """Keyword options for a hidden `layers.Dense`/`layers.Conv` unit of this model."""
    return dict(activation=self.activation, initializer=self.initializer, init_scale=self.init_scale,
                batchnorm=self.batchnorm, bn_momentum=self.bn_momentum, bn_running_var=self.bn_running_var,
                bn_axis_name=self.bn_axis_name, dtype=self.dtype)

  def dropout(self) -> layers.Dropout:
    """A dropout layer with this model's keep_prob and mode."""
    return layers.Dropout(keep_prob=self.keep_prob, mode=self.dropout_mode)

  def head(self, x, train: bool):
    """Flattens `x` and applies the linear classifier ('classifier'), or none when num_classes is 0; the
    result is float32 (or wider)."""
    x = x.reshape((x.shape[0], -1))
    if not self.num_classes:
      return layers.at_least_float32(x)
    logits = layers.Dense(self.num_classes, initializer=self.initializer, init_scale=self.init_scale,
                          dtype=self.dtype, name="classifier")(x, train)
    return layers.at_least_float32(logits)
