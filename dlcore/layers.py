"""Building blocks with flax's conventions: Dense/Conv units, BatchNorm with explicit `batch_stats`, Dropout.

`Dense(features)` and `Conv(features, kernel_size)` are 'linear -> [BatchNorm] -> activation -> [BatchNorm]'
units; the size comes first and every other option is keyword-only. Activation and initialiser are each a name
from `dlcore.activations` / `dlcore.initializers` or a callable (`jax.nn.silu`, `nn.initializers.he_normal()`).
Each unit records its nonlinearity's input ('pre') and output ('post') with `sow` into the `intermediates`
collection, returned only when the caller asks for that collection. When the caller passes a `perturbations`
collection with a 'post' entry for a unit, that entry is added to the unit's output (flax `perturb`), which is
how `stats.gradients` reads dL/d(post); without one (`init` included) nothing is added or created, so
`init` returns exactly `params` (and `batch_stats` where there is BatchNorm).

Images are NHWC. Mixed precision: `dtype` is the compute dtype (flax's convention; None: that of the inputs and
params). Params are always float32 and BatchNorm statistics are reduced in float32, so `dtype=jnp.bfloat16`
gives bf16 matmuls and convolutions with float32 master weights.
"""

from collections.abc import Callable, Sequence
import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
from flax.linen import normalization as flax_norm
import jax
from jax import lax
import jax.numpy as jnp

from dlcore import activations, checks, initializers
from dlcore.ops import conv as conv_ops

__all__ = ["BATCHNORM_PLACES", "DROPOUT_MODES", "RUNNING_VARS", "BatchNorm", "Conv", "Dense", "Dropout",
           "at_least_float32", "record"]

BATCHNORM_PLACES = ("none", "before", "after")
DROPOUT_MODES = ("inverted", "original")
RUNNING_VARS = ("biased", "unbiased")


def at_least_float32(x: jax.Array) -> jax.Array:
  """`x` in float32, or unchanged if wider (float64 gradient checks): how models return bf16-computed logits."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def record(module: nn.Module, pre: jax.Array, post: jax.Array) -> jax.Array:
  """Sows a nonlinearity's input `pre` and output `post` into `intermediates` and returns `post`, plus the
  caller's 'post' perturbation when one was passed in (see the module docstring); call it from a module's
  method, as dlcore's units and ResNet blocks do, to make that module a layer of `dlcore.stats`."""
  module.sow("intermediates", "pre", pre)
  module.sow("intermediates", "post", post)
  if module.has_variable("perturbations", "post"):
    post = module.perturb("post", post)
  return post


class _Normalize(nn.Module):
  """flax.linen.BatchNorm's variables and normalisation, with the running variance biased or unbiased."""
  momentum: float
  epsilon: float
  running_var: str
  axis_name: str | None
  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool):
    axes = tuple(range(x.ndim - 1))
    shape = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(shape, jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(shape, jnp.float32))
    if not train:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean, var = flax_norm._compute_stats(x, axes, self.dtype, self.axis_name, use_fast_variance=False)
      if not self.is_initializing():
        count = math.prod(x.shape[:-1]) * (1 if self.axis_name is None else lax.psum(1, self.axis_name))
        # one value per feature has no unbiased variance: keep the biased one (0) rather than divide by zero
        estimate = var * (count / jnp.maximum(count - 1, 1)) if self.running_var == "unbiased" else var
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * estimate
    return flax_norm._normalize(self, x, mean, var, axes, (x.ndim - 1,), self.dtype, jnp.float32, self.epsilon,
                                True, True, nn.initializers.zeros, nn.initializers.ones)


class BatchNorm(nn.Module):
  """Batch normalisation (Ioffe & Szegedy 2015) over every axis but the last (features; channels in NHWC).

  train=True normalises with the mini-batch mean and biased variance (Alg. 1) and updates the running averages
  in `batch_stats` (`ra = momentum * ra + (1 - momentum) * batch`); train=False uses the running averages.
  `running_var` says which batch variance the running average accumulates: 'biased' (default; flax's and
  Keras's choice, and the variance train mode normalises with, so a converged net sees the same scale in both
  modes) or 'unbiased' (times m/(m-1) for a batch of m values per feature: Alg. 2 of the paper, and PyTorch).
  The variance is computed in two passes (flax's E[x^2] - E[x]^2 loses float32 precision when a channel's
  |mean| is tens of times its std) and in float32 whatever `dtype` (the output dtype) is. With `axis_name`,
  statistics are averaged across that mapped axis (cross-device BatchNorm; m is then the global count).
  """
  _: dataclasses.KW_ONLY
  momentum: float = 0.9
  epsilon: float = 1e-5
  running_var: str = "biased"
  axis_name: str | None = None
  dtype: Any = None

  def __post_init__(self):
    checks.in_range("momentum", self.momentum, 0.0, 1.0, high_open=True)
    checks.positive("epsilon", self.epsilon)
    checks.one_of("running_var", self.running_var, RUNNING_VARS)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool):
    return _Normalize(self.momentum, self.epsilon, self.running_var, self.axis_name, self.dtype, name="bn")(x, train)


class Dropout(nn.Module):
  """Dropout, given by keyword as either `rate` (probability of dropping a unit: flax's `nn.Dropout(rate)`) or
  `keep_prob` (probability of keeping it: the lectures' p), exactly one; positional use is refused.

  mode='inverted' (default): train multiplies kept units by 1/keep_prob, test is the identity.
  mode='original' (Srivastava et al. 2014): train keeps units unscaled, test multiplies by keep_prob.
  Either way the expected activation at train time equals the activation at test time. Needs rngs={'dropout'}
  when training with keep_prob < 1.
  """
  _: dataclasses.KW_ONLY
  rate: float | None = None
  keep_prob: float | None = None
  mode: str = "inverted"

  def __post_init__(self):
    if (self.rate is None) == (self.keep_prob is None):
      raise ValueError("Dropout takes exactly one of rate= (probability of dropping a unit, flax's meaning) or "
                       f"keep_prob= (probability of keeping it); got rate={self.rate!r}, "
                       f"keep_prob={self.keep_prob!r}")
    if self.rate is not None:
      checks.in_range("rate", self.rate, 0.0, 1.0, high_open=True)
    else:
      checks.in_range("keep_prob", self.keep_prob, 0.0, 1.0, low_open=True)
    checks.one_of("dropout mode", self.mode, DROPOUT_MODES)
    super().__post_init__()

  @property
  def keep(self) -> float:
    """The probability that a unit is kept."""
    return 1.0 - self.rate if self.keep_prob is None else self.keep_prob

  @nn.compact
  def __call__(self, x, train: bool):
    p = self.keep
    if p == 1.0:
      return x
    if train:
      mask = jax.random.bernoulli(self.make_rng("dropout"), p, x.shape)
      kept = jnp.where(mask, x, jnp.zeros_like(x))
      return kept / p if self.mode == "inverted" else kept
    return x if self.mode == "inverted" else x * p


def _refuse_positional(cls):
  """Wraps the dataclass __init__ of `cls` so positional arguments fail with a message naming its keywords."""
  init = cls.__init__

  @functools.wraps(init)
  def __init__(self, *args, **kwargs):
    if args:
      raise TypeError(f"Dropout({', '.join(map(repr, args))}) is ambiguous: pass rate= (probability of dropping "
                      "a unit, as flax's nn.Dropout) or keep_prob= (probability of keeping it) by keyword")
    init(self, **kwargs)

  cls.__init__ = __init__
  return cls


_refuse_positional(Dropout)


class _Unit(nn.Module):
  """Options shared by Dense and Conv (keyword-only) and their tail: [BatchNorm] -> activation -> [BatchNorm]."""
  _: dataclasses.KW_ONLY
  activation: str | Callable = "identity"
  initializer: str | Callable = "lecun_normal"
  init_scale: float | None = None
  use_bias: bool = True
  batchnorm: str = "none"
  bn_momentum: float = 0.9
  bn_running_var: str = "biased"
  bn_axis_name: str | None = None
  dtype: Any = None

  def __post_init__(self):
    checks.positive("features", self.features)
    checks.one_of("batchnorm", self.batchnorm, BATCHNORM_PLACES)
    activations.get(self.activation)
    initializers.get(self.initializer, self.init_scale)
    super().__post_init__()

  def _linear(self, x) -> jax.Array:
    raise NotImplementedError

  def _norm(self, name: str) -> BatchNorm:
    return BatchNorm(momentum=self.bn_momentum, running_var=self.bn_running_var, axis_name=self.bn_axis_name,
                     dtype=self.dtype, name=name)

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = self._linear(x)
    if self.batchnorm == "before":
      y = self._norm("bn_before")(y, train)
    pre, y = y, activations.get(self.activation)(y)
    y = record(self, pre, y)
    if self.batchnorm == "after":
      y = self._norm("bn_after")(y, train)
    return y


class Dense(_Unit):
  """Fully-connected unit on [..., in] -> [..., features]: a linear map (kernel from `initializer`, bias unless
  BatchNorm comes before the activation, whose offset replaces it), then the unit tail (module docstring)."""
  features: int

  def _linear(self, x):
    bias = self.use_bias and self.batchnorm != "before"
    return nn.Dense(self.features, use_bias=bias, kernel_init=initializers.get(self.initializer, self.init_scale),
                    dtype=self.dtype, name="linear")(x)


class Conv(_Unit):
  """Convolution unit on NHWC images: `features` output channels, `kernel_size` (an int or (kh, kw)), keyword
  `strides` and `padding` as in flax's nn.Conv, then the unit tail (module docstring). The kernel is
  (kh, kw, c_in, features); fan_in = kh * kw * c_in. On CPU the convolution runs on oneDNN (`dlcore.ops.conv`;
  DLCORE_CPU_CONV=onednn, the default), on XLA with DLCORE_CPU_CONV=xla and elsewhere."""
  features: int
  kernel_size: int | Sequence[int] = (3, 3)
  _: dataclasses.KW_ONLY
  strides: int | Sequence[int] = (1, 1)
  padding: Any = "SAME"

  def _linear(self, x):
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    bias = self.use_bias and self.batchnorm != "before"
    return nn.Conv(self.features, pair(self.kernel_size), pair(self.strides), padding=self.padding,
                   use_bias=bias, kernel_init=initializers.get(self.initializer, self.init_scale),
                   dtype=self.dtype, conv_general_dilated=conv_ops.conv_general_dilated, name="linear")(x)
