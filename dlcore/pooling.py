"""2-D max and average pooling (NHWC) with flax's semantics and backward passes that are cheap on XLA:CPU.

XLA:CPU expands the gradient of a max-pool (select-and-scatter) into iota tensors, a variadic reduce-window and
a scatter, about half of a CIFAR ConvNet step (benchmarks/results/cpu_tuning.md has the measurements). Here the
forward pass is the same reduce-window and the backward routes each output gradient to the FIRST maximum of its
window (as select-and-scatter does), with one compare/select and one strided pad per window tap, which XLA fuses
into loops. Average pooling is a sum of strided slices (count_include_pad, flax's default).

On CPU `max_pool` and `avg_pool` use these forms; on other backends flax's, whose select-and-scatter is native.
The custom max-pool gradient supports reverse-mode differentiation only (no `jax.jvp`/forward-over-reverse).
"""

from collections.abc import Sequence
import functools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

__all__ = ["avg_pool", "max_pool"]

Pads = tuple[tuple[int, int], tuple[int, int]]


def _pads(x: jax.Array, window: tuple[int, int], strides: tuple[int, int], padding) -> Pads:
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], window, strides, padding)
  (top, bottom), (left, right) = padding
  return (int(top), int(bottom)), (int(left), int(right))


def _tap(xp: jax.Array, i: int, j: int, out_hw: tuple[int, int], strides: tuple[int, int]) -> jax.Array:
  """xp[:, i + strides[0] * a, j + strides[1] * b, :] for a < out_hw[0], b < out_hw[1]."""
  n, _, _, c = xp.shape
  limit = (n, i + (out_hw[0] - 1) * strides[0] + 1, j + (out_hw[1] - 1) * strides[1] + 1, c)
  return lax.slice(xp, (0, i, j, 0), limit, (1, *strides, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window: tuple[int, int], strides: tuple[int, int], pads: Pads):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1), ((0, 0), *pads, (0, 0)))


def _max_pool_fwd(x, window, strides, pads):
  y = _max_pool(x, window, strides, pads)
  return y, (x, y)


def _max_pool_bwd(window, strides, pads, residuals, g):
  x, y = residuals
  h, w = x.shape[1:3]
  out_hw = y.shape[1:3]
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
  hp, wp = xp.shape[1:3]
  zero = jnp.zeros((), g.dtype)
  dxp = jnp.zeros_like(xp, dtype=g.dtype)
  taken = jnp.zeros(y.shape, bool)
  for i in range(window[0]):  # row-major window order, as select-and-scatter picks the first maximum
    for j in range(window[1]):
      hit = (_tap(xp, i, j, out_hw, strides) == y) & ~taken
      taken = taken | hit
      placement = ((0, 0, 0), (i, hp - i - (out_hw[0] - 1) * strides[0] - 1, strides[0] - 1),
                   (j, wp - j - (out_hw[1] - 1) * strides[1] - 1, strides[1] - 1), (0, 0, 0))
      dxp = dxp + lax.pad(jnp.where(hit, g, zero), zero, placement)
  return (dxp[:, pads[0][0]:pads[0][0] + h, pads[1][0]:pads[1][0] + w],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _custom(x: jax.Array, window_shape: Sequence[int]) -> bool:
  """Whether the CPU forms above apply: NHWC input, 2-D window, CPU backend."""
  return x.ndim == 4 and len(window_shape) == 2 and jax.default_backend() == "cpu"


def max_pool(x: jax.Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding="VALID") -> jax.Array:
  """Max pooling with `flax.linen.max_pool`'s arguments and results (strides default to 1; padding 'VALID',
  'SAME' or ((top, bottom), (left, right))); NHWC inputs with 2-D windows on CPU take the custom gradient of the
  module docstring, which supports reverse mode only."""
  if not _custom(x, window_shape):
    return nn.max_pool(x, tuple(window_shape), strides, padding)
  window, strides = tuple(window_shape), tuple(strides or (1, 1))
  return _max_pool(x, window, strides, _pads(x, window, strides, padding))


def avg_pool(x: jax.Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding="VALID") -> jax.Array:
  """Average pooling with `flax.linen.avg_pool`'s arguments and results (padded zeros count in the mean); NHWC
  inputs with 2-D windows on CPU are computed as a sum of strided slices."""
  if not _custom(x, window_shape):
    return nn.avg_pool(x, tuple(window_shape), strides, padding)
  window, strides = tuple(window_shape), tuple(strides or (1, 1))
  pads = _pads(x, window, strides, padding)
  out_hw = tuple((x.shape[1 + a] + sum(pads[a]) - window[a]) // strides[a] + 1 for a in (0, 1))
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  total = sum(_tap(xp, i, j, out_hw, strides) for i in range(window[0]) for j in range(window[1]))
  return total / (window[0] * window[1])
