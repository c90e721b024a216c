"""2-D embeddings of feature vectors for pictures: PCA (numpy SVD) and exact t-SNE (JAX).

t-SNE is van der Maaten & Hinton (2008) computed exactly, O(n^2) in time and memory, so it suits the few thousand
points a scatter plot shows; the settings are those of scikit-learn's `TSNE` (perplexity 30, early exaggeration
12 for the first 250 of 1000 steps, momentum 0.5 then 0.8, per-coordinate gains, learning rate max(n / 48, 50),
initialisation on the first principal axes scaled to std 1e-4), so no random seed enters.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dlcore import checks

__all__ = ["conditional_affinities", "pca", "tsne"]

EXAGGERATION = 12.0
EXAGGERATED_STEPS = 250
_LOG_PRECISION_RANGE = 30.0  # bisection bounds of log(precision) on distances scaled to mean 1


def _check_points(x, dims: int) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"x must be [points, features] with at least 2 points, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("x has non-finite values")
  checks.in_range("dims", dims, 1, min(x.shape))
  return x


def pca(x, dims: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """(the rows of x projected onto their first `dims` principal axes [n, dims], the fraction of the total
  variance each axis explains [dims]), from the float64 SVD of the centred data."""
  centred = _check_points(x, dims)
  centred = centred - centred.mean(axis=0)
  _, s, vt = np.linalg.svd(centred, full_matrices=False)
  variance = s ** 2
  if variance.sum() == 0:
    raise ValueError("x has no variance: every row is the same")
  return centred @ vt[:dims].T, variance[:dims] / variance.sum()


def _squared_distances(x: jax.Array) -> jax.Array:
  sq = jnp.sum(x * x, axis=1)
  return jnp.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)


@functools.partial(jax.jit, static_argnames="iterations")
def _conditional(x: jax.Array, log_perplexity: jax.Array, iterations: int = 64) -> jax.Array:
  n = x.shape[0]
  off = ~jnp.eye(n, dtype=bool)
  d = _squared_distances(x)
  d = d / jnp.maximum(jnp.sum(jnp.where(off, d, 0.0)) / (n * (n - 1)), jnp.finfo(d.dtype).tiny)
  d = d - jnp.min(jnp.where(off, d, jnp.inf), axis=1, keepdims=True)  # nearest neighbour at 0: no underflow

  def rows(log_precision):
    logits = jnp.where(off, -jnp.exp(log_precision)[:, None] * d, -jnp.inf)
    log_p = jax.nn.log_softmax(logits, axis=1)
    p = jnp.exp(log_p)
    return p, -jnp.sum(jnp.where(off, p * log_p, 0.0), axis=1)

  def bisect(_, bounds):
    lo, hi = bounds
    mid = (lo + hi) / 2
    too_wide = rows(mid)[1] > log_perplexity  # entropy falls as the precision rises
    return jnp.where(too_wide, mid, lo), jnp.where(too_wide, hi, mid)

  start = jnp.full((n,), _LOG_PRECISION_RANGE, x.dtype)
  lo, hi = jax.lax.fori_loop(0, iterations, bisect, (-start, start))
  return rows((lo + hi) / 2)[0]


def conditional_affinities(x, perplexity: float = 30.0) -> np.ndarray:
  """t-SNE's input affinities p_{j|i} [n, n]: row i is a Gaussian kernel on the squared distances from point i
  (p_{i|i} = 0) whose bandwidth is set by bisection so that its perplexity exp(entropy) is `perplexity`."""
  x = _check_points(x, 1)
  checks.in_range("perplexity", perplexity, 1.0, x.shape[0] - 1, high_open=True)
  return np.asarray(_conditional(jnp.asarray(x, jnp.float32), jnp.log(jnp.float32(perplexity))))


@functools.partial(jax.jit, static_argnames="steps")
def _optimise(p: jax.Array, y: jax.Array, learning_rate: float, steps: int) -> jax.Array:
  off = 1.0 - jnp.eye(p.shape[0], dtype=p.dtype)

  def step(t, carry):
    y, update, gains = carry
    early = t < EXAGGERATED_STEPS
    kernel = off / (1.0 + _squared_distances(y))  # Student-t with one degree of freedom
    q = kernel / jnp.sum(kernel)
    w = (jnp.where(early, EXAGGERATION, 1.0) * p - q) * kernel
    grad = 4.0 * (jnp.sum(w, axis=1, keepdims=True) * y - w @ y)
    gains = jnp.maximum(jnp.where(jnp.sign(grad) != jnp.sign(update), gains + 0.2, gains * 0.8), 0.01)
    update = jnp.where(early, 0.5, 0.8) * update - learning_rate * gains * grad
    y = y + update
    return y - y.mean(axis=0), update, gains

  return jax.lax.fori_loop(0, steps, step, (y, jnp.zeros_like(y), jnp.ones_like(y)))[0]


def tsne(x, *, perplexity: float = 30.0, steps: int = 1000, dims: int = 2) -> np.ndarray:
  """The exact t-SNE embedding [n, dims] of the rows of x (settings: the module docstring).

  The joint affinities are p_ij = (p_{j|i} + p_{i|j}) / 2n from `conditional_affinities`; the embedding
  minimises KL(P || Q) for Student-t affinities q_ij by gradient descent. Deterministic for a given x.
  """
  x = _check_points(x, dims)
  checks.in_range("perplexity", perplexity, 1.0, x.shape[0] - 1, high_open=True)
  checks.positive("steps", steps)
  n = x.shape[0]
  conditional = _conditional(jnp.asarray(x, jnp.float32), jnp.log(jnp.float32(perplexity)))
  p = jnp.maximum((conditional + conditional.T) / (2 * n), 1e-12)
  start, _ = pca(x, dims)
  start = 1e-4 * start / max(start[:, 0].std(), np.finfo(np.float64).tiny)
  return np.asarray(_optimise(p, jnp.asarray(start, jnp.float32), max(n / EXAGGERATION / 4, 50.0), int(steps)),
                    np.float64)
