"""Weight initialisers by name, for Dense kernels (fan_in, fan_out) and Conv kernels (kh, kw, c_in, c_out).

fan_in is the product of every axis but the last (kh * kw * c_in for a conv), fan_out the last axis times the
receptive field. Every scheme takes one knob, `scale`: the std for `normal` (the lectures' `0.01 * randn`), the
half-width for `uniform`, the value for `constant`, and a gain multiplying the scheme's std otherwise.

`lsuv` (Mishkin & Matas 2015) is data-dependent: as a kernel initialiser it is orthogonal; `lsuv_rescale` then
rescales every Dense/Conv layer, in order, on a data batch until its output has unit variance.
"""

from collections.abc import Callable
import math

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

from dlcore import checks

__all__ = ["NAMES", "Initializer", "constant", "get", "identity", "is_data_dependent", "lsuv_rescale", "normal",
           "orthogonal", "uniform"]

Initializer = Callable[..., jax.Array]


def _fans(shape) -> tuple[int, int]:
  if len(shape) < 2:
    raise ValueError(f"kernel shape must have at least 2 axes (fan_in..., fan_out), got {shape}")
  receptive = math.prod(shape[:-2])
  return receptive * shape[-2], receptive * shape[-1]


def _scaled(std_of_fans: Callable[[int, int], float], distribution: str, gain: float) -> Initializer:
  """Zero-mean normal or uniform with std = gain * std_of_fans(fan_in, fan_out)."""
  def init(key, shape, dtype=jnp.float32):
    std = gain * std_of_fans(*_fans(shape))
    if distribution == "normal":
      return std * jax.random.normal(key, shape, dtype)
    limit = math.sqrt(3.0) * std  # U(-a, a) has std a / sqrt(3)
    return jax.random.uniform(key, shape, dtype, -limit, limit)
  return init


def normal(std: float = 0.01) -> Initializer:
  """N(0, std^2) for every entry, whatever the shape (the lectures' `std * randn`)."""
  checks.non_negative("init_scale (std of normal)", std)
  return lambda key, shape, dtype=jnp.float32: std * jax.random.normal(key, shape, dtype)


def uniform(scale: float = 0.05) -> Initializer:
  """U(-scale, scale) for every entry, whatever the shape."""
  checks.non_negative("init_scale (half-width of uniform)", scale)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -scale, scale)


def constant(value: float = 0.0) -> Initializer:
  """Every entry equal to `value`."""
  return lambda key, shape, dtype=jnp.float32: jnp.full(shape, value, dtype)


def identity(gain: float = 1.0) -> Initializer:
  """Identity map (Le, Jaitly & Hinton 2015): eye for Dense, a centred delta over matching channels for Conv."""
  def init(key, shape, dtype=jnp.float32):
    del key
    eye = gain * jnp.eye(shape[-2], shape[-1], dtype=dtype)
    if len(shape) == 2:
      return eye
    kernel = jnp.zeros(shape, dtype)
    centre = tuple(k // 2 for k in shape[:-2])
    return kernel.at[centre].set(eye)
  return init


def orthogonal(gain: float = 1.0) -> Initializer:
  """Orthogonal (Saxe et al. 2013): the kernel reshaped to (fan_in, c_out) has orthonormal rows or columns."""
  return nn.initializers.orthogonal(scale=gain)


_FAN_STD = {
    "lecun": lambda fan_in, fan_out: math.sqrt(1.0 / fan_in),
    "glorot": lambda fan_in, fan_out: math.sqrt(2.0 / (fan_in + fan_out)),
    "he": lambda fan_in, fan_out: math.sqrt(2.0 / fan_in),
}

_FACTORIES: dict[str, Callable[[float], Initializer]] = {
    "zeros": lambda s: constant(0.0),
    "constant": lambda s: constant(0.0 if s is None else s),
    "normal": lambda s: normal(0.01 if s is None else s),
    "uniform": lambda s: uniform(0.05 if s is None else s),
    "identity": lambda s: identity(1.0 if s is None else s),
    "orthogonal": lambda s: orthogonal(1.0 if s is None else s),
    "lsuv": lambda s: orthogonal(1.0 if s is None else s),
}
for _family, _std in _FAN_STD.items():
  for _dist in ("normal", "uniform"):
    _FACTORIES[f"{_family}_{_dist}"] = (
        lambda s, _std=_std, _dist=_dist: _scaled(_std, _dist, 1.0 if s is None else s))
for _alias, _target in (("xavier", "glorot"), ("kaiming", "he")):
  for _dist in ("normal", "uniform"):
    _FACTORIES[f"{_alias}_{_dist}"] = _FACTORIES[f"{_target}_{_dist}"]

NAMES = tuple(sorted(_FACTORIES))


def get(name_or_fn: str | Initializer, scale: float | None = None) -> Initializer:
  """The initialiser called `name_or_fn` with `scale` as in the module docstring (None: the scheme's default),
  or `name_or_fn` itself when it is a callable `(key, shape, dtype) -> array` such as a flax initialiser;
  `scale` applies to names only, so a callable with a scale is refused rather than the scale ignored."""
  if callable(name_or_fn):
    if scale is not None:
      raise ValueError(f"init_scale={scale!r} applies to a named initializer only; got the callable "
                       f"{name_or_fn!r} (put the scale inside it)")
    return name_or_fn
  if not isinstance(name_or_fn, str):
    raise ValueError(f"initializer must be a name ({', '.join(NAMES)}) or a callable; got {name_or_fn!r}")
  return checks.lookup("initializer", _FACTORIES, name_or_fn)(scale)


def is_data_dependent(name_or_fn: str | Initializer) -> bool:
  """True for schemes that need `lsuv_rescale` on a data batch after `model.init` (only 'lsuv')."""
  if callable(name_or_fn):
    return False
  get(name_or_fn)
  return name_or_fn.lower() == "lsuv"


def _is_linear(module, method_name) -> bool:
  return method_name == "__call__" and isinstance(module, (nn.Dense, nn.Conv))


def lsuv_rescale(apply_fn, variables, inputs, *, tol: float = 0.01, max_iters: int = 10, **apply_kwargs):
  """LSUV (Mishkin & Matas 2015, Alg. 1): rescales each Dense/Conv kernel, first layer first, so that its
  output on `inputs` has variance 1 (within `tol`, at most `max_iters` passes per layer).

  `apply_fn` is `model.apply`; works for any linen model built from nn.Dense / nn.Conv. Returns new variables.
  """
  checks.positive("tol", tol)
  forward = jax.jit(lambda v: apply_fn(v, inputs, capture_intermediates=_is_linear,
                                       mutable=["intermediates"], **apply_kwargs)[1]["intermediates"])
  params = traverse_util.flatten_dict(variables["params"])
  # Layers in call order, recorded while tracing: jit returns dicts with sorted keys ('classifier' before
  # 'layer0', 'layer10' before 'layer2'), so the output's key order is not "first layer first".
  layer_paths = []
  def record(module, method_name):
    if _is_linear(module, method_name) and module.path not in layer_paths:
      layer_paths.append(module.path)
    return False
  jax.eval_shape(lambda v: apply_fn(v, inputs, capture_intermediates=record, mutable=["intermediates"],
                                    **apply_kwargs), variables)
  for path in layer_paths:
    for _ in range(max_iters):
      variables = {**variables, "params": traverse_util.unflatten_dict(params)}
      out = traverse_util.flatten_dict(forward(variables))[path + ("__call__",)][0]
      var = float(jnp.var(out))
      if abs(var - 1.0) < tol:
        break
      params[path + ("kernel",)] = params[path + ("kernel",)] / math.sqrt(var)
  return {**variables, "params": traverse_util.unflatten_dict(params)}
