"""The library surface other code relies on: flax conventions, names or callables, clean `init`, no silently
dropped option, BatchNorm's running variance, ResNet shortcut A, the hinge tie, checked against closed forms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlcore import layers, losses, models


def _variables_tree(variables):
  return jax.tree.map(lambda a: a.shape, variables)


# --- flax conventions ---------------------------------------------------------------------------------------


def test_size_is_the_first_positional_field_and_options_are_keyword_only():
  assert layers.Dense(128).features == 128
  conv = layers.Conv(32, 5)
  assert (conv.features, conv.kernel_size) == (32, 5)
  assert models.MLP((64, 32)).hidden == (64, 32)
  # a second positional value lands in flax's `parent` slot, as with nn.Dense(4, "relu"): refused, never used
  for build in (lambda: layers.Dense(128, "relu"), lambda: layers.Conv(32, 5, 2), lambda: models.MLP((8,), 10)):
    with pytest.raises((TypeError, ValueError)):
      build()


def test_conv_int_kernel_size_and_strides_equal_tuples():
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
  a, b = layers.Conv(4, 3, strides=2), layers.Conv(4, (3, 3), strides=(2, 2))
  va = a.init(jax.random.key(1), x)
  np.testing.assert_array_equal(a.apply(va, x), b.apply(va, x))
  assert a.apply(va, x).shape == (2, 5, 5, 4)


@pytest.mark.parametrize("case", ["dense", "conv", "mlp_bn", "resnet8", "lenet5", "cifar_convnet"])
def test_init_returns_params_and_batch_stats_only_and_applies_at_any_batch_size(case):
  x8 = jax.random.normal(jax.random.key(0), (8, 28, 28, 3) if case != "dense" else (8, 5))
  module = {"dense": layers.Dense(4, activation="tanh"), "conv": layers.Conv(4, 3, activation="relu"),
            "mlp_bn": models.get("mlp", batchnorm="before", keep_prob=0.5), "resnet8": models.get("resnet8"),
            "lenet5": models.get("lenet5", batchnorm="after"), "cifar_convnet": models.get("cifar_convnet")}[case]
  variables = module.init(jax.random.key(1), x8)
  has_bn = case in ("mlp_bn", "resnet8", "lenet5")
  assert set(variables) == ({"params", "batch_stats"} if has_bn else {"params"})
  out8 = module.apply(variables, x8)
  out2 = module.apply(variables, x8[:2])  # the flax idiom that failed while init returned batch-shaped state
  np.testing.assert_allclose(out2, out8[:2], rtol=1e-5, atol=1e-6)


# --- names or callables -------------------------------------------------------------------------------------


def test_activation_and_initializer_accept_callables():
  x = jax.random.normal(jax.random.key(0), (6, 5))
  gaussian = lambda key, shape, dtype=jnp.float32: 0.5 * jax.random.normal(key, shape, dtype)
  by_callable = layers.Dense(3, activation=jax.nn.silu, initializer=gaussian)
  by_name = layers.Dense(3, activation="swish", initializer="normal", init_scale=0.5)
  v = by_callable.init(jax.random.key(1), x)
  np.testing.assert_allclose(v["params"]["linear"]["kernel"], by_name.init(jax.random.key(1), x)["params"]["linear"]["kernel"])
  w, b = np.asarray(v["params"]["linear"]["kernel"], np.float64), np.asarray(v["params"]["linear"]["bias"])
  z = np.asarray(x, np.float64) @ w + b
  np.testing.assert_allclose(by_callable.apply(v, x), z / (1 + np.exp(-z)), rtol=1e-5, atol=1e-6)


def test_callable_initializer_with_scale_and_non_callables_are_refused():
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="init_scale=2.0 applies to a named initializer only"):
    layers.Dense(3, initializer=nn.initializers.zeros, init_scale=2.0).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"activation must be a name \(.*relu.*\) or a callable; got 128"):
    layers.Dense(3, activation=128)
  with pytest.raises(ValueError, match=r"initializer must be a name \(.*he_normal.*\) or a callable; got 0.5"):
    layers.Dense(3, initializer=0.5)


# --- Dropout: rate or keep_prob -----------------------------------------------------------------------------


def test_dropout_rate_and_keep_prob_are_complements():
  x = jnp.ones((4000,))
  key = {"dropout": jax.random.key(3)}
  by_rate = layers.Dropout(rate=0.1).apply({}, x, train=True, rngs=key)
  by_keep = layers.Dropout(keep_prob=0.9).apply({}, x, train=True, rngs=key)
  np.testing.assert_array_equal(by_rate, by_keep)
  kept = float(jnp.mean(by_rate != 0))
  assert abs(kept - 0.9) < 4 * np.sqrt(0.9 * 0.1 / 4000)  # flax's meaning: rate=0.1 drops 10%
  np.testing.assert_allclose(by_rate[by_rate != 0], 1 / 0.9, rtol=1e-6)


@pytest.mark.parametrize("kwargs", [{}, {"rate": 0.1, "keep_prob": 0.9}])
def test_dropout_needs_exactly_one_of_rate_and_keep_prob(kwargs):
  with pytest.raises(ValueError, match="exactly one of rate= .* or keep_prob="):
    layers.Dropout(**kwargs)


def test_dropout_positional_use_is_refused_naming_both():
  with pytest.raises(TypeError, match=r"Dropout\(0.1\) is ambiguous: pass rate= .* or keep_prob="):
    layers.Dropout(0.1)


@pytest.mark.parametrize("rate", [-0.1, 1.0])
def test_dropout_rate_out_of_range(rate):
  with pytest.raises(ValueError, match=r"rate must be in \[0.0, 1.0\)"):
    layers.Dropout(rate=rate)


# --- BatchNorm's running variance ---------------------------------------------------------------------------


@pytest.mark.parametrize("running_var", layers.RUNNING_VARS)
def test_batchnorm_running_variance_biased_or_unbiased_against_numpy(running_var):
  x = np.random.default_rng(0).normal(2.0, 3.0, size=(6, 5, 5, 4)).astype(np.float32)
  bn = layers.BatchNorm(momentum=0.8, running_var=running_var)
  variables = bn.init(jax.random.key(0), x, train=False)
  y, state = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  m = 6 * 5 * 5
  flat = x.reshape(m, 4).astype(np.float64)
  var = flat.var(0) * (m / (m - 1) if running_var == "unbiased" else 1.0)
  np.testing.assert_allclose(state["batch_stats"]["bn"]["var"], 0.8 * 1.0 + 0.2 * var, rtol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["bn"]["mean"], 0.2 * flat.mean(0), rtol=1e-5)
  # train mode normalises with the biased variance either way (Alg. 1)
  np.testing.assert_allclose(y.reshape(m, 4), (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5), rtol=1e-4,
                             atol=1e-5)


def test_batchnorm_rejects_unknown_running_var():
  with pytest.raises(ValueError, match="running_var must be one of 'biased', 'unbiased'; got 'pytorch'"):
    layers.BatchNorm(running_var="pytorch")


def test_models_pass_bn_running_var_to_every_batchnorm():
  x = np.random.default_rng(1).normal(size=(5, 8, 8, 3)).astype(np.float32)
  stats = {}
  for mode in layers.RUNNING_VARS:
    model = models.get("resnet8", bn_running_var=mode, bn_momentum=0.0)
    v = model.init(jax.random.key(0), x)
    stats[mode] = model.apply(v, x, train=True, mutable=["batch_stats"])[1]["batch_stats"]
  stem_m = 5 * 8 * 8  # momentum 0: the running variance is this batch's estimate
  np.testing.assert_allclose(stats["unbiased"]["stem"]["bn_before"]["bn"]["var"],
                             stats["biased"]["stem"]["bn_before"]["bn"]["var"] * stem_m / (stem_m - 1), rtol=1e-5)


# --- ResNet shortcut option A -------------------------------------------------------------------------------


def _resnet_params(n: int, option_a: bool) -> int:
  """He et al. 2016 Sec. 4.2 CIFAR ResNet, counted by hand: bias-free 3x3 convs + BatchNorm (scale, offset)."""
  conv = lambda cin, cout, k=3: k * k * cin * cout + 2 * cout
  total = conv(3, 16) + 64 * 10 + 10
  for cin, cout in ((16, 16), (16, 32), (32, 64)):
    total += conv(cin, cout) + conv(cout, cout) + (n - 1) * 2 * conv(cout, cout)
    if cin != cout and not option_a:
      total += conv(cin, cout, k=1)
  return total


@pytest.mark.parametrize("name,n,published", [("resnet20", 3, 0.27e6), ("resnet32", 5, 0.46e6)])
@pytest.mark.parametrize("shortcut", models.SHORTCUTS)
def test_resnet_parameter_counts_per_shortcut(name, n, published, shortcut):
  params = jax.eval_shape(lambda: models.get(name, shortcut=shortcut).init(jax.random.key(0), jnp.ones((1, 32, 32, 3))))
  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params["params"]))
  assert count == _resnet_params(n, shortcut == "zero_pad")
  if shortcut == "zero_pad":  # the paper's table: ResNet-20 0.27M, ResNet-32 0.46M
    assert round(count / 1e4) * 1e4 == published


def test_zero_pad_shortcut_is_strided_identity_with_zero_channels():
  block = models.BasicBlock(8, 2, shortcut="zero_pad", activation="identity",
                            unit=dict(initializer="zeros", batchnorm="none"))
  x = np.random.default_rng(2).normal(size=(2, 6, 6, 4)).astype(np.float32)
  out = block.apply(block.init(jax.random.key(0), x), x)  # zero kernels and biases: only the shortcut remains
  expected = np.zeros((2, 3, 3, 8), np.float32)
  expected[..., 2:6] = x[:, ::2, ::2, :]
  np.testing.assert_array_equal(out, expected)


def test_resnet_refuses_batchnorm_after_and_unknown_shortcut():
  with pytest.raises(ValueError, match=r"batchnorm \(ResNet\) must be one of 'before', 'none'; got 'after'"):
    models.get("resnet20", batchnorm="after")
  with pytest.raises(ValueError, match="shortcut must be one of 'zero_pad', 'projection'; got 'C'"):
    models.get("resnet20", shortcut="C")


# --- uniform options, nothing silently dropped --------------------------------------------------------------


def test_get_refuses_an_option_the_model_does_not_take():
  with pytest.raises(ValueError, match=r"model 'resnet20' does not take hidden; it takes: num_classes, .*shortcut"):
    models.get("resnet20", hidden=(10,))
  with pytest.raises(ValueError, match="model 'resnet20' does not take blocks_per_stage"):
    models.get("resnet20", blocks_per_stage=5)
  assert models.get("resnet", blocks_per_stage=2).blocks_per_stage == 2


UNIFORM = ("num_classes", "activation", "initializer", "init_scale", "batchnorm", "bn_momentum", "bn_running_var",
           "keep_prob", "dropout_mode", "bn_axis_name", "dtype")


@pytest.mark.parametrize("name", models.NAMES)
def test_every_model_takes_the_uniform_options(name):
  assert set(UNIFORM) <= set(models.options(name))


def _outputs(model, x):
  variables = model.init(jax.random.key(0), x)
  train, _ = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])
  return variables, np.asarray(train), np.asarray(model.apply(variables, x, train=False))


@pytest.mark.parametrize("name", ["lenet5", "cifar_convnet", "resnet8", "mlp"])
def test_dropout_and_its_mode_take_effect_in_every_model(name):
  x = jax.random.normal(jax.random.key(2), (4, 28, 28, 3))
  _, train_plain, eval_plain = _outputs(models.get(name), x)
  _, train_inv, eval_inv = _outputs(models.get(name, keep_prob=0.5), x)
  _, train_orig, eval_orig = _outputs(models.get(name, keep_prob=0.5, dropout_mode="original"), x)
  assert not np.allclose(train_inv, train_plain)  # dropout acts in training
  np.testing.assert_allclose(eval_inv, eval_plain, rtol=1e-5, atol=1e-6)  # inverted: identity at test time
  assert not np.allclose(eval_orig, eval_plain)  # original: test time scales by keep_prob


@pytest.mark.parametrize("name", ["lenet5", "cifar_convnet", "resnet8"])
def test_batchnorm_option_changes_the_conv_nets(name):
  x = jax.random.normal(jax.random.key(2), (4, 28, 28, 3))
  other = "none" if name.startswith("resnet") else "before"
  plain, bn = models.get(name), models.get(name, batchnorm=other)
  has = lambda m: "batch_stats" in m.init(jax.random.key(0), x)
  assert has(plain) != has(bn)


# --- hinge tie ----------------------------------------------------------------------------------------------


def test_hinge_subgradient_at_an_exact_tie_is_zero():
  # s_0 - s_1 + delta == 0 exactly for class 0 (label 1): cs231n and PyTorch's multi_margin_loss give 0 there.
  logits = jnp.array([[1.0, 2.0, -5.0]])
  grad = jax.grad(lambda s: losses.hinge(s, jnp.array([1]), delta=1.0))(logits)
  np.testing.assert_array_equal(grad, np.zeros((1, 3)))
  grad = jax.grad(lambda s: losses.hinge(s, jnp.array([1]), delta=1.5))(logits)  # margin 0.5 > 0: counted
  np.testing.assert_array_equal(grad, np.array([[1.0, -1.0, 0.0]]))
