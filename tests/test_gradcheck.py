"""Gradient checks in float64: hinge, BatchNorm (train mode), an MLP's params; and a wrong gradient is caught."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlcore import gradcheck, layers, losses, models


def test_exact_on_a_closed_form():
  # f(x) = sum x^3: the central difference of a cubic has truncation error h^2 exactly, ~1e-12 relative here.
  x = np.linspace(0.5, 2.0, 7)
  result = gradcheck.compare(lambda v: jnp.sum(v ** 3), x)
  np.testing.assert_allclose(result.analytic, 3 * x ** 2, rtol=1e-14)
  np.testing.assert_allclose(result.numeric, 3 * x ** 2, rtol=1e-8)
  assert gradcheck.max_relative_error(lambda v: jnp.sum(v ** 3), x) < 1e-8


def test_runs_in_float64_and_leaves_global_config_alone():
  assert not jax.config.jax_enable_x64
  seen = []

  def f(x):
    seen.append(x.dtype)
    return jnp.sum(jnp.sin(x))

  # float32 input, and a gradient that float32 differences could not resolve to 1e-8.
  assert gradcheck.max_relative_error(f, np.linspace(0.1, 1.0, 5, dtype=np.float32)) < 1e-8
  assert set(seen) == {np.dtype(np.float64)}
  assert not jax.config.jax_enable_x64


def test_hinge_gradient():
  rng = np.random.default_rng(0)
  scores = rng.normal(scale=2.0, size=(6, 4))
  labels = rng.integers(0, 4, size=6)
  margins = scores - scores[np.arange(6), labels][:, None] + 1.0
  margins[np.arange(6), labels] = 10.0
  assert np.abs(margins).min() > 1e-2  # away from the kinks, where central differences are exact
  assert ((margins > 0) & (margins < 10)).any()  # and some margins are active
  assert gradcheck.max_relative_error(lambda s: losses.hinge(s, labels), scores) < 1e-6


def test_batchnorm_train_mode_gradient():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(5, 3))
  upstream = rng.normal(size=(5, 3))
  bn = layers.BatchNorm()
  variables = bn.init(jax.random.key(0), x, train=True)
  params = {"bn": {"scale": rng.normal(size=3) + 1.0, "bias": rng.normal(size=3)}}

  def f(x, params):
    out, _ = bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                      mutable=["batch_stats"])
    return jnp.sum(out * upstream)

  assert gradcheck.max_relative_error(lambda v: f(v, params), x) < 1e-6
  assert gradcheck.max_relative_error(lambda p: f(x, p), params) < 1e-6


def test_mlp_params_gradient_through_cross_entropy():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(6, 4)).astype(np.float32)
  labels = rng.integers(0, 3, size=6)
  model = models.MLP(hidden=(5, 4), num_classes=3, activation="tanh")
  params = models.init_variables(model, jax.random.key(0), x)["params"]

  def loss_fn(p):
    return losses.cross_entropy(model.apply({"params": p}, x), labels) + losses.penalty("l2", p, 1e-2)

  errors = gradcheck.check_params(loss_fn, params)
  assert set(errors) == {f"{layer}/linear/{kind}" for layer in ("layer0", "layer1", "classifier")
                         for kind in ("kernel", "bias")}
  assert max(errors.values()) < 1e-6, errors


def test_detects_a_wrong_gradient():
  @jax.custom_vjp
  def wrong_sin(x):
    return jnp.sin(x)

  wrong_sin.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (1.01 * g * jnp.cos(x),))  # 1% too large
  x = np.linspace(0.1, 1.0, 5)
  assert gradcheck.max_relative_error(lambda v: jnp.sum(jnp.sin(v)), x) < 1e-8
  error = gradcheck.max_relative_error(lambda v: jnp.sum(wrong_sin(v)), x)
  np.testing.assert_allclose(error, 0.01 / 1.01, rtol=1e-6)

  wrong_sin.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (-g * jnp.sin(x),))  # wrong function entirely
  assert gradcheck.max_relative_error(lambda v: jnp.sum(wrong_sin(v)), x) > 0.5


def test_check_params_names_the_broken_array():
  @jax.custom_vjp
  def bad_square(x):
    return x ** 2

  bad_square.defvjp(lambda x: (x ** 2, x), lambda x, g: (g * x,))  # should be 2 x
  params = {"a": {"kernel": np.linspace(0.5, 1.0, 4)}, "b": {"bias": np.linspace(-1.0, -0.5, 3)}}
  errors = gradcheck.check_params(lambda p: jnp.sum(p["a"]["kernel"] ** 2) + jnp.sum(bad_square(p["b"]["bias"])),
                                  params)
  assert errors["a/kernel"] < 1e-8
  np.testing.assert_allclose(errors["b/bias"], 0.5, rtol=1e-6)


def test_random_subset():
  x = np.random.default_rng(3).normal(size=(40, 30))
  f = lambda v: jnp.sum(jnp.tanh(v) * v)
  result = gradcheck.compare(f, x, num_checks=17, seed=4)
  assert len(result.index) == 17 and len(set(result.index)) == 17
  np.testing.assert_array_equal(result.index, gradcheck.compare(f, x, num_checks=17, seed=4).index)
  np.testing.assert_allclose(result.analytic, (np.tanh(x) + x / np.cosh(x) ** 2).ravel()[result.index], rtol=1e-12)
  assert result.error.max() < 1e-6


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=0.0), "eps"),
    (dict(num_checks=0), "num_checks"),
])
def test_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    gradcheck.max_relative_error(lambda v: jnp.sum(v), np.ones(3), **kwargs)


def test_warns_when_f_leaves_float64():
  with pytest.warns(UserWarning, match="float32"):
    gradcheck.max_relative_error(lambda v: jnp.sum(v ** 2).astype(jnp.float32), np.ones(3))


def test_rejects_non_scalar_f():
  with pytest.raises(ValueError, match="scalar"):
    gradcheck.max_relative_error(lambda v: v * 2, np.ones(3))
