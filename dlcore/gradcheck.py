"""Finite-difference gradient checking in float64.

`jax.grad(f)` is compared with the central difference (f(x + h e_i) - f(x - h e_i)) / 2h, coordinate by coordinate,
by the relative error |a - n| / max(|a|, |n|, tiny). Everything runs under `jax.enable_x64(True)` with the inputs
cast to float64, whatever the global `jax_enable_x64`: in float32 the difference quotient's rounding error
(~1e-7 |f| / h) swamps the check, while in float64 a correct gradient of a smooth f gives errors ~1e-8 or below.

Central differences are wrong across kinks (ReLU at 0, hinge margins at 0, |w| at 0): choose inputs at least a few
h away from them, or read `Comparison.kink_bound`, which says how far a kink can have moved each difference. A
coordinate whose true gradient is ~0 while f is not flat reads as a large relative error, since there the quotient
is rounding noise (~1e-16 |f| / h).
"""

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from dlcore import checks

__all__ = ["Comparison", "check_params", "compare", "compare_params", "max_relative_error"]


class Comparison(NamedTuple):
  """Checked flat coordinates (in `ravel_pytree` order) with their analytic and numeric gradients and errors.

  kink_bound is |f(x + h) - 2 f(x) + f(x - h)| / 2h per coordinate: for f piecewise linear with one kink in
  [x - h, x + h] (a ReLU or max-pool switching), it equals |numeric - true one-sided derivative| exactly; for a
  smooth f it is h |f''| / 2 plus rounding noise, i.e. negligible. A mismatch within it is the difference
  quotient's fault, not the gradient's.
  """
  index: np.ndarray
  analytic: np.ndarray
  numeric: np.ndarray
  error: np.ndarray
  kink_bound: np.ndarray


def _subset(rng: np.random.Generator, start: int, size: int, num_checks: int | None) -> np.ndarray:
  if num_checks is None or num_checks >= size:
    return np.arange(start, start + size)
  return start + np.sort(rng.choice(size, num_checks, replace=False))


def _flat_index(x, num_checks: int | None, seed: int) -> np.ndarray:
  """All flat coordinates of x, or `num_checks` of them drawn with `seed`."""
  if num_checks is not None:
    checks.positive("num_checks", num_checks)
  size = sum(np.size(leaf) for leaf in jax.tree.leaves(x))
  return _subset(np.random.default_rng(seed), 0, size, num_checks)


def _compare(f, x, eps: float, tiny: float, index: np.ndarray) -> Comparison:
  """Under x64: ravel x to float64, take jax.grad once, then central differences at the flat coordinates `index`."""
  checks.positive("eps", eps)
  checks.positive("tiny", tiny)
  with jax.enable_x64(True):
    x64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), x)
    flat, unravel = ravel_pytree(x64)
    fn = jax.jit(lambda v: f(unravel(v)))
    value = fn(flat)
    if jnp.shape(value) != ():
      raise ValueError(f"f must return a scalar, got shape {jnp.shape(value)}")
    if value.dtype != jnp.float64:
      warnings.warn(f"f returns {value.dtype}, not float64: it casts internally, so the check is not float64-exact",
                    stacklevel=3)
    grad = np.asarray(jax.jit(jax.grad(lambda v: f(unravel(v))))(flat))
    x_np = np.asarray(flat)
    numeric, kink_bound, f_x = np.empty(len(index)), np.empty(len(index)), float(value)
    for k, i in enumerate(index):
      plus, minus = x_np.copy(), x_np.copy()
      plus[i] += eps
      minus[i] -= eps
      # Divide by the step actually taken: x + h is rounded, and (x + h) - (x - h) need not equal 2h exactly.
      f_plus, f_minus = float(fn(plus)), float(fn(minus))
      numeric[k] = (f_plus - f_minus) / (plus[i] - minus[i])
      kink_bound[k] = abs(f_plus - 2 * f_x + f_minus) / (plus[i] - minus[i])
  analytic = grad[index]
  error = np.abs(analytic - numeric) / np.maximum(np.maximum(np.abs(analytic), np.abs(numeric)), tiny)
  return Comparison(index, analytic, numeric, error, kink_bound)


def compare(f, x, *, eps: float = 1e-6, num_checks: int | None = None, seed: int = 0,
            tiny: float = 1e-12) -> Comparison:
  """The per-coordinate comparison behind `max_relative_error` (same arguments), to see *which* coordinates
  disagree: a `Comparison` of the checked flat coordinates, in `ravel_pytree` order."""
  return _compare(f, x, eps, tiny, _flat_index(x, num_checks, seed))


def max_relative_error(f, x, *, eps: float = 1e-6, num_checks: int | None = None, seed: int = 0,
                       tiny: float = 1e-12) -> float:
  """max_i |a_i - n_i| / max(|a_i|, |n_i|, tiny), a = jax.grad(f)(x), n the central difference with step eps.

  f maps an array or pytree of arrays (floating leaves) to a scalar and must be traceable (it is jitted and
  differentiated). Every coordinate is checked, or `num_checks` of them drawn without replacement (with `seed`)
  for big inputs. Float64 throughout; the global x64 setting is left as it was.
  """
  return float(np.max(_compare(f, x, eps, tiny, _flat_index(x, num_checks, seed)).error, initial=0.0))


def check_params(loss_fn, params, *, eps: float = 1e-6, num_checks: int | None = None, seed: int = 0,
                 tiny: float = 1e-12) -> dict[str, float]:
  """Gradient check of `loss_fn(params) -> scalar` (e.g. a flax model's loss), reported per parameter array.

  Returns {'layer0/linear/kernel': max relative error, ...}, so a broken layer is named. `num_checks` limits the
  coordinates checked per array (drawn with `seed`); otherwise every coordinate is checked. Run as a whole with
  one jitted loss, as in `max_relative_error`.
  """
  return {path: float(np.max(result.error, initial=0.0))
          for path, result in compare_params(loss_fn, params, eps=eps, num_checks=num_checks, seed=seed,
                                             tiny=tiny).items()}


def compare_params(loss_fn, params, *, eps: float = 1e-6, num_checks: int | None = None, seed: int = 0,
                   tiny: float = 1e-12) -> dict[str, Comparison]:
  """The per-coordinate comparisons behind `check_params` (same arguments), per parameter array:
  {'layer0/linear/kernel': Comparison, ...}, each `index` counting flat positions within its own array."""
  if num_checks is not None:
    checks.positive("num_checks", num_checks)
  paths = [jax.tree_util.keystr(path, simple=True, separator="/")
           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  sizes = [np.size(leaf) for leaf in jax.tree.leaves(params)]
  starts = np.cumsum([0] + sizes)
  rng = np.random.default_rng(seed)
  index = np.concatenate([_subset(rng, start, size, num_checks) for start, size in zip(starts, sizes)] or [[]])
  result = _compare(loss_fn, params, eps, tiny, index.astype(int))
  leaf_of = np.searchsorted(starts, result.index, side="right") - 1
  return {path: Comparison(result.index[leaf_of == k] - starts[k],
                           *(field[leaf_of == k] for field in result[1:])) for k, path in enumerate(paths)}
