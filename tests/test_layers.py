"""Activations, BatchNorm (forward, backward, running statistics), Dropout and the Dense/Conv units, against
numpy float64 references written from the papers."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dlcore import activations, layers

# ---------------------------------------------------------------------------------------------- activations

def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


NP_ACTIVATIONS = {
    "identity": lambda x: x,
    "linear": lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "leaky_relu": lambda x: np.where(x > 0, x, 0.01 * x),
    "elu": lambda x: np.where(x > 0, x, np.expm1(x)),
    # exact GELU (Hendrycks & Gimpel): x * Phi(x), Phi the standard normal CDF -- not the tanh approximation
    "gelu": lambda x: x * 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0))),
    "softplus": lambda x: np.log1p(np.exp(x)),
    "swish": lambda x: x * _sigmoid(x),
}
POINTS = np.array([-4.0, -3.0, -1.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 1.0, 2.0, 3.0])


def test_every_activation_has_a_reference():
  assert set(activations.NAMES) == set(NP_ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(NP_ACTIVATIONS))
def test_activation_matches_numpy_formula(name):
  got = np.asarray(activations.get(name)(jnp.asarray(POINTS, jnp.float32)), np.float64)
  np.testing.assert_allclose(got, NP_ACTIVATIONS[name](POINTS), rtol=1e-6, atol=1e-7)


def test_activation_spot_values():
  # a few values by hand, independent of the numpy formulas above
  leaky = activations.get("leaky_relu")(jnp.array([-2.0, 3.0]))
  np.testing.assert_allclose(np.asarray(leaky), [-0.02, 3.0], rtol=1e-7)
  np.testing.assert_allclose(float(activations.get("elu")(jnp.array(-1.0))), math.exp(-1.0) - 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(activations.get("gelu")(jnp.array(1.0))), 0.8413447460685429, rtol=1e-6)
  np.testing.assert_allclose(float(activations.get("sigmoid")(jnp.array(0.0))), 0.5, rtol=0)
  assert float(activations.get("relu")(jnp.array(-0.0))) == 0.0


def test_unknown_activation_lists_valid_names():
  with pytest.raises(ValueError) as err:
    activations.get("relu6")
  assert "relu6" in str(err.value)
  for name in activations.NAMES:
    assert name in str(err.value)


# ---------------------------------------------------------------------------------------------- BatchNorm
# Ioffe & Szegedy 2015, Algorithm 1 and the backward pass of Section 3, in float64 numpy.

def bn_forward_np(x, gamma, beta, eps):
  axes = tuple(range(x.ndim - 1))
  mu = x.mean(axis=axes)                      # mu_B
  var = ((x - mu) ** 2).mean(axis=axes)       # sigma_B^2, biased (1/m)
  xhat = (x - mu) / np.sqrt(var + eps)
  return gamma * xhat + beta, mu, var, xhat


def bn_backward_np(dy, x, gamma, eps):
  """The paper's chain rule: dl/dxhat, dl/dsigma^2, dl/dmu, then dl/dx, dl/dgamma, dl/dbeta."""
  axes = tuple(range(x.ndim - 1))
  m = x.size // x.shape[-1]
  _, mu, var, xhat = bn_forward_np(x, gamma, 0.0, eps)
  dxhat = dy * gamma
  dvar = np.sum(dxhat * (x - mu), axis=axes) * -0.5 * (var + eps) ** -1.5
  dmu = np.sum(dxhat * -1.0 / np.sqrt(var + eps), axis=axes) + dvar * np.sum(-2.0 * (x - mu), axis=axes) / m
  dx = dxhat / np.sqrt(var + eps) + dvar * 2.0 * (x - mu) / m + dmu / m
  # the same dx in the compact closed form
  compact = (m * dxhat - dxhat.sum(axis=axes) - xhat * (dxhat * xhat).sum(axis=axes)) / (m * np.sqrt(var + eps))
  np.testing.assert_allclose(dx, compact, rtol=1e-10, atol=1e-12)
  return dx, np.sum(dy * xhat, axis=axes), np.sum(dy, axis=axes)


BN_SHAPES = {"2d": (8, 5), "4d": (3, 4, 5, 6)}


def _bn_data(shape, dtype=np.float64, seed=0, narrow_channel=True):
  rng = np.random.default_rng(seed)
  c = shape[-1]
  # channels with different location and scale, one of them nearly constant so that epsilon matters
  loc = rng.normal(size=c) * 2.0
  scale = rng.uniform(0.5, 3.0, size=c)
  if narrow_channel:
    scale[0] = 0.05
  x = loc + scale * rng.normal(size=shape)
  gamma = rng.uniform(0.5, 2.0, size=c)
  beta = rng.normal(size=c)
  return x.astype(dtype), gamma.astype(dtype), beta.astype(dtype)


def _bn_variables(gamma, beta, mean=None, var=None):
  c = gamma.shape[-1]
  mean = np.zeros(c, gamma.dtype) if mean is None else mean
  var = np.ones(c, gamma.dtype) if var is None else var
  return {"params": {"bn": {"scale": gamma, "bias": beta}}, "batch_stats": {"bn": {"mean": mean, "var": var}}}


def test_batchnorm_variables_layout():
  variables = layers.BatchNorm().init(jax.random.key(0), jnp.ones((2, 3)), train=False)
  shapes = jax.tree.map(lambda a: (a.shape, float(a.mean())), variables)
  assert shapes == {"params": {"bn": {"scale": ((3,), 1.0), "bias": ((3,), 0.0)}},
                    "batch_stats": {"bn": {"mean": ((3,), 0.0), "var": ((3,), 1.0)}}}


@pytest.mark.parametrize("eps", [1e-5, 1e-2])
@pytest.mark.parametrize("kind", sorted(BN_SHAPES))
def test_batchnorm_train_forward_matches_algorithm_1(kind, eps):
  x, gamma, beta = _bn_data(BN_SHAPES[kind])
  bn = layers.BatchNorm(epsilon=eps)
  variables = _bn_variables(gamma.astype(np.float32), beta.astype(np.float32))
  y, _ = bn.apply(variables, x.astype(np.float32), train=True, mutable=["batch_stats"])
  expected, *_ = bn_forward_np(x, gamma.astype(np.float32).astype(np.float64),
                               beta.astype(np.float32).astype(np.float64), eps)
  assert y.dtype == jnp.float32 and y.shape == x.shape
  np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("kind", sorted(BN_SHAPES))
def test_batchnorm_forward_and_backward_float64(kind):
  x, gamma, beta = _bn_data(BN_SHAPES[kind], seed=1)
  dy = np.random.default_rng(2).normal(size=x.shape)
  eps = 1e-5
  bn = layers.BatchNorm(epsilon=eps)

  with jax.enable_x64(True):
    def objective(x, gamma, beta):
      y, _ = bn.apply(_bn_variables(gamma, beta), x, train=True, mutable=["batch_stats"])
      return jnp.sum(y * dy), y

    (_, y), (dx, dgamma, dbeta) = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))(
        jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta))
    assert y.dtype == jnp.float64 and dx.dtype == jnp.float64
    y, dx, dgamma, dbeta = (np.asarray(a) for a in (y, dx, dgamma, dbeta))

  expected_y, *_ = bn_forward_np(x, gamma, beta, eps)
  np.testing.assert_allclose(y, expected_y, rtol=1e-9, atol=1e-10)
  ref_dx, ref_dgamma, ref_dbeta = bn_backward_np(dy, x, gamma, eps)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-7, atol=1e-9)
  np.testing.assert_allclose(dgamma, ref_dgamma, rtol=1e-9, atol=1e-10)
  np.testing.assert_allclose(dbeta, ref_dbeta, rtol=1e-12, atol=1e-12)
  # the gradient wrt x is orthogonal to the constants and to xhat, per channel (normalisation invariances)
  axes = tuple(range(x.ndim - 1))
  np.testing.assert_allclose(dx.sum(axis=axes), 0.0, atol=1e-8)


@pytest.mark.parametrize("kind", sorted(BN_SHAPES))
def test_batchnorm_gradients_float32(kind):
  # no narrow channel here: flax computes the batch variance as E[x^2] - E[x]^2, which in float32 loses
  # digits when |mean| >> std (the float64 test above covers the narrow channel)
  x, gamma, beta = (a.astype(np.float32) for a in _bn_data(BN_SHAPES[kind], seed=3, narrow_channel=False))
  dy = np.random.default_rng(4).normal(size=x.shape).astype(np.float32)
  bn = layers.BatchNorm()

  def objective(x, gamma, beta):
    y, _ = bn.apply(_bn_variables(gamma, beta), x, train=True, mutable=["batch_stats"])
    return jnp.sum(y * dy)

  grads = jax.jit(jax.grad(objective, argnums=(0, 1, 2)))(x, gamma, beta)
  refs = bn_backward_np(dy.astype(np.float64), x.astype(np.float64), gamma.astype(np.float64), 1e-5)
  for got, ref in zip(grads, refs):
    scale = np.abs(ref).max()
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-4, atol=2e-5 * scale)


@pytest.mark.parametrize("kind", sorted(BN_SHAPES))
def test_batchnorm_running_statistics(kind):
  m = 0.8
  x1, gamma, beta = _bn_data(BN_SHAPES[kind], seed=5)
  x2, _, _ = _bn_data(BN_SHAPES[kind], seed=6)
  bn = layers.BatchNorm(momentum=m)
  variables = _bn_variables(gamma.astype(np.float32), beta.astype(np.float32))
  _, state1 = bn.apply(variables, x1.astype(np.float32), train=True, mutable=["batch_stats"])
  _, mu1, var1, _ = bn_forward_np(x1, gamma, beta, 1e-5)
  # ra = m * ra + (1 - m) * batch, from mean 0 and var 1; the batch variance is the biased one
  np.testing.assert_allclose(state1["batch_stats"]["bn"]["mean"], (1 - m) * mu1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state1["batch_stats"]["bn"]["var"], m * 1.0 + (1 - m) * var1, rtol=1e-5, atol=1e-6)
  n = x1.size // x1.shape[-1]
  unbiased = m + (1 - m) * var1 * n / (n - 1)
  assert not np.allclose(state1["batch_stats"]["bn"]["var"], unbiased, rtol=1e-3)

  variables2 = {"params": variables["params"], "batch_stats": state1["batch_stats"]}
  _, state2 = bn.apply(variables2, x2.astype(np.float32), train=True, mutable=["batch_stats"])
  _, mu2, var2, _ = bn_forward_np(x2, gamma, beta, 1e-5)
  np.testing.assert_allclose(state2["batch_stats"]["bn"]["mean"], m * (1 - m) * mu1 + (1 - m) * mu2,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state2["batch_stats"]["bn"]["var"], m * (m + (1 - m) * var1) + (1 - m) * var2,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(BN_SHAPES))
def test_batchnorm_eval_uses_running_statistics(kind):
  x, gamma, beta = _bn_data(BN_SHAPES[kind], seed=7)
  c = x.shape[-1]
  ra_mean = np.random.default_rng(8).normal(size=c)
  ra_var = np.random.default_rng(9).uniform(0.2, 3.0, size=c)
  eps = 1e-5
  variables = jax.tree.map(lambda a: np.asarray(a, np.float32), _bn_variables(gamma, beta, ra_mean, ra_var))
  bn = layers.BatchNorm(epsilon=eps)
  y, state = bn.apply(variables, x.astype(np.float32), train=False, mutable=["batch_stats"])
  f32 = lambda a: a.astype(np.float32).astype(np.float64)
  expected = f32(gamma) * (f32(x) - f32(ra_mean)) / np.sqrt(f32(ra_var) + eps) + f32(beta)
  np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=1e-5, atol=1e-5)
  # eval leaves batch_stats exactly as they were; the design's eval call (mutable=False) gives the same output
  for path, leaf in traverse_util.flatten_dict(state["batch_stats"]).items():
    assert np.array_equal(np.asarray(leaf), traverse_util.flatten_dict(variables["batch_stats"])[path])
  y2 = bn.apply(variables, x.astype(np.float32), train=False)
  assert np.array_equal(np.asarray(y), np.asarray(y2))
  # train mode changes them
  _, state = bn.apply(variables, x.astype(np.float32), train=True, mutable=["batch_stats"])
  assert not np.allclose(state["batch_stats"]["bn"]["mean"], variables["batch_stats"]["bn"]["mean"])
  assert not np.allclose(state["batch_stats"]["bn"]["var"], variables["batch_stats"]["bn"]["var"])


@pytest.mark.parametrize("kwargs,arg", [({"momentum": 1.0}, "momentum"), ({"momentum": -0.1}, "momentum"),
                                        ({"epsilon": 0.0}, "epsilon")])
def test_batchnorm_rejects_bad_hyperparameters(kwargs, arg):
  with pytest.raises(ValueError, match=arg):
    layers.BatchNorm(**kwargs).init(jax.random.key(0), jnp.ones((2, 3)), train=False)


# ---------------------------------------------------------------------------------------------- Dropout

DROP_SHAPE = (200, 500)  # 1e5 units: statistical tolerances of a few parts in a thousand
X_POS = np.random.default_rng(10).uniform(0.5, 2.0, size=DROP_SHAPE).astype(np.float32)


def _dropout(p, mode, x, train, seed=0):
  return np.asarray(layers.Dropout(keep_prob=p, mode=mode).apply({}, x, train=train,
                                                                  rngs={"dropout": jax.random.key(seed)}))


@pytest.mark.parametrize("p", [0.3, 0.8])
def test_inverted_dropout(p):
  x = X_POS
  y = _dropout(p, "inverted", x, train=True)
  kept = y != 0.0
  # every unit is 0 or x / p
  np.testing.assert_allclose(y[kept], x[kept] / np.float32(p), rtol=1e-6)
  n = x.size
  assert abs(kept.mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
  # E[y] = x: var(y_i) = x_i^2 (1 - p) / p
  sd_of_mean = math.sqrt(np.mean(x.astype(np.float64) ** 2) * (1 - p) / p / n)
  assert abs(y.mean(dtype=np.float64) - x.mean(dtype=np.float64)) < 5 * sd_of_mean
  # test time: the identity
  assert np.array_equal(_dropout(p, "inverted", x, train=False), x)


@pytest.mark.parametrize("p", [0.3, 0.8])
def test_original_dropout(p):
  x = X_POS
  y = _dropout(p, "original", x, train=True)
  kept = y != 0.0
  assert np.array_equal(y[kept], x[kept])  # kept units unscaled
  n = x.size
  assert abs(kept.mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
  test_out = _dropout(p, "original", x, train=False)
  np.testing.assert_allclose(test_out, x * np.float32(p), rtol=1e-7)
  # E[train] = p x = test output
  sd_of_mean = math.sqrt(np.mean(x.astype(np.float64) ** 2) * p * (1 - p) / n)
  assert abs(y.mean(dtype=np.float64) - test_out.mean(dtype=np.float64)) < 5 * sd_of_mean
  # the mask depends only on the key: original = p * inverted on the same key
  np.testing.assert_allclose(y, np.float32(p) * _dropout(p, "inverted", x, train=True), rtol=1e-6)


def test_dropout_mask_is_a_function_of_the_key():
  x = X_POS
  a, b, c = (_dropout(0.5, "inverted", x, True, seed=s) for s in (3, 3, 4))
  assert np.array_equal(a, b)
  assert not np.array_equal(a != 0, c != 0)
  # units are dropped independently: the two masks agree on about half the units
  agree = np.mean((a != 0) == (c != 0))
  assert abs(agree - 0.5) < 5 * math.sqrt(0.25 / x.size)


@pytest.mark.parametrize("mode", layers.DROPOUT_MODES)
@pytest.mark.parametrize("train", [True, False])
def test_keep_prob_one_is_identity(mode, train):
  x = X_POS[:4, :6]
  # no dropout rng is needed either
  y = layers.Dropout(keep_prob=1.0, mode=mode).apply({}, x, train=train)
  assert np.array_equal(np.asarray(y), x)


@pytest.mark.parametrize("p", [0.0, -0.5, 1.5])
def test_keep_prob_out_of_range_names_it(p):
  with pytest.raises(ValueError, match=r"keep_prob must be in \(0\.0, 1\.0\], got " + re.escape(str(p))):
    layers.Dropout(keep_prob=p).apply({}, X_POS[:2, :2], train=True, rngs={"dropout": jax.random.key(0)})


def test_bad_dropout_mode():
  with pytest.raises(ValueError, match="dropout mode.*'inverted', 'original'"):
    layers.Dropout(keep_prob=0.5, mode="scaled").apply({}, X_POS[:2, :2], train=False)


# ---------------------------------------------------------------------------------------------- Dense / Conv

def conv_np(x, w, b, strides, padding):
  """NHWC x HWIO cross-correlation in float64, as in every deep-learning library."""
  n, h, wd, _ = x.shape
  kh, kw, _, cout = w.shape
  s = strides
  if padding == "SAME":
    oh, ow = -(-h // s), -(-wd // s)
    ph, pw = max((oh - 1) * s + kh - h, 0), max((ow - 1) * s + kw - wd, 0)
    x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
  else:
    oh, ow = (h - kh) // s + 1, (wd - kw) // s + 1
  out = np.zeros((n, oh, ow, cout))
  for i in range(kh):
    for j in range(kw):
      out += x[:, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s, :] @ w[i, j]
  return out + (0.0 if b is None else b)


def _randomise(params, seed=0):
  """Non-trivial values for every parameter (biases and BatchNorm scale/offset init to constants)."""
  flat = traverse_util.flatten_dict(params)
  rng = np.random.default_rng(seed)
  return traverse_util.unflatten_dict({
      k: (rng.uniform(0.5, 1.5, v.shape) if k[-1] == "scale" else rng.normal(size=v.shape) * 0.5
          ).astype(np.float32) for k, v in flat.items()})


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@pytest.mark.parametrize("batchnorm,use_bias,expected", [
    ("none", True, {("linear", "kernel"), ("linear", "bias")}),
    ("none", False, {("linear", "kernel")}),
    ("before", True, {("linear", "kernel"), ("bn_before", "bn", "scale"), ("bn_before", "bn", "bias")}),
    ("after", True, {("linear", "kernel"), ("linear", "bias"), ("bn_after", "bn", "scale"),
                     ("bn_after", "bn", "bias")}),
])
@pytest.mark.parametrize("unit", ["dense", "conv"])
def test_unit_parameters(unit, batchnorm, use_bias, expected):
  if unit == "dense":
    module, x = layers.Dense(features=3, batchnorm=batchnorm, use_bias=use_bias), jnp.ones((2, 4))
  else:
    module, x = layers.Conv(features=3, batchnorm=batchnorm, use_bias=use_bias), jnp.ones((2, 5, 5, 4))
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), x))
  assert set(traverse_util.flatten_dict(variables["params"])) == expected
  assert ("batch_stats" in variables) == (batchnorm != "none")


def _run_unit(module, params, x, train, batch_stats=None):
  variables = {"params": params}
  if batch_stats is not None:
    variables["batch_stats"] = batch_stats
  mutable = ["intermediates"] + (["batch_stats"] if train and batch_stats is not None else [])
  y, state = module.apply(variables, x, train=train, mutable=mutable)
  inter = state["intermediates"]
  return np.asarray(y, np.float64), np.asarray(inter["pre"][0], np.float64), np.asarray(inter["post"][0], np.float64)


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "elu"])
def test_dense_pre_post_match_numpy(activation):
  x = np.random.default_rng(21).normal(size=(6, 5)).astype(np.float32)
  module = layers.Dense(features=4, activation=activation, initializer="zeros")  # params randomised below
  params = _randomise(module.init(jax.random.key(0), x)["params"])
  y, pre, post = _run_unit(module, params, x, train=False)
  p = _f64(params)
  ref_pre = x.astype(np.float64) @ p["linear"]["kernel"] + p["linear"]["bias"]
  ref_post = NP_ACTIVATIONS[activation](ref_pre)
  np.testing.assert_allclose(pre, ref_pre, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(post, ref_post, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y, ref_post, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,strides,padding", [((3, 3), 1, "SAME"), ((3, 2), 2, "VALID"), ((3, 3), 2, "SAME")])
def test_conv_pre_post_match_numpy(kernel, strides, padding):
  x = np.random.default_rng(22).normal(size=(2, 7, 6, 3)).astype(np.float32)
  module = layers.Conv(features=4, kernel_size=kernel, strides=(strides, strides), padding=padding,
                       activation="tanh", initializer="zeros")
  params = _randomise(module.init(jax.random.key(0), x)["params"])
  y, pre, post = _run_unit(module, params, x, train=False)
  p = _f64(params)
  ref_pre = conv_np(x.astype(np.float64), p["linear"]["kernel"], p["linear"]["bias"], strides, padding)
  assert pre.shape == ref_pre.shape
  np.testing.assert_allclose(pre, ref_pre, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(post, np.tanh(ref_pre), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y, np.tanh(ref_pre), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unit", ["dense", "conv"])
def test_batchnorm_before_and_after_activation(unit):
  eps = 1e-5
  if unit == "dense":
    x = np.random.default_rng(23).normal(size=(16, 5)).astype(np.float32)
    make = lambda bn: layers.Dense(features=4, activation="relu", batchnorm=bn, initializer="zeros")
    linear = lambda p, bias: x.astype(np.float64) @ p["kernel"] + bias
  else:
    x = np.random.default_rng(24).normal(size=(2, 5, 5, 3)).astype(np.float32)
    make = lambda bn: layers.Conv(features=4, activation="relu", batchnorm=bn, initializer="zeros")
    linear = lambda p, bias: conv_np(x.astype(np.float64), p["kernel"], bias, 1, "SAME")

  before = make("before")
  variables = before.init(jax.random.key(0), x)
  params = _randomise(variables["params"])
  y, pre, post = _run_unit(before, params, x, True, variables["batch_stats"])
  p = _f64(params)
  bn = p["bn_before"]["bn"]
  ref_pre, *_ = bn_forward_np(linear(p["linear"], 0.0), bn["scale"], bn["bias"], eps)  # no linear bias
  np.testing.assert_allclose(pre, ref_pre, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(post, np.maximum(ref_pre, 0), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(y, post, rtol=0, atol=0)

  after = make("after")
  variables = after.init(jax.random.key(0), x)
  params = _randomise(variables["params"])
  y, pre, post = _run_unit(after, params, x, True, variables["batch_stats"])
  p = _f64(params)
  bn = p["bn_after"]["bn"]
  ref_pre = linear(p["linear"], p["linear"]["bias"])
  ref_y, *_ = bn_forward_np(np.maximum(ref_pre, 0), bn["scale"], bn["bias"], eps)
  np.testing.assert_allclose(pre, ref_pre, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(post, np.maximum(ref_pre, 0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("unit", ["dense", "conv"])
@pytest.mark.parametrize("batchnorm", ["none", "before", "after"])
def test_recording_does_not_change_outputs(unit, batchnorm):
  if unit == "dense":
    module, x = layers.Dense(features=4, activation="tanh", batchnorm=batchnorm, initializer="identity"), \
        np.random.default_rng(25).normal(size=(8, 5))
  else:
    module, x = layers.Conv(features=4, activation="tanh", batchnorm=batchnorm, initializer="identity"), \
        np.random.default_rng(26).normal(size=(2, 5, 5, 3))
  x = x.astype(np.float32)
  variables = module.init(jax.random.key(0), x)
  variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
  for train in (False, True):
    mutable = ["batch_stats"] if train and batchnorm != "none" else False
    plain = module.apply(variables, x, train=train, mutable=mutable)
    plain = plain[0] if mutable else plain
    recorded, state = module.apply(variables, x, train=train,
                                   mutable=["intermediates"] + (mutable or []))
    assert np.array_equal(np.asarray(plain), np.asarray(recorded))
    assert set(state["intermediates"]) == {"pre", "post"}
    # with a zero 'perturbations' collection present (stats.activation_grads), still the same output
    zeros = {"post": jnp.zeros_like(state["intermediates"]["post"][0])}
    perturbed = module.apply({**variables, "perturbations": zeros}, x, train=train, mutable=mutable)
    perturbed = perturbed[0] if mutable else perturbed
    assert np.array_equal(np.asarray(plain), np.asarray(perturbed))


@pytest.mark.parametrize("unit", [layers.Dense, layers.Conv])
def test_unit_rejects_bad_batchnorm_and_features(unit):
  x = jnp.ones((1, 3, 3, 2))
  with pytest.raises(ValueError, match=r"batchnorm must be one of 'none', 'before', 'after'; got 'middle'"):
    unit(features=2, batchnorm="middle").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="features must be > 0"):
    unit(features=0).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="unknown activation 'relu6'"):
    unit(features=2, activation="relu6").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="unknown initializer 'nope'"):
    unit(features=2, initializer="nope").init(jax.random.key(0), x)
