"""Functional building blocks: Dense/Conv taking initializer and activation by name, BatchNorm, keep-probability Dropout.

Dense and Conv are 'linear -> [BatchNorm] -> activation -> [BatchNorm]' units. Each records the nonlinearity's
input ('pre') and output ('post') with `sow` into the `intermediates` collection, and passes its output through
`perturb('post')` so `stats.activation_grads` can read dL/d(post) -- both are no-ops unless the caller asks for
those collections, so outputs are unchanged.

Mixed precision: `dtype` is the compute dtype (flax's convention; None: that of the inputs and params). Params
are always float32 and BatchNorm statistics are reduced in float32, so `dtype=jnp.bfloat16` gives bf16 matmuls
and convolutions with float32 master weights.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlcore import activations, checks, initializers

BATCHNORM_PLACES = ("none", "before", "after")
DROPOUT_MODES = ("inverted", "original")


def at_least_float32(x: jax.Array) -> jax.Array:
  """`x` in float32, or unchanged if wider (float64 gradient checks): how models return bf16-computed logits."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class BatchNorm(nn.Module):
  """Batch normalisation (Ioffe & Szegedy 2015, Alg. 1) over every axis but the last.

  train=True normalises with the mini-batch mean and (biased) variance and updates the running averages in
  `batch_stats` (`ra = momentum * ra + (1 - momentum) * batch`); train=False uses the running averages. With
  `axis_name`, batch statistics are averaged across that mapped/sharded axis (cross-device BatchNorm). The
  statistics are computed in float32 whatever `dtype` (the output dtype) is.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: str | None = None
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    checks.in_range("momentum", self.momentum, 0.0, 1.0, high_open=True)
    checks.positive("epsilon", self.epsilon)
    # Two-pass variance, as in Algorithm 1: flax's default E[x^2] - E[x]^2 loses float32 precision (gradients off
    # by ~0.5%) when a channel's |mean| is tens of times its std.
    return nn.BatchNorm(use_running_average=not train, momentum=self.momentum, epsilon=self.epsilon,
                        axis_name=self.axis_name, use_fast_variance=False, dtype=self.dtype, name="bn")(x)


class Dropout(nn.Module):
  """Dropout with `keep_prob` p, the probability that a unit is kept (the lectures' convention).

  mode='inverted': train multiplies kept units by 1/p, test is the identity.
  mode='original' (Srivastava et al. 2014): train keeps units unscaled, test multiplies by p.
  Either way the expected activation at train time equals the activation at test time. Needs rngs={'dropout'}.
  """
  keep_prob: float = 1.0
  mode: str = "inverted"

  @nn.compact
  def __call__(self, x, train: bool):
    checks.in_range("keep_prob", self.keep_prob, 0.0, 1.0, low_open=True)
    checks.one_of("dropout mode", self.mode, DROPOUT_MODES)
    p = self.keep_prob
    if p == 1.0:
      return x
    if train:
      mask = jax.random.bernoulli(self.make_rng("dropout"), p, x.shape)
      kept = jnp.where(mask, x, jnp.zeros_like(x))
      return kept / p if self.mode == "inverted" else kept
    return x if self.mode == "inverted" else x * p


class _Unit(nn.Module):
  """Shared tail of Dense and Conv: [BatchNorm] -> activation -> [BatchNorm], recording pre/post."""
  activation: str = "identity"
  initializer: str = "lecun_normal"
  init_scale: float | None = None
  use_bias: bool = True
  batchnorm: str = "none"
  bn_momentum: float = 0.9
  bn_axis_name: str | None = None
  dtype: Any = None

  def _linear(self, x) -> jax.Array:
    raise NotImplementedError

  def _kernel_init(self):
    return initializers.get(self.initializer, self.init_scale)

  @nn.compact
  def __call__(self, x, train: bool = False):
    checks.one_of("batchnorm", self.batchnorm, BATCHNORM_PLACES)
    act = activations.get(self.activation)
    y = self._linear(x)
    if self.batchnorm == "before":
      y = BatchNorm(self.bn_momentum, axis_name=self.bn_axis_name, dtype=self.dtype, name="bn_before")(y, train)
    self.sow("intermediates", "pre", y)
    y = act(y)
    self.sow("intermediates", "post", y)
    y = self.perturb("post", y)
    if self.batchnorm == "after":
      y = BatchNorm(self.bn_momentum, axis_name=self.bn_axis_name, dtype=self.dtype, name="bn_after")(y, train)
    return y


class Dense(_Unit):
  """Fully-connected unit: nn.Dense with the initialiser named `initializer`, then the tail of `_Unit`."""
  features: int = 0

  def _linear(self, x):
    checks.positive("features", self.features)
    bias = self.use_bias and self.batchnorm != "before"  # BatchNorm's offset replaces the bias
    return nn.Dense(self.features, use_bias=bias, kernel_init=self._kernel_init(), dtype=self.dtype,
                    name="linear")(x)


class Conv(_Unit):
  """Convolution unit (NHWC): nn.Conv with the initialiser named `initializer`, then the tail of `_Unit`."""
  features: int = 0
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Any = "SAME"

  def _linear(self, x):
    checks.positive("features", self.features)
    bias = self.use_bias and self.batchnorm != "before"
    return nn.Conv(self.features, tuple(self.kernel_size), tuple(self.strides), padding=self.padding,
                   use_bias=bias, kernel_init=self._kernel_init(), dtype=self.dtype, name="linear")(x)
