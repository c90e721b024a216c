"""dlcore.pooling against a float64 numpy reference (forward and first-maximum gradient routing) and flax."""

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from dlcore import pooling

# (input shape, window, strides, padding): odd and even sizes, overlapping and tiling windows, explicit padding.
CASES = [((2, 9, 7, 3), (3, 3), (2, 2), "SAME"), ((2, 8, 8, 2), (3, 3), (2, 2), "SAME"),
         ((2, 8, 6, 2), (2, 2), (2, 2), "VALID"), ((1, 6, 5, 2), (3, 3), (1, 1), "SAME"),
         ((2, 7, 7, 2), (3, 2), (2, 1), ((1, 1), (0, 1)))]


def _windows(x, window, strides, padding, fill):
  """Padded float64 input and, per output position, the (row, col) of its window's top-left tap."""
  pads = lax.padtype_to_pads(x.shape[1:3], window, strides, padding) if isinstance(padding, str) else padding
  xp = np.pad(x.astype(np.float64), ((0, 0), *pads, (0, 0)), constant_values=fill)
  out_h = (xp.shape[1] - window[0]) // strides[0] + 1
  out_w = (xp.shape[2] - window[1]) // strides[1] + 1
  return xp, pads, [(a, b, a * strides[0], b * strides[1]) for a in range(out_h) for b in range(out_w)], (out_h, out_w)


def _max_pool_reference(x, g, window, strides, padding):
  """Forward max and its gradient, each output's gradient going to the first maximum in row-major order."""
  xp, pads, positions, (out_h, out_w) = _windows(x, window, strides, padding, -np.inf)
  y = np.zeros((x.shape[0], out_h, out_w, x.shape[3]))
  dxp = np.zeros_like(xp)
  for n in range(x.shape[0]):
    for c in range(x.shape[3]):
      for a, b, r, s in positions:
        patch = xp[n, r:r + window[0], s:s + window[1], c]
        k = int(np.argmax(patch))  # numpy's argmax returns the first maximum in row-major order
        y[n, a, b, c] = patch.flat[k]
        dxp[n, r + k // window[1], s + k % window[1], c] += g[n, a, b, c]
  return y, dxp[:, pads[0][0]:pads[0][0] + x.shape[1], pads[1][0]:pads[1][0] + x.shape[2]]


def _avg_pool_reference(x, window, strides, padding):
  xp, _, positions, (out_h, out_w) = _windows(x, window, strides, padding, 0.0)
  y = np.zeros((x.shape[0], out_h, out_w, x.shape[3]))
  for a, b, r, s in positions:
    y[:, a, b] = xp[:, r:r + window[0], s:s + window[1]].mean(axis=(1, 2))
  return y


def _inputs(shape, seed):
  """ReLU of normals, so many windows hold ties at 0, and one window is all zeros."""
  rng = np.random.default_rng(seed)
  x = np.maximum(rng.normal(size=shape), 0).astype(np.float32)
  x[0, :3, :3, 0] = 0.0
  return x


@pytest.mark.parametrize("shape,window,strides,padding", CASES)
@pytest.mark.parametrize("impl", ["dlcore", "flax"])
def test_max_pool_forward_and_first_maximum_gradient_match_numpy(shape, window, strides, padding, impl):
  pool = pooling.max_pool if impl == "dlcore" else nn.max_pool
  x = _inputs(shape, seed=len(shape) + window[0])
  y, vjp = jax.vjp(lambda v: pool(v, window, strides, padding), jnp.asarray(x))
  g = np.random.default_rng(1).normal(size=y.shape).astype(np.float32)
  (dx,) = vjp(jnp.asarray(g))
  y_ref, dx_ref = _max_pool_reference(x, g, window, strides, padding)
  np.testing.assert_array_equal(np.asarray(y), y_ref.astype(np.float32))
  np.testing.assert_allclose(np.asarray(dx), dx_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,window,strides,padding", CASES)
def test_avg_pool_forward_and_gradient_match_numpy(shape, window, strides, padding):
  x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
  y = pooling.avg_pool(jnp.asarray(x), window, strides, padding)
  np.testing.assert_allclose(np.asarray(y), _avg_pool_reference(x, window, strides, padding), rtol=1e-5, atol=1e-6)
  # the mean is linear, so its gradient is the reference's transpose: <avg(x), g> is linear in x with slope dx
  g = np.random.default_rng(3).normal(size=y.shape)
  dx = jax.grad(lambda v: jnp.sum(pooling.avg_pool(v, window, strides, padding) * g))(jnp.asarray(x))
  basis = np.eye(x.size).reshape(x.size, *x.shape)
  dx_ref = np.array([np.sum(_avg_pool_reference(e, window, strides, padding) * g) for e in basis])
  np.testing.assert_allclose(np.asarray(dx).ravel(), dx_ref, rtol=1e-5, atol=1e-6)


def test_cpu_gradient_avoids_select_and_scatter():
  x = jnp.asarray(_inputs((2, 8, 8, 2), seed=0))
  grad = lambda pool: jax.grad(lambda v: jnp.sum(pool(v, (3, 3), (2, 2), "SAME") ** 2))
  assert jax.default_backend() == "cpu"
  assert "select_and_scatter" in str(jax.make_jaxpr(grad(nn.max_pool))(x))
  assert "select_and_scatter" not in str(jax.make_jaxpr(grad(pooling.max_pool))(x))


def test_bfloat16_pooling_keeps_the_dtype_and_the_float32_values():
  x = _inputs((2, 8, 8, 2), seed=5)
  xb = jnp.asarray(x, jnp.bfloat16)
  for pool in (pooling.max_pool, pooling.avg_pool):
    y, vjp = jax.vjp(lambda v: pool(v, (3, 3), (2, 2), "SAME"), xb)
    (dx,) = vjp(jnp.ones_like(y))
    assert y.dtype == dx.dtype == jnp.bfloat16
    y32, vjp32 = jax.vjp(lambda v: pool(v, (3, 3), (2, 2), "SAME"), xb.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y32), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(vjp32(jnp.ones_like(y32))[0]), rtol=1e-2)


def test_other_ranks_fall_back_to_flax():
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 9, 3)), jnp.float32)  # [N, L, C], 1-D window
  for ours, theirs in ((pooling.max_pool, nn.max_pool), (pooling.avg_pool, nn.avg_pool)):
    np.testing.assert_array_equal(np.asarray(ours(x, (3,), (2,), "SAME")), np.asarray(theirs(x, (3,), (2,), "SAME")))
